"""One vocabulary for the whole product: statuses, types and usage levels.

"work" is the name of a job everywhere (code, API, CLI); "job" is accepted as an alias in the CLI and docs.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class WorkStatus(StrEnum):
    """Status of a work (a job). The legal moves between them live in :mod:`xwhep.core.states`."""

    UNAVAILABLE = "UNAVAILABLE"  # waiting for input data to become available
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DATAREQUEST = "DATAREQUEST"  # finished on the worker, result upload outstanding
    REPLICATING = "REPLICATING"  # own result in, replicas outstanding
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    FAILED = "FAILED"  # wall-clock limit exceeded
    ABORTED = "ABORTED"  # worker deactivated or told to stop
    LOST = "LOST"  # alive timeout


FINAL_WORK_STATUSES = frozenset({WorkStatus.COMPLETED, WorkStatus.ERROR, WorkStatus.FAILED})


class TaskStatus(StrEnum):
    """Status of a task: one attempt of a work on one host."""

    RUNNING = "RUNNING"
    DATAREQUEST = "DATAREQUEST"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    FAILED = "FAILED"
    ABORTED = "ABORTED"
    LOST = "LOST"


class AppType(StrEnum):
    """How an application reaches a worker."""

    DEPLOYABLE = "DEPLOYABLE"  # a binary per OS/CPU, or a JAVA jar, downloaded by the worker
    SHARED = "SHARED"  # pre-installed on the workers that declare it
    VM = "VM"  # a virtual disk run by a hypervisor the worker shares
    CONTAINER = "CONTAINER"  # an image run by a container engine the worker shares


class DataStatus(StrEnum):
    UNAVAILABLE = "UNAVAILABLE"
    AVAILABLE = "AVAILABLE"
    ERROR = "ERROR"


class UsageLevel(IntEnum):
    """XWHEP usage levels, ordered: a higher level includes what a lower one may do, but for workers."""

    NONE = 0
    LISTJOB = 1
    INSERTJOB = 2
    GETJOB = 3
    DELETEJOB = 4
    LISTDATA = 5
    INSERTDATA = 6
    GETDATA = 7
    DELETEDATA = 8
    LISTGROUP = 9
    INSERTGROUP = 10
    GETGROUP = 11
    DELETEGROUP = 12
    LISTSESSION = 13
    INSERTSESSION = 14
    GETSESSION = 15
    DELETESESSION = 16
    LISTAPP = 17
    GETAPP = 18
    WORKER_USER = 19
    VWORKER_USER = 20
    STANDARD_USER = 21
    ADVANCED_USER = 22  # group administrator
    MANDATED_USER = 23
    SUPER_USER = 24  # administrator

    @classmethod
    def parse(cls, text: str) -> UsageLevel:
        """Parse a level by name, case-insensitively (``standard_user``, ``ADMINISTRATOR`` too)."""
        key = text.strip().upper()
        key = LEVEL_ALIASES.get(key, key)
        try:
            return cls[key]
        except KeyError:
            raise ValueError(f"unknown usage level {text!r}") from None


LEVEL_ALIASES = {"ADMIN": "SUPER_USER", "ADMINISTRATOR": "SUPER_USER", "STANDARD": "STANDARD_USER",
                 "WORKER": "WORKER_USER", "ADVANCED": "ADVANCED_USER", "GROUPADMIN": "ADVANCED_USER",
                 "MANDATED": "MANDATED_USER", "VWORKER": "VWORKER_USER"}
"""Other names of usage levels that :meth:`UsageLevel.parse` reads."""


class ObjectType(StrEnum):
    USER = "user"
    USERGROUP = "usergroup"
    APP = "app"
    DATA = "data"
    WORK = "work"
    TASK = "task"
    HOST = "host"
    SESSION = "session"
    GROUP = "group"
    EVENT = "event"


KNOWN_OS = frozenset({"linux", "macosx", "win32", "win64", "freebsd", "solaris", "java"})
KNOWN_CPU = frozenset({"x86_64", "amd64", "ix86", "i686", "aarch64", "arm64", "ppc64le", "sparc", "java"})


def normalize_os(text: str) -> str:
    """Canonical OS name (``Linux`` → ``linux``, ``darwin`` → ``macosx``)."""
    t = text.strip().lower()
    return {"darwin": "macosx", "mac": "macosx", "windows": "win64"}.get(t, t)


def normalize_cpu(text: str) -> str:
    """Canonical CPU name (``amd64`` → ``x86_64``, ``arm64`` → ``aarch64``)."""
    t = text.strip().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "i386": "ix86", "i686": "ix86"}.get(t, t)
