"""The podman executor: a job runs in a container made from an image tarball, with no network at all.

* **Images** come from the worker's blob cache as tarballs, never from a registry: a root filesystem tar
  (``podman import``) or an image archive (``podman load``: docker-archive or oci-archive). Each is tagged
  ``localhost/xwhep:sha256-<digest>`` after its content, so it is imported once per worker and reused.
* **Runtime**: runc, through the ``containers.conf`` shipped beside this module (``CONTAINERS_CONF``; crun fails
  on hybrid cgroup v1 hosts). Only podman's own command line is used: no daemon, no socket.
* **Confinement**: ``--network=none`` (the container's network namespace holds only ``lo``), a read-only root
  filesystem with a private ``/tmp``, every capability dropped, ``no-new-privileges``, the job's uid (not root),
  ``--cpus``/``--pids-limit`` from the job's limits. The job dir is the only host directory it sees, at ``/job``
  (its working directory and ``$HOME``).
* **Memory**: the container goes under a cgroup parent made per job (``--cgroup-parent``) that carries the job's
  memory limit, so that the worker can tell an out-of-memory kill from any other end (the limit's hit count) and
  remove everything afterwards.
* **Ownership**: the job dir is given to the job's uid for the run and back to the worker after it (the
  container's files are the worker's again, as a native job's are).

Outcomes follow the native executor: exit code → ``COMPLETED``; wall clock → ``FAILED``; :meth:`PodmanJob.stop`
→ ``ABORTED``; out of memory or podman failing → ``ERROR``. Nothing is left: the container runs with ``--rm``,
the executor removes it again (``podman rm -f``) on a kill, then removes its cgroup parent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

from xwhep.worker.cgroups import Hierarchy, discover
from xwhep.worker.executors.base import ContainerSpec, ExecutorError, JobOutcome, JobSpec, OutcomeStatus

__all__ = ["CONTAINERS_CONF", "PodmanExecutor", "PodmanJob", "image_ref"]

CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
JOB_UID = 1000
JOB_GID = 1000
PARENT_PREFIX = "xwhep-pod-"
_CHUNK = 1 << 20


def image_ref(sha256: str) -> str:
    """The local name of the image whose tarball has this sha256."""
    return f"localhost/xwhep:sha256-{sha256}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(_CHUNK):
            h.update(b)
    return h.hexdigest()


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(dirpath, name), uid, gid)


class PodmanExecutor:
    """Runs container jobs (``JobSpec.container``) with podman.

    ``uid``/``gid``: who the job is inside the container and, for the run, owner of its job dir (pick ids no
    host account uses). Podman runs as the worker; the worker needs to be root for the cgroup parent and the
    ownership hand-over (a rootless worker would use podman's own user namespace instead: not done yet).
    """

    name = "podman"

    def __init__(self, *, podman: str = "podman", conf: Path = CONTAINERS_CONF, uid: int = JOB_UID,
                 gid: int = JOB_GID, tmp_size_mb: int = 256) -> None:
        self.podman = podman
        self.conf = conf
        self.uid = uid
        self.gid = gid
        self.tmp_size_mb = tmp_size_mb
        self._images: set[str] = set()  # refs known to be in the local store (saves a podman call per job)
        self._image_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def env(self) -> dict[str, str]:
        """The environment podman runs with (its configuration is ours only)."""
        return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "CONTAINERS_CONF": str(self.conf), "HOME": os.environ.get("HOME", "/root")}

    def available(self) -> tuple[bool, str]:
        """Whether podman (and runc) are installed and the worker may run them as needed."""
        for tool in (self.podman, "runc"):
            if shutil.which(tool) is None:
                return False, f"{tool} not found on PATH"
        if os.geteuid() != 0:
            return False, "the podman executor needs a root worker (cgroup parent, job dir hand-over)"
        if _memory_hierarchy() is None:
            return False, "no cgroup memory controller"
        return True, shutil.which(self.podman) or self.podman

    def _podman(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.podman, *args], capture_output=True, text=True, timeout=timeout, check=False,
                              env=self.env(), stdin=subprocess.DEVNULL)

    def ensure_image(self, c: ContainerSpec) -> str:
        """The local name of ``c``'s image, imported or loaded from its tarball if not there yet."""
        sha = c.image_sha256 or _sha256(c.image)
        ref = image_ref(sha)
        if ref in self._images:
            return ref
        with self._lock:
            lock = self._image_locks.setdefault(ref, threading.Lock())
        with lock:
            if ref in self._images:
                return ref
            if self._podman("image", "exists", ref).returncode != 0:
                if c.image_sha256 is not None and _sha256(c.image) != c.image_sha256:
                    raise ExecutorError(f"image {c.image} does not match its sha256 {c.image_sha256}")
                if c.image_format == "rootfs":
                    proc = self._podman("import", "--quiet", str(c.image), ref, timeout=1800)
                else:
                    proc = self._podman("load", "--quiet", "--input", str(c.image), timeout=1800)
                    if proc.returncode == 0:
                        loaded = [line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                                  if line.startswith("Loaded image")]
                        if len(loaded) != 1:
                            raise ExecutorError(f"image archive {c.image} holds {len(loaded)} images, not one")
                        proc = self._podman("tag", loaded[0].split(",")[0].strip(), ref)
                if proc.returncode != 0:
                    raise ExecutorError(f"cannot import image {c.image}: {proc.stderr.strip()[-400:]}")
            self._images.add(ref)
        return ref

    def _validate(self, spec: JobSpec) -> ContainerSpec:
        c = spec.container
        if c is None:
            raise ExecutorError("not a container job (JobSpec.container is not set)")
        if spec.vm is not None:
            raise ExecutorError("a job is a VM or a container, not both")
        if c.image_format not in ("rootfs", "archive"):
            raise ExecutorError(f"image format must be rootfs or archive, not {c.image_format!r}")
        if not c.image.is_file():
            raise ExecutorError(f"image {c.image} does not exist")
        if not spec.argv or not spec.argv[0]:
            raise ExecutorError("empty argv")
        if not spec.jobdir.is_dir():
            raise ExecutorError(f"job dir {spec.jobdir} does not exist")
        job, log = spec.jobdir.resolve(), spec.logdir.resolve()
        if log == job or job in log.parents:
            raise ExecutorError(f"log dir {spec.logdir} must be outside the job dir {spec.jobdir}")
        spec.logdir.mkdir(parents=True, exist_ok=True)
        if spec.stdin is not None and not spec.stdin.is_file():
            raise ExecutorError(f"stdin file {spec.stdin} does not exist")
        if spec.unix_socket_dir is not None:
            raise ExecutorError("tunnels to container jobs are not supported yet")
        for k, v in spec.env.items():
            if not k or "=" in k or "\0" in k or "\0" in v:
                raise ExecutorError(f"bad environment variable {k!r}")
        for what, value in (("wall-clock limit", spec.wallclock), ("memory limit", spec.memory_mb),
                            ("cpu quota", spec.cpu_quota), ("process limit", spec.max_procs)):
            if value is not None and value <= 0:
                raise ExecutorError(f"{what} must be positive")
        return c

    def start(self, spec: JobSpec) -> PodmanJob:
        """Start the container job ``spec`` and return at once (the image is imported first if needed)."""
        ok, why = self.available()
        if not ok:
            raise ExecutorError(why)
        c = self._validate(spec)
        ref = self.ensure_image(c)
        job = PodmanJob(spec, ref, self)
        job._launch()
        return job

    def run_argv(self, spec: JobSpec, ref: str, name: str, parent: str | None) -> list[str]:
        """The ``podman run`` command line of ``spec`` (see the module docstring)."""
        a = [self.podman, "run", "--rm", "--name", name, "--network=none", "--hostname", "xwjob",
             "--user", f"{self.uid}:{self.gid}", "--read-only", "--read-only-tmpfs=false",
             "--tmpfs", f"/tmp:rw,nosuid,nodev,size={self.tmp_size_mb}m", "--cap-drop=all",
             "--security-opt=no-new-privileges", "--log-driver=none", "--pull=never",
             "-v", f"{spec.jobdir.resolve()}:/job:rw", "--workdir", "/job", "--env", "HOME=/job"]
        if parent is not None:
            a += ["--cgroup-parent", parent]
        if spec.cpu_quota is not None:
            a += ["--cpus", f"{spec.cpu_quota:g}"]
        if spec.max_procs is not None:
            a += ["--pids-limit", str(spec.max_procs + 1)]  # + the runtime's own init of the container
        if spec.stdin is not None:
            a += ["--interactive"]
        for k, v in spec.env.items():
            a += ["--env", f"{k}={v}"]
        return [*a, ref, *spec.argv]


def _memory_hierarchy() -> Hierarchy | None:
    try:
        hs = discover()
    except OSError:
        return None
    for h in hs:
        if h.version == 1 and "memory" in h.controllers:
            return h
    for h in hs:
        if h.version == 2 and "memory" in h.controllers:
            return h
    return None


def _rmdir_tree(d: Path, timeout: float = 10.0) -> bool:
    """Remove cgroup directory ``d`` and its children (podman leaves ``conmon`` there), once they are empty."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for child in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                child.rmdir()
            d.rmdir()
            return True
        except FileNotFoundError:
            if not d.exists():
                return True
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
        time.sleep(0.01)  # conmon leaves its cgroup a moment after the container: v1 gives no event for it


class PodmanJob:
    """A container job; a watcher thread runs ``podman run`` and hands the job dir back afterwards."""

    def __init__(self, spec: JobSpec, ref: str, executor: PodmanExecutor) -> None:
        self.spec = spec
        self.ref = ref
        self._ex = executor
        self.name = f"xwjob-{uuid.uuid4().hex[:16]}"
        self.parent = f"/{PARENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.limits_applied: dict[str, bool] = {}
        self.limits_notes: dict[str, str] = {}
        self._memory_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._t0 = 0.0
        self._lock = threading.Lock()
        self._stop_reason: str | None = None
        self._timed_out = False
        self._kill_requested = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # stop() wakes the watcher through it
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._done = threading.Event()
        self._outcome: JobOutcome | None = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    @property
    def pid(self) -> int:
        """Host pid of the ``podman run`` client."""
        assert self._proc is not None
        return self._proc.pid

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> JobOutcome:
        """Block until the container is gone; raise :class:`TimeoutError` after ``timeout``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"container job still running after {timeout} s")
        assert self._outcome is not None
        return self._outcome

    def stop(self, reason: str) -> None:
        """Kill the container now; the outcome becomes ``ABORTED`` with ``reason`` (if it was still running)."""
        with self._lock:
            if self._done.is_set() or (self._proc is not None and self._proc.poll() is not None):
                return
            if self._stop_reason is None and not self._timed_out:
                self._stop_reason = reason
        self._kill_requested.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ----------------------------------------------------------------------------------------------------------
    def _launch(self) -> None:
        self._setup_limits()
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._cleanup()
            raise ExecutorError(f"cannot start podman: {self._start_error}") from self._start_error

    def _setup_limits(self) -> None:
        spec = self.spec
        if spec.wallclock is not None:
            self.limits_applied["wallclock"] = True
            self.limits_notes["wallclock"] = f"stopped after {spec.wallclock:g} s"
        if spec.cpu_quota is not None:
            self.limits_applied["cpu"], self.limits_notes["cpu"] = True, f"podman --cpus {spec.cpu_quota:g}"
        if spec.max_procs is not None:
            self.limits_applied["procs"] = True
            self.limits_notes["procs"] = f"podman --pids-limit {spec.max_procs + 1}"
        h = _memory_hierarchy()
        assert h is not None  # checked by available()
        d = h.mountpoint / self.parent.lstrip("/")
        d.mkdir()
        self._memory_dir = d
        if spec.memory_mb is None:
            return
        nbytes = spec.memory_mb << 20
        try:
            if h.version == 1:
                (d / "memory.limit_in_bytes").write_text(str(nbytes))
                if (d / "memory.memsw.limit_in_bytes").exists():
                    (d / "memory.memsw.limit_in_bytes").write_text(str(nbytes))
            else:
                (d / "memory.max").write_text(str(nbytes))
                if (d / "memory.swap.max").exists():
                    (d / "memory.swap.max").write_text("0")
        except OSError as e:
            self.limits_applied["memory"], self.limits_notes["memory"] = False, f"cannot limit memory: {e}"
        else:
            self.limits_applied["memory"] = True
            self.limits_notes["memory"] = f"memory limited to {spec.memory_mb} MiB"

    def _oom(self) -> bool:
        d = self._memory_dir
        if d is None:
            return False
        with contextlib.suppress(OSError, ValueError):
            if (d / "memory.events").exists():
                events = dict(line.split() for line in (d / "memory.events").read_text().splitlines())
                return int(events.get("oom_kill", 0)) > 0
            # cgroup v1 counts OOM kills in the container's own cgroup (gone with it), and recent kernels keep
            # the limit's hit counts (failcnt) at 0 there: a peak at the limit with a SIGKILL is the evidence
            limit = int((d / "memory.limit_in_bytes").read_text())
            peak = max(int((d / f).read_text()) for f in ("memory.max_usage_in_bytes",
                                                            "memory.memsw.max_usage_in_bytes") if (d / f).exists())
            hits = sum(int((d / f).read_text()) for f in ("memory.failcnt", "memory.memsw.failcnt")
                       if (d / f).exists())
            return hits > 0 or peak >= limit - (256 << 10)
        return False

    def _run(self) -> None:
        spec = self.spec
        try:
            _chown_tree(spec.jobdir, self._ex.uid, self._ex.gid)
            argv = self._ex.run_argv(spec, self.ref, self.name, self.parent)
            stdin = open(spec.stdin, "rb") if spec.stdin is not None else subprocess.DEVNULL  # noqa: SIM115
            try:
                with open(spec.stdout_path, "wb") as out, open(spec.stderr_path, "wb") as err:
                    self._proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=err,
                                                  start_new_session=True, env=self._ex.env())
            finally:
                if not isinstance(stdin, int):
                    stdin.close()
            self._t0 = time.monotonic()
        except BaseException as e:
            self._start_error = e
            self._started.set()
            return
        self._started.set()
        try:
            self._outcome = self._watch()
        except BaseException as e:  # the worker must always get an outcome
            self._force_remove()
            self._outcome = self._make("ERROR", None, f"executor failure: {e!r}")
        finally:
            self._cleanup()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._done.set()

    def _watch(self) -> JobOutcome:
        assert self._proc is not None
        spec = self.spec
        deadline = None if spec.wallclock is None else self._t0 + spec.wallclock
        pidfd = os.pidfd_open(self._proc.pid)
        try:
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([pidfd, self._wake_r], [], [], remaining)
                if pidfd in ready or self._kill_requested.is_set():
                    break
                if not ready:  # out of time
                    with self._lock:
                        if self._stop_reason is None:
                            self._timed_out = True
                    break
        finally:
            os.close(pidfd)
        if self._proc.poll() is None:  # stopped or out of time: the container dies, then podman run returns
            self._force_remove()
        rc = self._proc.wait()
        wall = time.monotonic() - self._t0
        if self._stop_reason is not None:
            return self._make("ABORTED", None, self._stop_reason, wall)
        if self._timed_out:
            assert spec.wallclock is not None
            return self._make("FAILED", None, f"wall-clock limit exceeded ({spec.wallclock:g} s)", wall)
        if rc == 137 and spec.memory_mb is not None and self._oom():
            return self._make("ERROR", rc, f"memory limit exceeded ({spec.memory_mb} MiB)", wall)
        last = _last_line(spec.stderr_path)
        if rc in (125, 126, 127) and last.startswith("Error: "):
            # podman's own failure (125), or the runtime could not run the command (126, 127): as with the native
            # sandbox, the job never ran. (A job printing "Error: …" and exiting with one of these codes is taken
            # for that too: only its own report suffers.)
            return self._make("ERROR", None, f"podman failed: {last[7:][-400:]}", wall)
        reason = f"exited with return code {rc}"
        if rc > 128 and rc - 128 < signal.NSIG:
            reason = f"killed by signal {rc - 128} (return code {rc})"
        return self._make("COMPLETED", rc, reason, wall)

    def _force_remove(self) -> None:
        assert self._proc is not None
        # until podman run has returned: the container may only be created after a first removal
        deadline = time.monotonic() + 60
        while self._proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self._ex._podman("rm", "--force", "--time", "0", self.name, timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(0.5)
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def _make(self, status: OutcomeStatus, rc: int | None, reason: str, wall: float | None = None) -> JobOutcome:
        if wall is None:
            wall = time.monotonic() - self._t0 if self._t0 else 0.0
        return JobOutcome(status=status, return_code=rc, reason=reason, stdout=self.spec.stdout_path,
                          stderr=self.spec.stderr_path, limits_applied=dict(self.limits_applied), wall_s=wall,
                          limits_notes=dict(self.limits_notes))

    def _cleanup(self) -> None:
        spec = self.spec
        with contextlib.suppress(OSError):
            _chown_tree(spec.jobdir, os.geteuid(), os.getegid())
        if self._proc is not None and self._proc.returncode is None:
            self._proc.wait()
        # a container that did start is gone with --rm; this catches one killed before podman could remove it
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            if self._stop_reason is not None or self._timed_out:
                self._ex._podman("rm", "--force", "--ignore", self.name, timeout=60)
        h = _memory_hierarchy()
        if h is None:
            return
        for hh in discover():
            base = hh.mountpoint / self.parent.lstrip("/")
            if base.exists():
                _rmdir_tree(base)


def _last_line(path: Path, n: int = 1000) -> str:
    """The last non-blank line of the file's last ``n`` bytes ("" if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""
