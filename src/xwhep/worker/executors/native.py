"""The native executor: the job runs on the worker's own OS inside a bubblewrap sandbox, limited by cgroups.

What the job sees (built by :func:`build_bwrap_argv`):

* ``/usr`` (and ``/bin``, ``/lib``, ``/lib64``, ``/sbin`` as on the host: symlinks on merged-/usr systems,
  read-only binds otherwise), read-only;
* from ``/etc`` only ``/etc/alternatives`` and ``/etc/ld.so.cache`` (read-only), plus synthetic ``passwd``,
  ``group`` and ``hosts`` files holding no host data (tools calling ``getpwuid`` and lookups of ``localhost``
  work); the rest of ``/etc``, ``/root``, ``/home``, the worker's directories and the host ``/tmp`` are absent;
* a private, size-limited ``/tmp``, a minimal ``/dev``, its own ``/proc``;
* the job dir read-write at ``/job`` (the working directory and ``$HOME``), and optionally a Unix-socket directory
  at ``/xw/sockets``;
* every namespace unshared (``--unshare-all``): its network namespace holds only ``lo``, so neither the LAN,
  the internet nor the host's own loopback services are reachable; a pid namespace, so when the job's main
  process exits the kernel kills whatever it left behind;
* uid 1000 inside a user namespace, no capabilities, no further user namespaces; the sandbox root is remounted
  read-only;
* a seccomp filter (:mod:`~xwhep.worker.executors.seccomp`): no file can be given the setuid or setgid bit, no
  device node made (with a worker running as root, the job's files belong to root on the host);
* nothing of the host's paths: bubblewrap reads its arguments from a memfd (``--args``), so the sandbox's pid 1
  (bubblewrap) shows no path in ``/proc/1/cmdline``; stdin, stdout and stderr are pipes (the worker feeds and
  drains them), so ``/proc/self/fd`` names no host file; and the job dir is mounted through a per-job overlay
  whose options are relative (``upperdir=job``), so ``/proc/self/mountinfo`` shows ``/`` of an overlay instead of
  the host path of a bind. The overlay (empty lower layer: every write lands in the job dir itself, no
  whiteouts) is mounted by ``unshare -Urm`` in a mount namespace of the job's own, gone when the job is; it needs
  overlayfs in user namespaces (Linux 5.11+) — without it /job is a plain bind and mountinfo shows its path. The
  tunnels' socket directory stays a plain bind: unix sockets cannot be reached through overlayfs.

The process tree is also tracked by a per-job cgroup (:mod:`xwhep.worker.cgroups`), which enforces the memory,
CPU and task limits and gives a second, independent way to kill everything; the process group is the last
fallback.

A job is started in three steps so that it is inside its cgroup before it can fork: a ``/bin/sh`` gate is
spawned and blocks reading its stdin, the worker moves it into the cgroups, then releases the gate, which
``exec``s bubblewrap (same pid, so already a member; with the overlay the gate runs under ``unshare`` and mounts
it first). The rest of the gate pipe is the job's stdin.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from xwhep.worker.cgroups import CgroupError, JobCgroup
from xwhep.worker.executors import seccomp
from xwhep.worker.executors.base import ExecutorError, JobOutcome, JobSpec, OutcomeStatus

log = logging.getLogger("xwhep.worker")

__all__ = ["JOB_GID", "JOB_UID", "NativeExecutor", "NativeJob", "build_bwrap_argv", "live_job_dir",
           "measure_overhead"]

JOB_UID = 1000
JOB_GID = 1000
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
SOCKETS_MOUNT = "/xw/sockets"
# bwrap's own two processes (the monitor outside, the pid-namespace init inside) live in the job's cgroup and
# count against pids.max, so they are added to the job's allowance.
_BWRAP_TASKS = 2

_PASSWD = (
    "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
    f"xwjob:x:{JOB_UID}:{JOB_GID}:xwhep job:/job:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
_GROUP = f"root:x:0:\nxwjob:x:{JOB_GID}:\nnogroup:x:65534:\n"
_HOSTS = "127.0.0.1 localhost xwjob\n::1 localhost ip6-localhost ip6-loopback\n"

# The arguments are the command line to run (bwrap, maybe behind unshare). `read` consumes the single release
# line from the gate pipe (the shell reads a pipe byte by byte: nothing after the newline), whose rest is the job's
# stdin; if the worker dies before releasing, read sees EOF and the job never starts.
_GATE_SCRIPT = 'read _ || exit 125; unset PWD OLDPWD; exec "$@"'  # bwrap's environ (/proc/1) names no host dir
# The gate when the job dir goes through an overlay: run by `unshare -Urm` (so already in the job's own mount
# namespace; one shell for both steps, as every exec costs a millisecond or two) in the job dir's parent: $1 the
# overlay options, $2 the mount point, the rest the bwrap command line.
_MOUNT_SCRIPT = ('read _ || exit 125; mount -t overlay overlay -o "$1" "$2" || exit 124; shift 2; '
                 'unset PWD OLDPWD; exec "$@"')
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a job dir name that can go into overlay options as is
_DRAIN_S = 10.0  # after the job's processes are gone, the pipes reach EOF at once; this only bounds surprises


def _fmt_s(x: float) -> str:
    return f"{x:g}"


def build_bwrap_argv(
    spec: JobSpec,
    *,
    bwrap: str = "bwrap",
    status_fd: int | None = None,
    etc_fds: dict[str, int] | None = None,
    tmp_size_mb: int | None = 256,
    seccomp_fd: int | None = None,
) -> list[str]:
    """The bubblewrap command line for ``spec`` (see the module docstring for what the job sees).

    ``etc_fds`` maps file names (``passwd``, ``group``, ``hosts``) to readable fds whose content becomes
    ``/etc/<name>``; ``status_fd`` receives bwrap's JSON status (child pid, then the exit code if the command ran);
    ``seccomp_fd`` holds the filter to load.
    """
    a: list[str] = [bwrap]
    a += ["--unshare-all", "--unshare-user", "--uid", str(JOB_UID), "--gid", str(JOB_GID), "--disable-userns"]
    a += ["--cap-drop", "ALL", "--die-with-parent", "--new-session", "--hostname", "xwjob"]
    a += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib64"):
        if os.path.islink(top):
            a += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            a += ["--ro-bind", top, top]
    # python3 and the dynamic loader need nothing else from /etc; alternatives holds symlinks (awk, editor, ...)
    a += ["--ro-bind-try", "/etc/alternatives", "/etc/alternatives"]
    a += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for name, fd in sorted((etc_fds or {}).items()):
        a += ["--perms", "0644", "--ro-bind-data", str(fd), f"/etc/{name}"]
    a += ["--proc", "/proc", "--dev", "/dev"]
    if tmp_size_mb:
        a += ["--size", str(tmp_size_mb << 20)]
    a += ["--tmpfs", "/tmp"]
    a += ["--bind", str(spec.jobdir.resolve()), "/job"]
    if spec.unix_socket_dir is not None:
        a += ["--bind", str(spec.unix_socket_dir.resolve()), SOCKETS_MOUNT]
    # Last: nothing may be created in the sandbox's root tmpfs by the job (only /job and /tmp are writable).
    a += ["--remount-ro", "/", "--chdir", "/job"]
    a += ["--clearenv", "--setenv", "PATH", SANDBOX_PATH, "--setenv", "HOME", "/job"]
    for k, v in spec.env.items():
        a += ["--setenv", k, v]
    if status_fd is not None:
        a += ["--json-status-fd", str(status_fd)]
    if seccomp_fd is not None:
        a += ["--seccomp", str(seccomp_fd)]
    a += ["--", *spec.argv]
    return a


def _validate(spec: JobSpec) -> None:
    if spec.vm is not None or spec.container is not None:
        raise ExecutorError("the native executor runs neither VMs nor containers")
    if not spec.argv or not spec.argv[0]:
        raise ExecutorError("empty argv")
    if not spec.jobdir.is_dir():
        raise ExecutorError(f"job dir {spec.jobdir} does not exist")
    job = spec.jobdir.resolve()
    log = spec.logdir.resolve()
    if log == job or job in log.parents:
        raise ExecutorError(f"log dir {spec.logdir} must be outside the job dir {spec.jobdir}")
    spec.logdir.mkdir(parents=True, exist_ok=True)
    if spec.stdin is not None and not spec.stdin.is_file():
        raise ExecutorError(f"stdin file {spec.stdin} does not exist")
    if spec.unix_socket_dir is not None and not spec.unix_socket_dir.is_dir():
        raise ExecutorError(f"socket dir {spec.unix_socket_dir} does not exist")
    for k, v in spec.env.items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise ExecutorError(f"bad environment variable {k!r}")
    if spec.wallclock is not None and spec.wallclock <= 0:
        raise ExecutorError("wall-clock limit must be positive")
    if spec.memory_mb is not None and spec.memory_mb <= 0:
        raise ExecutorError("memory limit must be positive")
    if spec.cpu_quota is not None and spec.cpu_quota <= 0:
        raise ExecutorError("cpu quota must be positive")
    if spec.max_procs is not None and spec.max_procs <= 0:
        raise ExecutorError("process limit must be positive")


def _data_fd(text: str) -> int:
    # bwrap copies the pipe's content into the sandbox; a few hundred bytes always fit in the pipe buffer, so
    # writing everything before the spawn cannot block.
    r, w = os.pipe()
    try:
        os.write(w, text.encode())
    finally:
        os.close(w)
    return r


def _memfd(name: str, data: bytes) -> int:
    """A sealed-size in-memory file holding ``data``, read from its start (arguments can exceed a pipe buffer)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _rmtree(path: Path) -> None:
    """Remove a tree even where overlayfs left a directory with mode 000 (its work dir)."""
    def retry(func: object, p: str, exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)

    shutil.rmtree(path, onerror=retry)


class _Overlay:
    """The per-job overlay: an empty lower layer and overlayfs's work dir next to the job dir; the overlay is
    mounted over the job dir itself (the upper layer), so bwrap binds the same path as without one. Its mount
    options name only paths relative to the job dir's parent."""

    def __init__(self, jobdir: Path, volatile: bool = True) -> None:
        self.cwd = jobdir.parent
        self.mnt = jobdir
        self.lower = self.cwd / f".{jobdir.name}.lower"
        self.work = self.cwd / f".{jobdir.name}.work"
        # volatile: no sync of the upper filesystem when the job's namespace goes (the job dir is scratch space)
        self.options = (f"lowerdir={self.lower.name},upperdir={jobdir.name},workdir={self.work.name},userxattr,"
                        f"{'volatile,' if volatile else ''}nosuid,nodev")

    def create(self) -> None:
        self.remove()
        self.lower.mkdir(mode=0o700)
        self.work.mkdir(mode=0o700)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.lower.rmdir()
        inner = self.work / "work"  # overlayfs's own, mode 000
        with contextlib.suppress(OSError):
            os.chmod(inner, 0o700)
        for d in (inner / "incompat" / "volatile" / "dirty", inner / "incompat" / "volatile", inner / "incompat",
                  inner, self.work):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                try:
                    d.rmdir()
                except OSError:  # not what overlayfs usually leaves: remove whatever it is
                    _rmtree(d)


class NativeExecutor:
    """Runs jobs in a bubblewrap sandbox with per-job cgroups.

    ``use_cgroups=False`` (or a host without usable cgroups) still sandboxes and still kills the whole tree
    (pid namespace + process group), but memory/CPU/process limits are then reported as not applied.
    """

    name = "native"

    def __init__(self, bwrap: str = "bwrap", use_cgroups: bool = True, tmp_size_mb: int | None = 256,
                 hide_paths: bool = True) -> None:
        self.bwrap = bwrap
        self.use_cgroups = use_cgroups
        self.tmp_size_mb = tmp_size_mb
        self.hide_paths = hide_paths
        self._overlay_ok: dict[int, bool] = {}  # per filesystem (st_dev) of job dirs
        self._probe_lock = threading.Lock()

    def overlay_for(self, jobdir: Path) -> _Overlay | None:
        """The overlay to mount the job dir through, or None where it cannot work (see the module docstring)."""
        if not self.hide_paths or not _SAFE_NAME.match(jobdir.name):
            return None
        unshare = shutil.which("unshare")
        if unshare is None:
            return None
        dev = os.stat(jobdir.parent).st_dev
        with self._probe_lock:
            ok = self._overlay_ok.get(dev)
            if ok is None:
                ok = self._overlay_ok[dev] = _probe_overlay(unshare, jobdir.parent)
        return _Overlay(jobdir) if ok else None

    def available(self) -> tuple[bool, str]:
        """Whether bubblewrap is installed (the executor cannot work without it)."""
        path = shutil.which(self.bwrap)
        return (True, path) if path else (False, f"{self.bwrap} not found on PATH")

    def start(self, spec: JobSpec) -> NativeJob:
        """Start ``spec`` in a sandbox and return at once (see :class:`NativeJob`)."""
        ok, why = self.available()
        if not ok:
            raise ExecutorError(why)
        _validate(spec)
        job = NativeJob(spec, self)
        job._launch()
        return job


def _feed(path: Path, pipe: int) -> None:
    """Copy the stdin file into the job's stdin pipe (in the kernel), then close it: EOF for the job."""
    try:
        with open(path, "rb") as f:
            while True:
                try:
                    n = os.splice(f.fileno(), pipe, 1 << 20)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    chunk = f.read(1 << 16)  # no splice from this filesystem: through user space
                    n = len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(pipe, view):]
                if n == 0:
                    break
    except OSError:  # EPIPE: the job ended without reading it all, which is its right
        pass
    finally:
        os.close(pipe)


def _move(src: int, dst: int | None) -> int:
    """Move what a pipe holds now into a file (or drop it when ``dst`` is None); 0 at EOF."""
    if dst is not None:
        try:
            return os.splice(src, dst, 1 << 20)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    data = os.read(src, 1 << 16)
    if dst is not None and data:
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view):]
    return len(data)


def _probe_overlay(unshare: str, parent: Path) -> bool:
    """Whether an overlay as jobs use it mounts here (a user namespace, overlayfs on this filesystem)."""
    with tempfile.TemporaryDirectory(prefix=".xwhep-probe-", dir=parent) as tmp:
        job = Path(tmp) / "job"
        job.mkdir()
        ov = _Overlay(job)
        ov.create()
        try:
            out = subprocess.run([unshare, "-Urm", "--", "/bin/sh", "-c", _MOUNT_SCRIPT, "xwhep-gate", ov.options,
                                  ov.mnt.name, "/bin/true"], cwd=ov.cwd, capture_output=True,
                                 input=b"go\n", timeout=30, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("native executor: no overlay for job dirs (%s): jobs will see their dir's host path", e)
            return False
        finally:
            ov.remove()
    if out.returncode != 0:
        why = out.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"rc {out.returncode}"]
        log.warning("native executor: no overlay for job dirs (%s): jobs will see their dir's host path", why[0])
        return False
    return True


class NativeJob:
    """A job running in the native sandbox.

    A watcher thread owns the process: it spawns it (bubblewrap's ``--die-with-parent`` is tied to the thread that
    forked, so a long-lived thread must do it), enforces the wall-clock limit, kills what is left when the main
    process ends, reaps, and records the outcome.
    """

    def __init__(self, spec: JobSpec, executor: NativeExecutor) -> None:
        self.spec = spec
        self._ex = executor
        self.limits_applied: dict[str, bool] = {}
        self.limits_notes: dict[str, str] = {}
        self._cgroup: JobCgroup | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._t0 = 0.0
        self._lock = threading.Lock()  # guards kill/reap so a late kill never hits a reused pid
        self._stop_reason: str | None = None
        self._timed_out = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._done = threading.Event()
        self._outcome: JobOutcome | None = None
        self._overlay = executor.overlay_for(spec.jobdir)
        self._pipes: dict[int, int] = {}  # the job's stdout/stderr pipes (read ends) → their log files
        self._thread = threading.Thread(target=self._run, name=f"xwjob-{spec.jobdir.name}", daemon=True)

    # ------------------------------------------------------------------------------------------- public API
    @property
    def pid(self) -> int:
        """Host pid of the sandbox monitor (bubblewrap); its process group is the job's fallback kill target."""
        assert self._proc is not None
        return self._proc.pid

    @property
    def done(self) -> bool:
        """True once the outcome is known."""
        return self._done.is_set()

    def pids(self) -> set[int]:
        """Host pids of every process of the job right now (from its cgroup; just the monitor without one)."""
        if self._cgroup is not None:
            return self._cgroup.pids()
        return set() if self.done else {self.pid}

    def wait(self, timeout: float | None = None) -> JobOutcome:
        """Block until the job and everything it started are gone; raise :class:`TimeoutError` after ``timeout``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job still running after {timeout} s")
        assert self._outcome is not None
        return self._outcome

    def stop(self, reason: str) -> None:
        """Kill the whole job now; the outcome becomes ``ABORTED`` with ``reason`` unless it had already ended."""
        with self._lock:
            if self._done.is_set() or self._proc is None or self._proc.returncode is not None:
                return
            if self._pidfd is not None and select.select([self._pidfd], [], [], 0)[0]:
                return  # the job has just ended by itself: its own outcome stands
            if self._stop_reason is None and not self._timed_out:
                self._stop_reason = reason
        self._kill_tree()

    # ------------------------------------------------------------------------------------------- internals
    def _launch(self) -> None:
        self._setup_cgroup()
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._cleanup_cgroup()
            raise ExecutorError(f"cannot start sandbox: {self._start_error}") from self._start_error

    def _setup_cgroup(self) -> None:
        spec = self.spec
        wanted = {
            "memory": spec.memory_mb is not None,
            "cpu": spec.cpu_quota is not None,
            "procs": spec.max_procs is not None,
        }
        if spec.wallclock is not None:
            self.limits_applied["wallclock"] = True
            self.limits_notes["wallclock"] = f"stopped after {_fmt_s(spec.wallclock)} s"
        if self._ex.use_cgroups:
            try:
                self._cgroup = JobCgroup.create()
            except CgroupError as e:
                why = f"cgroups unavailable: {e}"
            else:
                why = ""
        else:
            why = "cgroups disabled in the worker configuration"
        cg = self._cgroup
        for key, want in wanted.items():
            if not want:
                continue
            if cg is None:
                self.limits_applied[key], self.limits_notes[key] = False, why
            elif key == "memory":
                assert spec.memory_mb is not None
                self.limits_applied[key], self.limits_notes[key] = cg.set_memory_limit(spec.memory_mb << 20)
            elif key == "cpu":
                assert spec.cpu_quota is not None
                self.limits_applied[key], self.limits_notes[key] = cg.set_cpu_quota(spec.cpu_quota)
            else:
                assert spec.max_procs is not None
                self.limits_applied[key], self.limits_notes[key] = cg.set_pids_max(spec.max_procs + _BWRAP_TASKS)

    def _spawn(self) -> None:
        spec = self.spec
        etc_fds = {"passwd": _data_fd(_PASSWD), "group": _data_fd(_GROUP), "hosts": _data_fd(_HOSTS)}
        status_r, status_w = os.pipe()
        gate_r, gate_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._status_r = status_r
        filter_fd = _memfd("xwhep-seccomp", seccomp.setuid_filter()) if seccomp.supported() else None
        if self._overlay is not None:
            self._overlay.create()
        argv = build_bwrap_argv(spec, bwrap=self._ex.bwrap, status_fd=status_w, etc_fds=etc_fds,
                                tmp_size_mb=self._ex.tmp_size_mb, seccomp_fd=filter_fd)
        # bwrap reads its options from a memfd and closes it: none of the host paths they hold is visible in the
        # sandbox (its pid 1 is bwrap, whose /proc/1/cmdline would otherwise show them all). The command itself
        # (the job's own argv) stays on the command line, where bwrap wants it.
        sep = argv.index("--")
        args_fd = _memfd("xwhep-bwrap-args", b"".join(a.encode() + b"\0" for a in argv[1:sep]))
        cmd = [argv[0], "--args", str(args_fd), *argv[sep:]]
        gate = ["/bin/sh", "-c", _GATE_SCRIPT, "xwhep-gate", *cmd]
        cwd = None
        if self._overlay is not None:
            unshare = shutil.which("unshare") or "unshare"
            gate = [unshare, "-Urm", "--", "/bin/sh", "-c", _MOUNT_SCRIPT, "xwhep-gate", self._overlay.options,
                    self._overlay.mnt.name, *cmd]
            cwd = self._overlay.cwd
        passed = [status_w, args_fd, *etc_fds.values()] + ([filter_fd] if filter_fd is not None else [])
        try:
            self._logs = [open(spec.stdout_path, "wb"), open(spec.stderr_path, "wb")]  # noqa: SIM115
            self._pipes = {out_r: self._logs[0].fileno(), err_r: self._logs[1].fileno()}
            self._proc = subprocess.Popen(
                gate,
                stdin=gate_r, stdout=out_w, stderr=err_w, pass_fds=passed, cwd=cwd,
                start_new_session=True, env={"PATH": "/usr/bin:/bin"},
            )
        except BaseException:
            for fd in (status_r, gate_w, out_r, err_r):
                os.close(fd)
            self._pipes = {}
            raise
        finally:
            for fd in (gate_r, out_w, err_w, *passed):
                os.close(fd)
        self._t0 = time.monotonic()
        self._pidfd = os.pidfd_open(self._proc.pid)
        if self._cgroup is not None:
            try:
                self._cgroup.add_pid(self._proc.pid)
            except CgroupError as e:
                # Still sandboxed and killable through the pid namespace; only the limits are lost.
                for key in ("memory", "cpu", "procs"):
                    if key in self.limits_applied:
                        self.limits_applied[key] = False
                        self.limits_notes[key] = str(e)
        try:
            os.write(gate_w, b"go\n")
        except OSError:  # the gate is gone already: the outcome says why
            os.close(gate_w)
            return
        if spec.stdin is None:
            os.close(gate_w)  # no stdin: EOF at once, never the worker's
        else:
            threading.Thread(target=_feed, args=(spec.stdin, gate_w), name=f"xwjob-stdin-{spec.jobdir.name}",
                             daemon=True).start()

    def _run(self) -> None:
        try:
            self._spawn()
        except BaseException as e:
            self._start_error = e
            self._close_logs()
            if self._overlay is not None:
                self._overlay.remove()
            self._started.set()
            return
        self._started.set()
        try:
            self._outcome = self._watch()
        except BaseException as e:  # the worker must always get an outcome
            self._kill_tree()
            self._outcome = self._make("ERROR", None, f"executor failure: {e!r}")
        finally:
            self._reap()
            self._cleanup_cgroup()
            self._close_logs()
            if self._overlay is not None:
                self._overlay.remove()
            with contextlib.suppress(OSError):
                os.close(self._status_r)
            self._done.set()

    def _drain(self, ready: list[int]) -> None:
        """Move what the job wrote to its stdout/stderr pipes into the log files."""
        for fd in ready:
            dst = self._pipes.get(fd)
            if fd not in self._pipes:
                continue
            try:
                n = _move(fd, dst if dst is not None and dst >= 0 else None)
            except OSError:  # e.g. the disk is full: keep reading, so the job never blocks on its output
                self._pipes[fd] = -1
                continue
            if n == 0:
                os.close(fd)
                del self._pipes[fd]

    def _watch(self) -> JobOutcome:
        assert self._pidfd is not None
        spec = self.spec
        deadline = None if spec.wallclock is None else self._t0 + spec.wallclock
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._pidfd, *self._pipes], [], [], remaining)
            if self._pidfd in ready:
                break
            if ready:
                self._drain(ready)
                continue
            with self._lock:
                if self._stop_reason is None:
                    self._timed_out = True
            self._kill_tree()
            deadline = None
        # The monitor has exited but is not reaped yet, so its pid and process group cannot be reused while
        # the leftovers are killed.
        self._kill_tree()
        rc = self._reap()
        until = time.monotonic() + _DRAIN_S  # every writer is dead: the pipes end now
        while self._pipes and time.monotonic() < until:
            ready, _, _ = select.select(list(self._pipes), [], [], max(0.0, until - time.monotonic()))
            self._drain(ready)
        self._close_logs()
        wall = time.monotonic() - self._t0
        exit_code = self._read_exit_code()
        mem = self._cgroup.memory_stats() if self._cgroup is not None else None

        if self._stop_reason is not None:
            return self._make("ABORTED", None, self._stop_reason, wall)
        if self._timed_out:
            assert spec.wallclock is not None
            return self._make("FAILED", None, f"wall-clock limit exceeded ({_fmt_s(spec.wallclock)} s)", wall)
        oom = False
        if mem is not None and spec.memory_mb is not None:
            if mem.oom_kills is not None:
                oom = mem.oom_kills > 0
            else:  # old kernels: no oom_kill counter; a SIGKILL after hitting the limit is the best evidence
                oom = bool(mem.failcnt) and exit_code in (None, 128 + signal.SIGKILL)
        if oom and exit_code != 0:
            return self._make("ERROR", exit_code, f"memory limit exceeded ({spec.memory_mb} MiB)", wall)
        if exit_code is not None:
            reason = f"exited with return code {exit_code}"
            if exit_code > 128 and exit_code - 128 < signal.NSIG:
                reason = f"killed by signal {exit_code - 128} (return code {exit_code})"
            if oom:
                reason += f"; a process was killed for exceeding the memory limit ({spec.memory_mb} MiB)"
            return self._make("COMPLETED", exit_code, reason, wall)
        return self._make("ERROR", None, self._sandbox_failure(rc), wall)

    def _close_logs(self) -> None:
        for fd in list(self._pipes):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pipes = {}
        for f in getattr(self, "_logs", []):
            with contextlib.suppress(OSError):
                f.close()

    def _make(self, status: OutcomeStatus, rc: int | None, reason: str, wall: float | None = None) -> JobOutcome:
        if wall is None:
            wall = time.monotonic() - self._t0 if self._t0 else 0.0
        return JobOutcome(status=status, return_code=rc, reason=reason, stdout=self.spec.stdout_path,
                          stderr=self.spec.stderr_path, limits_applied=dict(self.limits_applied), wall_s=wall,
                          limits_notes=dict(self.limits_notes))

    def _kill_tree(self) -> None:
        with self._lock:
            if self._cgroup is not None:
                self._cgroup.kill_all()
            proc = self._proc
            if proc is None or proc.returncode is not None or self._pidfd is None:
                return
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            # Killing the monitor is enough for the pid namespace (the init inside has PDEATHSIG=KILL, and the
            # kernel kills a namespace whose init dies); the group kill covers a job that never got that far.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _reap(self) -> int | None:
        with self._lock:
            if self._proc is None:
                return None
            rc = self._proc.wait()
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            return rc

    def _read_exit_code(self) -> int | None:
        # Every writer is dead by now, so reading to EOF cannot block for long; select guards against surprises.
        chunks = []
        while select.select([self._status_r], [], [], 1.0)[0]:
            b = os.read(self._status_r, 65536)
            if not b:
                break
            chunks.append(b)
        code = None
        for line in b"".join(chunks).decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and "exit-code" in obj:
                    code = int(obj["exit-code"])
        return code

    def _sandbox_failure(self, rc: int | None) -> str:
        msg = ""
        with contextlib.suppress(OSError), open(self.spec.stderr_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            for line in f.read().decode(errors="replace").splitlines():
                if line.startswith("bwrap:"):
                    msg = line
        if msg:
            return f"sandbox failed: {msg}"
        if rc is not None and rc < 0:
            return f"sandbox killed by signal {-rc}"
        return f"sandbox ended without running the job (rc {rc})"

    def _cleanup_cgroup(self) -> None:
        if self._cgroup is not None:
            self._cgroup.remove()


def live_job_dir(jobdir: Path) -> Path:
    """Where the host reaches a running job's ``/job`` as the job sees it.

    Through the job's overlay, files written into the job dir from the host *during* the run are not seen by the
    job (overlayfs does not revalidate its upper layer; nothing of the worker does that). An operator or a test
    that must hand a running job a file writes it here instead: the overlay, in the job's own mount namespace,
    reached through ``/proc/<pid>/root`` of its sandbox monitor (whose working directory is the job dir's
    parent). Without an overlay (or once the job is over) it is the job dir itself.
    """
    parent = str(jobdir.parent.resolve())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{pid}/cwd") != parent:
                continue
            view = Path(f"/proc/{pid}/root") / jobdir.resolve().relative_to("/")
            if os.path.ismount(view):
                return view
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return jobdir


def measure_overhead(n: int = 20, executor: NativeExecutor | None = None, workdir: Path | None = None) -> float:
    """Mean extra milliseconds a sandboxed ``/bin/true`` costs over a bare ``exec`` of it (n runs each).

    The sandboxed figure includes cgroup creation and removal, i.e. the real per-job cost.
    """
    import tempfile

    executor = executor or NativeExecutor()
    with tempfile.TemporaryDirectory(prefix="xwhep-overhead-", dir=workdir) as tmp:
        jobdir, logdir = Path(tmp, "job"), Path(tmp, "log")
        jobdir.mkdir()
        t = time.perf_counter()
        for _ in range(n):
            subprocess.run(["/bin/true"], check=True)
        bare = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for _ in range(n):
            out = executor.start(JobSpec(jobdir=jobdir, logdir=logdir, argv=["/bin/true"])).wait()
            if out.status != "COMPLETED" or out.return_code != 0:
                raise ExecutorError(f"sandboxed /bin/true failed: {out.reason}")
        boxed = (time.perf_counter() - t) / n
    return (boxed - bare) * 1000.0
