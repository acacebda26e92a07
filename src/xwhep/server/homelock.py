"""One server per home: an exclusive ``flock`` on ``HOME/server.lock``, held for the life of the process.

A second server on the same home would open the same SQLite file and rewrite admin.conf and worker.conf to its own
port. The lock is taken before anything in the home is touched; the kernel releases it when the process ends,
however it ends (kill -9 included), so a stale lock file never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "server.lock"


class HomeInUse(Exception):
    """Another live process holds the home."""


class HomeLock:
    """The held lock (keep a reference: closing the file releases it)."""

    def __init__(self, home: Path) -> None:
        self.path = home / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"server pid {holder}" if holder else "another server"
            raise HomeInUse(f"home {home} is in use by {who}") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None
