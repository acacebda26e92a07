"""Matchmaking (DESIGN §4): does a work fit a host, and if not, which requirement fails.

The scheduler asks :func:`matches`; ``xw why`` asks :func:`explain` for every registered host and counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xwhep.core.expressions import requirement
from xwhep.core.model import AppType, UsageLevel

PUBLIC_WORKER_LEVELS = frozenset({UsageLevel.WORKER_USER, UsageLevel.VWORKER_USER, UsageLevel.SUPER_USER})


@dataclass(frozen=True)
class HostProfile:
    """What the scheduler knows of a host (a registered worker)."""

    uid: str
    name: str = ""
    os: str = "linux"
    cpu: str = "x86_64"
    cpuspeed: int = 0  # MHz
    cores: int = 1
    memory: int = 0  # MiB
    disk: int = 0  # MiB
    java: bool = False
    apptypes: frozenset[str] = frozenset()  # shared app types: VM, CONTAINER, VIRTUALBOX, or SHARED app names
    packages: Mapping[str, str] = field(default_factory=dict)
    datas: frozenset[str] = frozenset()
    project: str = ""  # usergroup label: the host runs only that group's works
    incoming: bool = False
    owner: str = ""
    owner_level: UsageLevel = UsageLevel.WORKER_USER
    owner_group: str | None = None

    def as_cel(self) -> dict[str, Any]:
        """The ``host`` variable of requirements and rank expressions."""
        return {
            "uid": self.uid, "name": self.name, "os": self.os, "cpu": self.cpu, "cpuspeed": self.cpuspeed,
            "cores": self.cores, "memory": self.memory, "disk": self.disk, "java": self.java,
            "apptypes": sorted(self.apptypes), "packages": dict(self.packages), "datas": sorted(self.datas),
            "project": self.project, "incoming": self.incoming,
        }


@dataclass(frozen=True)
class WorkProfile:
    """What a work asks of a host. Works of one bag share one profile (the scheduler's match class)."""

    app_name: str
    app_type: AppType
    platforms: frozenset[str]  # "os/cpu" keys with a binary, and "java" for a jar
    packages: Mapping[str, str] = field(default_factory=dict)
    min_memory: int = 0
    min_cpuspeed: int = 0
    min_disk: int = 0
    expected_host: str | None = None
    needs_incoming: bool = False
    requirements: str | None = None
    owner: str = ""
    owner_group: str | None = None  # uid of the owner's usergroup
    owner_group_label: str | None = None
    rights: int = 0x755

    def key(self) -> tuple[Any, ...]:
        """Hashable identity of the profile (HTCondor's auto-cluster). Computed once: a bag of 10,000 works
        shares one profile and the scheduler asks for each of them."""
        cached: tuple[Any, ...] | None = self.__dict__.get("_key")
        if cached is None:
            cached = (self.app_name, self.app_type, self.platforms, tuple(sorted(self.packages.items())),
                      self.min_memory, self.min_cpuspeed, self.min_disk, self.expected_host, self.needs_incoming,
                      self.requirements, self.owner, self.owner_group, self.owner_group_label, self.rights)
            object.__setattr__(self, "_key", cached)  # frozen dataclass: a memo, not a field
        return cached


@dataclass(frozen=True)
class Check:
    """One requirement of a work checked against one host."""

    name: str
    ok: bool
    detail: str


def _package_ok(wanted: str, have: str | None) -> bool:
    if have is None:
        return False
    if wanted in ("", "*"):
        return True
    return have == wanted or have.startswith(wanted + ".")


def _identity_ok(work: WorkProfile, host: HostProfile) -> tuple[bool, str]:
    """Whose works a host runs, by its owner's identity: everyone's on a public worker, its group's on a group
    administrator's, its owner's only on a private one. The work's access rights play no part: the right to run a
    work is not the right to read it (a host sees only what its task needs, and only while it runs it)."""
    if work.owner == host.owner:
        return True, "host owned by the work's owner"
    if host.owner_level in PUBLIC_WORKER_LEVELS:
        return True, "public worker"
    if host.owner_level == UsageLevel.ADVANCED_USER and host.owner_group and host.owner_group == work.owner_group:
        return True, "group worker, work of the group"
    if host.owner_level == UsageLevel.ADVANCED_USER:
        return False, "group worker of another group"
    return False, "private worker of another user"


def explain(work: WorkProfile, host: HostProfile) -> list[Check]:
    """Every requirement of ``work`` checked against ``host``, in a stable order."""
    checks: list[Check] = []
    if work.app_type == AppType.DEPLOYABLE:
        plat = f"{host.os}/{host.cpu}"
        ok = plat in work.platforms or ("java" in work.platforms and host.java)
        checks.append(Check("binary", ok, f"app {work.app_name} has a binary for {plat}"
                            if ok else f"app {work.app_name} has no binary for {plat}"
                            f" (has: {', '.join(sorted(work.platforms)) or 'none'})"))
    else:
        shared = work.app_type.value if work.app_type != AppType.SHARED else work.app_name
        ok = shared in host.apptypes
        checks.append(Check("shared app", ok, f"host shares {shared}" if ok else f"host does not share {shared}"))
    missing = [f"{k} {v}".strip() for k, v in sorted(work.packages.items())
               if not _package_ok(v, host.packages.get(k))]
    if work.packages:
        checks.append(Check("packages", not missing,
                            "all packages present" if not missing else "missing " + ", ".join(missing)))
    for name, want, have, unit in (("memory", work.min_memory, host.memory, "MiB"),
                                   ("cpuspeed", work.min_cpuspeed, host.cpuspeed, "MHz"),
                                   ("disk", work.min_disk, host.disk, "MiB")):
        if want:
            checks.append(Check(name, have >= want, f"needs {want} {unit}, host has {have} {unit}"))
    if host.project:
        ok = host.project in (work.owner_group, work.owner_group_label)
        checks.append(Check("project", ok, f"host serves project {host.project}"))
    if work.expected_host:
        ok = work.expected_host in (host.uid, host.name)
        checks.append(Check("expected host", ok, f"work expects host {work.expected_host}"))
    if work.needs_incoming:
        checks.append(Check("incoming connections", host.incoming,
                            "host accepts incoming connections" if host.incoming
                            else "work has listen ports; host does not accept incoming connections"))
    ok, why = _identity_ok(work, host)
    checks.append(Check("worker identity", ok, why))
    if work.requirements:
        ok, reason = requirement(work.requirements, host.as_cel())
        checks.append(Check("requirements", ok, f"{work.requirements} is {'true' if ok else 'false'}"
                            + (f" ({reason})" if reason else "")))
    return checks


def matches(work: WorkProfile, host: HostProfile) -> bool:
    """True when every requirement of ``work`` holds on ``host``."""
    return all(c.ok for c in explain(work, host))


def summarize(work: WorkProfile, hosts: Iterable[HostProfile]) -> list[tuple[str, int, int, str]]:
    """Per requirement: (name, hosts satisfying it, hosts checked, a sample detail of a failure).

    The last row, ``all``, counts the hosts that satisfy everything at once.
    """
    return survey(work, hosts).rows


@dataclass
class Survey:
    """What :func:`survey` found: :func:`summarize`'s rows over the hosts it checked, how many of those that fit
    are in ``alive``, and whether it stopped early (``checked`` < ``total``)."""

    rows: list[tuple[str, int, int, str]]
    fit_alive: int
    checked: int
    total: int

    @property
    def partial(self) -> bool:
        return self.checked < self.total


def survey(work: WorkProfile, hosts: Iterable[HostProfile], alive: Container[str] = (),
           seconds: float | None = None, stop: Callable[[], bool] | None = None) -> Survey:
    """:func:`summarize`, bounded: at most ``seconds`` (then the hosts not checked yet are left out and counted in
    ``total`` only), and no further once ``stop()`` says so. Each host's requirements expression has its own
    evaluation budget (:mod:`xwhep.core.expressions`); this bounds the sum over many hosts."""
    hosts = list(hosts)
    deadline = None if seconds is None else time.monotonic() + seconds
    counts: dict[str, list[Any]] = {}
    checked = fit = fit_alive = 0
    for host in hosts:
        if checked and ((deadline is not None and time.monotonic() > deadline) or (stop is not None and stop())):
            break
        checked += 1
        checks = explain(work, host)
        ok = all(c.ok for c in checks)
        fit += ok
        fit_alive += ok and host.uid in alive
        for c in checks:
            row = counts.setdefault(c.name, [0, ""])
            if c.ok:
                row[0] += 1
            elif not row[1]:
                row[1] = c.detail
    rows = [(name, n, checked, sample) for name, (n, sample) in counts.items()]
    rows.append(("all", fit, checked, ""))
    return Survey(rows, fit_alive, checked, len(hosts))
