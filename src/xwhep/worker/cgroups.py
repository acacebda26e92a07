"""Per-job control groups (cgroup v1, v2, or a hybrid of both).

A job's processes are put in a fresh child cgroup created *under the worker's own cgroup* in every useful
hierarchy. That gives three things a process group cannot:

* membership that survives ``setsid``/double forks, so the whole tree can be listed and killed;
* resource limits (memory, CPU bandwidth, number of tasks);
* accounting the executor reads afterwards (out-of-memory kills, peak memory).

The worker may not own the cgroup root (it may sit in e.g. ``memory:/process_api/<id>``), hence every child is
created below the paths read from ``/proc/self/cgroup``. Nothing here needs a capability beyond write access to
those directories; whatever cannot be done is reported, never silently assumed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CgroupError",
    "Hierarchy",
    "JobCgroup",
    "MemoryStats",
    "discover",
    "remove_stale",
]

# Controllers whose v1 hierarchies are worth a per-job cgroup. cpuset (needs cpus/mems filled in before use),
# devices, blkio and named hierarchies such as name=systemd are deliberately left alone.
_V1_USEFUL = frozenset({"memory", "cpu", "pids", "freezer"})
_V2_LIMITS = ("memory", "cpu", "pids")
DEFAULT_PREFIX = "xwhep-"


class CgroupError(Exception):
    """A cgroup operation failed in a way the caller must know about."""


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and where the current process sits in it."""

    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: controllers bound to this mount; v2: controllers available to our children
    mountpoint: Path
    own_path: str  # our cgroup, relative to the hierarchy root, e.g. "/process_api/5050e1"

    @property
    def own_dir(self) -> Path:
        """Directory of the current process's cgroup in this hierarchy."""
        return self.mountpoint / self.own_path.lstrip("/")


@dataclass(frozen=True)
class MemoryStats:
    """Memory accounting of a job cgroup (``None`` when the kernel does not say)."""

    limit_bytes: int | None
    max_usage_bytes: int | None
    failcnt: int | None
    oom_kills: int | None


def _read(path: Path) -> str:
    return path.read_text()


def _write(path: Path, value: str) -> None:
    # cgroup files want one write() of the whole value; Path.write_text may buffer but still issues one write for
    # these short strings. Opening without O_CREAT avoids creating a regular file if the controller is missing.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _parse_mountinfo(text: str) -> list[tuple[str, str, str, str]]:
    """(root, mountpoint, fstype, super options) of every cgroup/cgroup2 mount."""
    mounts = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        lf = left.split()
        rf = right.split()
        if len(lf) < 5 or len(rf) < 3 or rf[0] not in ("cgroup", "cgroup2"):
            continue
        # mountinfo escapes blanks in paths as octal (\040)
        def unescape(s: str) -> str:
            return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)

        mounts.append((unescape(lf[3]), unescape(lf[4]), rf[0], rf[2]))
    return mounts


def discover(
    proc_cgroup: str | Path = "/proc/self/cgroup", mountinfo: str | Path = "/proc/self/mountinfo"
) -> list[Hierarchy]:
    """List the mounted cgroup hierarchies and our own cgroup in each.

    Only hierarchies that are both mounted and present in ``/proc/self/cgroup`` are returned. A mount whose root
    is not ``/`` (cgroup namespaces, container bind mounts) is handled by stripping that root from our path; a
    hierarchy where our cgroup is not visible under the mount is skipped.
    """
    own_v1: dict[str, str] = {}
    own_v2: str | None = None
    for line in Path(proc_cgroup).read_text().splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        if hid == "0" and ctrls == "":
            own_v2 = path
        else:
            for c in ctrls.split(","):
                if c:
                    own_v1[c] = path

    result: list[Hierarchy] = []
    seen: set[str] = set()
    for root, mountpoint, fstype, opts in _parse_mountinfo(Path(mountinfo).read_text()):
        if mountpoint in seen:
            continue
        if fstype == "cgroup2":
            if own_v2 is None:
                continue
            rel = _relative(own_v2, root)
            if rel is None:
                continue
            mp = Path(mountpoint)
            own_dir = mp / rel.lstrip("/")
            try:
                available = frozenset(_read(own_dir / "cgroup.controllers").split())
            except OSError:
                continue
            result.append(Hierarchy(2, available, mp, rel))
            seen.add(mountpoint)
        else:
            names = [o for o in opts.split(",") if o in own_v1]
            if not names:
                continue
            rel = _relative(own_v1[names[0]], root)
            if rel is None:
                continue
            result.append(Hierarchy(1, frozenset(names), Path(mountpoint), rel))
            seen.add(mountpoint)
    return result


def _relative(path: str, mount_root: str) -> str | None:
    if mount_root in ("", "/"):
        return path
    if path == mount_root:
        return "/"
    if path.startswith(mount_root.rstrip("/") + "/"):
        return path[len(mount_root.rstrip("/")) :]
    return None


def _pids_in(d: Path) -> set[int]:
    try:
        return {int(x) for x in _read(d / "cgroup.procs").split()}
    except FileNotFoundError:
        return set()


class JobCgroup:
    """The cgroups of one job: one child directory per useful hierarchy, created under our own cgroup.

    Use :meth:`create`, then the ``set_*`` methods (each returns ``(applied, reason)``), :meth:`add_pid` for the
    job's first process *before it forks*, :meth:`kill_all` when the job ends, and :meth:`remove` (or the context
    manager) to delete the directories.
    """

    def __init__(self, name: str, dirs: dict[Hierarchy, Path], notes: dict[str, str]) -> None:
        self.name = name
        self._dirs = dirs
        #: why a hierarchy/controller could not be used (informational)
        self.notes = notes

    # ----------------------------------------------------------------------------------------------- creation
    @classmethod
    def create(
        cls, name: str | None = None, hierarchies: list[Hierarchy] | None = None, prefix: str = DEFAULT_PREFIX
    ) -> JobCgroup:
        """Create the job's cgroup directories (names embed our pid so stale ones can be found later).

        Hierarchies where creation fails are skipped and explained in :attr:`notes`; if none at all could be
        created, :class:`CgroupError` is raised.
        """
        if name is None:
            name = f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad cgroup name {name!r}")
        if hierarchies is None:
            try:
                hierarchies = discover()
            except OSError as e:
                raise CgroupError(f"cannot read cgroup membership: {e}") from e
        dirs: dict[Hierarchy, Path] = {}
        notes: dict[str, str] = {}
        for h in hierarchies:
            if h.version == 1 and not (h.controllers & _V1_USEFUL):
                continue
            label = ",".join(sorted(h.controllers)) if h.version == 1 else "v2"
            d = h.own_dir / name
            try:
                d.mkdir()
            except OSError as e:
                notes[label] = f"cannot create {d}: {e.strerror}"
                continue
            dirs[h] = d
        if not dirs:
            raise CgroupError("no cgroup hierarchy usable: " + ("; ".join(f"{k}: {v}" for k, v in notes.items())
                                                                or "none mounted"))
        cg = cls(name, dirs, notes)
        cg._prepare_v2()
        return cg

    def _prepare_v2(self) -> None:
        # In v2, a child only gets a controller if the parent lists it in cgroup.subtree_control, and enabling it
        # fails (EBUSY) when the parent itself holds processes — the usual case for a worker not started in a
        # delegated cgroup. Try, and remember why not.
        for h in self._dirs:
            if h.version != 2:
                continue
            enabled = set(_read(h.own_dir / "cgroup.subtree_control").split())
            for c in _V2_LIMITS:
                if c in enabled or c not in h.controllers:
                    continue
                try:
                    _write(h.own_dir / "cgroup.subtree_control", f"+{c}")
                except OSError as e:
                    self.notes[f"v2:{c}"] = f"cannot enable {c} in {h.own_dir}: {e.strerror}"

    def _dir_for(self, controller: str) -> tuple[Hierarchy, Path] | None:
        for h, d in self._dirs.items():
            if h.version == 1 and controller in h.controllers:
                return h, d
        for h, d in self._dirs.items():
            if h.version == 2 and (d / "cgroup.controllers").exists():
                try:
                    if controller in _read(d / "cgroup.controllers").split():
                        return h, d
                except OSError:
                    pass
        return None

    @property
    def directories(self) -> list[Path]:
        """The job's cgroup directories, one per hierarchy."""
        return list(self._dirs.values())

    def has(self, controller: str) -> bool:
        """Whether ``controller`` is available to this job cgroup."""
        return self._dir_for(controller) is not None

    # ----------------------------------------------------------------------------------------------- limits
    def set_memory_limit(self, nbytes: int) -> tuple[bool, str]:
        """Limit RAM (and RAM+swap where accounted) to ``nbytes``; the kernel OOM-kills inside the job beyond."""
        found = self._dir_for("memory")
        if found is None:
            return False, self._why_missing("memory")
        h, d = found
        try:
            if h.version == 1:
                _write(d / "memory.limit_in_bytes", str(nbytes))
                # Without this the job could spill into swap and run on unbounded.
                if (d / "memory.memsw.limit_in_bytes").exists():
                    _write(d / "memory.memsw.limit_in_bytes", str(nbytes))
            else:
                _write(d / "memory.max", str(nbytes))
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", "0")
        except OSError as e:
            return False, f"cannot set memory limit in {d}: {e.strerror}"
        return True, f"memory limited to {nbytes // (1 << 20)} MiB"

    def set_cpu_quota(self, cpus: float, period_us: int = 100_000) -> tuple[bool, str]:
        """Limit CPU bandwidth to ``cpus`` CPUs' worth of time (0.25 = a quarter of one CPU, 2 = two CPUs)."""
        if cpus <= 0:
            raise ValueError("cpu quota must be positive")
        found = self._dir_for("cpu")
        if found is None:
            return False, self._why_missing("cpu")
        h, d = found
        # The kernel refuses quotas under 1 ms.
        quota = max(1000, int(cpus * period_us))
        try:
            if h.version == 1:
                _write(d / "cpu.cfs_period_us", str(period_us))
                _write(d / "cpu.cfs_quota_us", str(quota))
            else:
                _write(d / "cpu.max", f"{quota} {period_us}")
        except OSError as e:
            return False, f"cannot set cpu quota in {d}: {e.strerror}"
        return True, f"cpu limited to {cpus:g} CPU"

    def set_pids_max(self, n: int) -> tuple[bool, str]:
        """Limit the number of tasks (processes and threads) in the job to ``n``."""
        if n < 1:
            raise ValueError("pids max must be >= 1")
        found = self._dir_for("pids")
        if found is None:
            return False, self._why_missing("pids")
        _, d = found
        try:
            _write(d / "pids.max", str(n))
        except OSError as e:
            return False, f"cannot set pids.max in {d}: {e.strerror}"
        return True, f"tasks limited to {n}"

    def _why_missing(self, controller: str) -> str:
        for k, v in self.notes.items():
            if controller in k.replace("v2:", "").split(","):
                return v
        return f"the {controller} controller is not available to this worker"

    # ----------------------------------------------------------------------------------------------- membership
    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` into every job cgroup; children it forks afterwards inherit membership.

        Raises :class:`CgroupError` if it could not be added anywhere (then nothing tracks the job).
        """
        errors = []
        added = 0
        for d in self._dirs.values():
            try:
                _write(d / "cgroup.procs", str(pid))
                added += 1
            except OSError as e:
                errors.append(f"{d}: {e.strerror}")
        if not added:
            raise CgroupError(f"cannot add pid {pid}: " + "; ".join(errors))

    def pids(self) -> set[int]:
        """All processes currently in the job (union over hierarchies)."""
        out: set[int] = set()
        for d in self._dirs.values():
            out |= _pids_in(d)
        return out

    def kill_all(self, timeout: float = 5.0) -> bool:
        """SIGKILL every process of the job at once; return True when the cgroups are empty.

        Where possible the job is frozen first (v1 freezer or v2 ``cgroup.freeze``), so a process cannot fork
        between the listing and the kill; v2 ``cgroup.kill`` does it atomically in the kernel.
        """
        if not self.pids():  # the usual case after a normal exit: nothing to freeze or kill
            return True
        deadline = time.monotonic() + timeout
        killed_by_kernel = False
        for h, d in self._dirs.items():
            if h.version == 2 and (d / "cgroup.kill").exists():
                try:
                    _write(d / "cgroup.kill", "1")
                    killed_by_kernel = True
                except OSError:
                    pass
        frozen = None if killed_by_kernel else self._freeze(deadline)
        try:
            while True:
                pids = self.pids()
                if not pids:
                    return True
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if frozen is not None:
                    # Frozen tasks only act on SIGKILL once thawed.
                    self._thaw(frozen)
                    frozen = None
                if time.monotonic() > deadline:
                    return not self.pids()
                # Killed tasks leave the cgroup asynchronously; a short poll is the only notification v1 offers.
                time.sleep(0.002)
        finally:
            if frozen is not None:
                self._thaw(frozen)

    def _freeze(self, deadline: float) -> Path | None:
        for h, d in self._dirs.items():
            try:
                if h.version == 1 and "freezer" in h.controllers:
                    _write(d / "freezer.state", "FROZEN")
                    while _read(d / "freezer.state").strip() != "FROZEN" and time.monotonic() < deadline:
                        time.sleep(0.001)
                    return d
                if h.version == 2 and (d / "cgroup.freeze").exists():
                    _write(d / "cgroup.freeze", "1")
                    while "frozen 1" not in _read(d / "cgroup.events") and time.monotonic() < deadline:
                        time.sleep(0.001)
                    return d
            except OSError:
                continue
        return None

    @staticmethod
    def _thaw(d: Path) -> None:
        with contextlib.suppress(OSError):
            if (d / "freezer.state").exists():
                _write(d / "freezer.state", "THAWED")
            else:
                _write(d / "cgroup.freeze", "0")

    # ----------------------------------------------------------------------------------------------- accounting
    def memory_stats(self) -> MemoryStats:
        """Memory limit, peak usage, limit hits and OOM kills seen by the job's memory cgroup."""
        found = self._dir_for("memory")
        if found is None:
            return MemoryStats(None, None, None, None)
        h, d = found

        def num(fname: str) -> int | None:
            try:
                v = _read(d / fname).strip()
            except OSError:
                return None
            return None if v == "max" else int(v)

        def keyed(fname: str, key: str) -> int | None:
            try:
                for line in _read(d / fname).splitlines():
                    k, _, v = line.partition(" ")
                    if k == key:
                        return int(v)
            except OSError:
                pass
            return None

        if h.version == 1:
            return MemoryStats(num("memory.limit_in_bytes"), num("memory.max_usage_in_bytes"),
                               num("memory.failcnt"), keyed("memory.oom_control", "oom_kill"))
        return MemoryStats(num("memory.max"), num("memory.peak"), keyed("memory.events", "max"),
                           keyed("memory.events", "oom_kill"))

    # ----------------------------------------------------------------------------------------------- removal
    def remove(self, timeout: float = 5.0) -> bool:
        """Kill what is left and delete the directories; return True if all were removed."""
        self.kill_all(timeout)
        ok = True
        for d in list(self._dirs.values()):
            if not _rmdir(d, timeout):
                ok = False
        return ok

    def __enter__(self) -> JobCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _rmdir(d: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            d.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            # EBUSY right after a kill: the dying tasks are still being torn down.
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
            time.sleep(0.002)


def remove_stale(prefix: str = DEFAULT_PREFIX, hierarchies: list[Hierarchy] | None = None) -> list[Path]:
    """Remove job cgroups left behind by a worker that died (their name embeds a pid that no longer runs).

    Their remaining processes are killed first. Returns the directories removed.
    """
    if hierarchies is None:
        hierarchies = discover()
    removed: list[Path] = []
    pat = re.compile(re.escape(prefix) + r"(\d+)-")
    for h in hierarchies:
        try:
            children = list(h.own_dir.iterdir())
        except OSError:
            continue
        for d in children:
            m = pat.match(d.name)
            if not m or not d.is_dir() or _alive(int(m.group(1))):
                continue
            cg = JobCgroup(d.name, {h: d}, {})
            if cg.remove(timeout=2.0):
                removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
