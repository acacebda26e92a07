"""The QEMU executor: a job is a virtual machine booted by ``qemu-system-x86_64``, confined on the host.

What a run is (see :mod:`xwhep.vm` for the guest's side):

1. *Prepare* (in a private run dir beside the job dir, ``.xwvm-*``): the job disk from the job dir, stdin and the
   job's command, environment and contextualization (its result area past the filesystem), and for a template
   disk a copy-on-write overlay of it (``qemu-img create -b``, run in the sandbox below: the template is read
   only there) and the NoCloud seed its cloud-init reads.
2. *Boot* QEMU in a bubblewrap sandbox that sees ``/usr`` read-only, the kernel/initrd/template read-only, the run
   dir, the tunnel socket dir if any, and nothing else of the host (no other job, no worker file, no ``/etc``);
   all namespaces unshared, so its network namespace holds only ``lo``; inside its own cgroup (memory = VM memory
   + :attr:`QemuExecutor.overhead_mb`, the CPU quota of the job, a task limit); QEMU's own seccomp filter on
   (``-sandbox on,…,spawn=deny``: no exec, no fork, no new namespace). The guest gets a NIC only if the job has
   listen ports: QEMU user networking with ``restrict=on`` (the guest reaches nothing, not even the host) and one
   ``hostfwd`` per port, bound on the sandbox's own loopback, where the tunnel forwarder
   (:mod:`xwhep.worker.xwfwd`, run in the sandbox as QEMU's parent) connects when a stream arrives.
3. *Collect*: after a clean power-off, the job disk's result stream is read (:func:`xwhep.vm.guestio.read_results`):
   new and changed files into the job dir, the guest's stdout/stderr into the log dir, its exit code; the worker
   then packs them like a native job's.
4. *Clean*: the run dir (overlay, job disk, seed) and the cgroup are removed whatever happened: nothing is left.

Outcomes: the guest's exit code → ``COMPLETED``; the wall clock (over the whole VM, boot included) → ``FAILED``;
:meth:`QemuJob.stop` → ``ABORTED``; anything else (QEMU failed, the guest wrote no result, out of memory) →
``ERROR`` with the reason and the console's last lines.

Accelerator: KVM is used only if a probe really boots with it (``/dev/kvm`` may exist and still not work, as on
this project's build machines); else TCG. :meth:`QemuExecutor.probe` caches its answer in the worker's workdir and
gives what the worker declares (hypervisor, accel, max memory and CPUs, version).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil

from xwhep.vm import guestio
from xwhep.worker.cgroups import CgroupError, JobCgroup
from xwhep.worker.executors.base import ExecutorError, JobOutcome, JobSpec, OutcomeStatus, VmSpec

__all__ = ["QemuExecutor", "QemuJob", "split_forwarder"]

XWFWD = Path(__file__).resolve().parent.parent / "xwfwd.py"
SOCKETS_MOUNT = "/xw/sockets"
PROBE_FILE = "vm-probe.json"
KVM_PROBE_TIMEOUT = 15.0  # a KVM boot of the minimal image takes about a second where KVM works
TCG_PROBE_TIMEOUT = 120.0
TCG_TB_MB = 128  # TCG's translation cache (QEMU's default is 1 GiB): counted in the VM's overhead
OVERHEAD_MB = 320  # QEMU's own memory beyond the guest's (measured ~150-200 MiB with TCG), plus the forwarder
HOST_TASKS = 64  # threads QEMU (vCPUs, I/O workers), bwrap and the forwarder may have on the host
CONSOLE_TAIL = 64 << 10
GUEST_PREFIX = "xwhep-guest: "
_GATE_SCRIPT = 'read _ || exit 125; exec 0</dev/null || exit 126; exec "$@"'


def split_forwarder(argv: list[str]) -> tuple[list[int], list[int], list[str]]:
    """(listen ports, forward ports, command) of ``argv``; an argv that the tunnel layer wrapped in its forwarder
    (``python3 -I -S …/xwfwd.py --sockets … [--listen …] [--forward …] -- COMMAND``) is unwrapped, any other is
    returned as is with no ports. The VM executors run the forwarder themselves, around the hypervisor."""
    if len(argv) > 4 and argv[3].endswith("/xwfwd.py") and "--" in argv:
        from xwhep.worker.xwfwd import parse

        _, listen, forward, command = parse(argv[4:])
        return listen, forward, command
    return [], [], list(argv)


def _system_binds() -> list[str]:
    a = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib64"):
        if os.path.islink(top):
            a += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            a += ["--ro-bind", top, top]
    # the dynamic loader's cache: QEMU links ~100 libraries, the cache saves a search through /usr/lib for each
    return [*a, "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]


def _qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else ""


class QemuExecutor:
    """Runs VM jobs (``JobSpec.vm``) in QEMU.

    ``workdir`` keeps the accelerator probe's answer. ``accel`` is ``"auto"`` (the probe decides), ``"kvm"`` or
    ``"tcg"``. ``probe_kernel``/``probe_initrd`` boot the probe (the minimal image of :mod:`xwhep.vm.images`;
    built there when not given). ``overhead_mb`` is QEMU's memory beyond the guest's, allowed in its cgroup.
    """

    name = "qemu"

    def __init__(self, workdir: Path, *, accel: str = "auto", bwrap: str = "bwrap",
                 qemu: str = "qemu-system-x86_64", qemu_img: str = "qemu-img", use_cgroups: bool = True,
                 probe_kernel: Path | None = None, probe_initrd: Path | None = None, overhead_mb: int = OVERHEAD_MB,
                 max_memory_mb: int | None = None, max_cpus: int | None = None) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel must be auto, kvm or tcg, not {accel!r}")
        self.workdir = workdir
        self.accel = accel
        self.bwrap = bwrap
        self.qemu = qemu
        self.qemu_img = qemu_img
        self.use_cgroups = use_cgroups
        self.probe_kernel = probe_kernel
        self.probe_initrd = probe_initrd
        self.overhead_mb = overhead_mb
        self.max_memory_mb = max_memory_mb
        self.max_cpus = max_cpus
        self._probe_lock = threading.Lock()
        self._probed: dict[str, Any] | None = None

    # -------------------------------------------------------------------------------------------- capabilities
    def available(self) -> tuple[bool, str]:
        """Whether QEMU, qemu-img, bubblewrap and the disk tools are installed."""
        for tool in (self.qemu, self.qemu_img, self.bwrap, "mkfs.ext4", "genisoimage"):
            if shutil.which(tool) is None:
                return False, f"{tool} not found on PATH"
        return True, shutil.which(self.qemu) or self.qemu

    def limits(self) -> tuple[int, int]:
        """(max memory MiB, max CPUs) a VM may get here."""
        total = psutil.virtual_memory().total >> 20
        mem = max(0, total - self.overhead_mb - 512)  # the host keeps half a GiB for itself and the worker
        if self.max_memory_mb is not None:
            mem = min(mem, self.max_memory_mb)
        cpus = os.cpu_count() or 1
        if self.max_cpus is not None:
            cpus = min(cpus, self.max_cpus)
        return mem, cpus

    def probe(self, force: bool = False) -> dict[str, Any]:
        """What this worker declares for VM jobs: ``{"hypervisor": "qemu", "accel": "kvm"|"tcg"|None,
        "max_memory_mb", "max_cpus", "version", "kvm": why KVM is (not) used}``.

        The accelerator is found by booting the probe kernel for real (KVM first, with a short deadline; TCG
        then); the answer is cached in ``workdir/vm-probe.json`` for this QEMU version and probe kernel.
        """
        with self._probe_lock:
            mem, cpus = self.limits()
            version = _qemu_version(self.qemu)
            kernel, initrd = self._probe_image()
            key = {"qemu": version, "kernel": f"{kernel}:{kernel.stat().st_size}:{kernel.stat().st_mtime_ns}",
                   "initrd": f"{initrd}:{initrd.stat().st_size}:{initrd.stat().st_mtime_ns}",
                   "kvm_device": os.path.exists("/dev/kvm")}
            cache = self.workdir / PROBE_FILE
            found: dict[str, Any] | None = None
            if not force and self._probed is None:
                with contextlib.suppress(OSError, ValueError):
                    doc = json.loads(cache.read_text())
                    if doc.get("key") == key:
                        found = doc["result"]
            elif not force:
                found = self._probed
            if found is None:
                found = self._boot_probes(kernel, initrd)
                self.workdir.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
                tmp.write_text(json.dumps({"key": key, "result": found}, indent=1) + "\n")
                os.replace(tmp, cache)
            self._probed = found
            return {"hypervisor": "qemu", "accel": found["accel"], "kvm": found["kvm"], "max_memory_mb": mem,
                    "max_cpus": cpus, "version": version}

    def _probe_image(self) -> tuple[Path, Path]:
        if self.probe_kernel is not None and self.probe_initrd is not None:
            return self.probe_kernel, self.probe_initrd
        from xwhep.vm.images import ImageError, build_minimal

        try:
            image = build_minimal()
        except ImageError as e:
            raise ExecutorError(f"no image to probe the accelerator with: {e}") from e
        self.probe_kernel, self.probe_initrd = image.kernel, image.initrd
        return image.kernel, image.initrd

    def _boot_probes(self, kernel: Path, initrd: Path) -> dict[str, Any]:
        kvm_note = "no /dev/kvm"
        if os.path.exists("/dev/kvm"):
            ok, why = self._boot_probe("kvm", kernel, initrd, KVM_PROBE_TIMEOUT)
            if ok:
                return {"accel": "kvm", "kvm": "a probe VM booted with KVM"}
            kvm_note = f"/dev/kvm is there but a probe VM did not boot with it: {why}"
        ok, why = self._boot_probe("tcg", kernel, initrd, TCG_PROBE_TIMEOUT)
        return {"accel": "tcg" if ok else None, "kvm": kvm_note, **({} if ok else {"tcg": why})}

    def _boot_probe(self, accel: str, kernel: Path, initrd: Path, timeout: float) -> tuple[bool, str]:
        with tempfile.TemporaryDirectory(prefix=".xwvm-probe-", dir=self.workdir if self.workdir.is_dir() else None) \
                as run:
            binds = {"/vm/kernel": kernel, "/vm/initrd": initrd}
            qemu = self._qemu_argv(accel, 1, 128, "/vm/kernel", "/vm/initrd",
                                   "console=ttyS0 quiet panic=-1 xw.probe", [], [], None)
            argv = self._bwrap_argv(Path(run), binds, None, accel, privileged_ports=False) + qemu
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                return False, str(e)
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                return False, f"no power-off within {timeout:g} s"
        text = out.decode(errors="replace")
        if proc.returncode == 0 and f"{GUEST_PREFIX}probe-ok" in text:
            return True, ""
        tail = " | ".join(line.strip() for line in text.strip().splitlines()[-3:])
        return False, f"exit {proc.returncode}: {tail[-300:]}"

    def resolve_accel(self) -> str:
        """The accelerator jobs use: the configured one, or the probe's."""
        if self.accel != "auto":
            return self.accel
        accel = self.probe()["accel"]
        if accel is None:
            raise ExecutorError("QEMU boots with no accelerator here (see the worker's vm-probe.json)")
        return str(accel)

    # -------------------------------------------------------------------------------------------- command lines
    def _bwrap_argv(self, run: Path, ro: dict[str, Path], sockdir: Path | None, accel: str,
                    privileged_ports: bool) -> list[str]:
        a = [self.bwrap, "--unshare-all", "--unshare-user"]
        if privileged_ports:
            # Binding a guest's port < 1024 on the sandbox's loopback needs CAP_NET_BIND_SERVICE in the user
            # namespace owning that network namespace, so no nested namespace (--disable-userns) here; QEMU's
            # seccomp filter (spawn=deny) forbids it new namespaces anyway.
            a += ["--uid", "0", "--gid", "0", "--cap-drop", "ALL", "--cap-add", "CAP_NET_BIND_SERVICE"]
        else:
            a += ["--uid", "1000", "--gid", "1000", "--disable-userns", "--cap-drop", "ALL"]
        a += ["--die-with-parent", "--new-session", "--hostname", "xwvm", *_system_binds()]
        a += ["--proc", "/proc", "--dev", "/dev", "--size", str(16 << 20), "--tmpfs", "/tmp"]
        if accel == "kvm":
            a += ["--dev-bind", "/dev/kvm", "/dev/kvm"]
        for inside, host in ro.items():
            a += ["--ro-bind", str(host.resolve()), inside]
        a += ["--bind", str(run.resolve()), "/vm/run"]
        if sockdir is not None:
            a += ["--bind", str(sockdir.resolve()), SOCKETS_MOUNT, "--ro-bind", str(XWFWD), "/xw/xwfwd.py"]
        a += ["--remount-ro", "/", "--chdir", "/vm/run", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
              "--setenv", "HOME", "/vm/run", "--setenv", "TMPDIR", "/vm/run", "--"]
        return a

    def _qemu_argv(self, accel: str, cpus: int, memory_mb: int, kernel: str | None, initrd: str | None,
                   append: str, drives: list[tuple[str, str, bool]], ports: list[int], name: str | None,
                   rng: bool = False) -> list[str]:
        q = [self.qemu, "-name", name or "xwvm", "-nodefaults", "-no-user-config", "-display", "none",
             "-serial", "stdio", "-no-reboot", "-m", str(memory_mb), "-smp", str(cpus)]
        q += ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", f"tcg,tb-size={TCG_TB_MB}"]
        if kernel is not None:
            q += ["-kernel", kernel, "-append", append]
            if initrd is not None:
                q += ["-initrd", initrd]
        for i, (path, fmt, readonly) in enumerate(drives):
            # cache=unsafe: every disk here is thrown away or read after QEMU has exited (its writes are in the
            # host's page cache by then); the guest's flushes would only cost time
            opts = f"file={path},if=none,id=d{i},format={fmt},cache=unsafe" + (",readonly=on" if readonly else "")
            q += ["-drive", opts, "-device", f"virtio-blk-pci,drive=d{i}"]
        if rng:  # entropy for a distro guest (sshd's host keys) without waiting; a direct boot needs none
            q += ["-device", "virtio-rng-pci"]
        if ports:
            fwd = "".join(f",hostfwd=tcp:127.0.0.1:{p}-:{p}" for p in ports)
            q += ["-netdev", f"user,id=n0,restrict=on{fwd}",
                  "-device", f"virtio-net-pci,netdev=n0,mac={guestio.GUEST_MAC}"]
        q += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        return q

    # -------------------------------------------------------------------------------------------- jobs
    def _validate(self, spec: JobSpec) -> tuple[VmSpec, list[int], list[str]]:
        vm = spec.vm
        if vm is None:
            raise ExecutorError("not a VM job (JobSpec.vm is not set)")
        if spec.container is not None:
            raise ExecutorError("a job is a VM or a container, not both")
        listen, forward, command = split_forwarder(spec.argv)
        if forward:
            raise ExecutorError("forward addresses are not supported for VM jobs (the guest has no way out)")
        ports = sorted(set(listen) | set(vm.listen_ports))
        if not command or not command[0]:
            raise ExecutorError("empty argv")
        if not spec.jobdir.is_dir():
            raise ExecutorError(f"job dir {spec.jobdir} does not exist")
        job, log = spec.jobdir.resolve(), spec.logdir.resolve()
        if log == job or job in log.parents:
            raise ExecutorError(f"log dir {spec.logdir} must be outside the job dir {spec.jobdir}")
        spec.logdir.mkdir(parents=True, exist_ok=True)
        if spec.stdin is not None and not spec.stdin.is_file():
            raise ExecutorError(f"stdin file {spec.stdin} does not exist")
        if vm.kernel is None and vm.disk is None:
            raise ExecutorError("a VM needs a kernel or a disk to boot")
        if vm.initrd is not None and vm.kernel is None:
            raise ExecutorError("an initrd needs a kernel")
        for what, p in (("kernel", vm.kernel), ("initrd", vm.initrd), ("disk", vm.disk)):
            if p is not None and not p.is_file():
                raise ExecutorError(f"VM {what} {p} does not exist")
        if vm.disk_format not in ("qcow2", "raw", "vdi", "vmdk"):
            raise ExecutorError(f"VM disk format must be qcow2, raw, vdi or vmdk, not {vm.disk_format!r}")
        mem, cpus = self.limits()
        if vm.cpus < 1 or vm.cpus > cpus:
            raise ExecutorError(f"VM cpus must be 1..{cpus} here, not {vm.cpus}")
        if vm.memory_mb < 64 or vm.memory_mb > mem:
            raise ExecutorError(f"VM memory must be 64..{mem} MiB here, not {vm.memory_mb}")
        if spec.memory_mb is not None and vm.memory_mb > spec.memory_mb:
            raise ExecutorError(f"VM memory {vm.memory_mb} MiB is more than a job may use here ({spec.memory_mb})")
        if vm.disk_mb < 1:
            raise ExecutorError("VM disk size must be positive")
        for port in ports:
            if not 1 <= port <= 65535:
                raise ExecutorError(f"bad listen port {port}")
        if ports and spec.unix_socket_dir is None:
            raise ExecutorError("listen ports need the tunnel socket dir (JobSpec.unix_socket_dir)")
        if spec.unix_socket_dir is not None and not spec.unix_socket_dir.is_dir():
            raise ExecutorError(f"socket dir {spec.unix_socket_dir} does not exist")
        if spec.wallclock is not None and spec.wallclock <= 0:
            raise ExecutorError("wall-clock limit must be positive")
        if spec.cpu_quota is not None and spec.cpu_quota <= 0:
            raise ExecutorError("cpu quota must be positive")
        try:
            guestio.run_script(command, spec.env, False)
        except guestio.GuestIOError as e:
            raise ExecutorError(str(e)) from None
        return vm, ports, command

    def start(self, spec: JobSpec) -> QemuJob:
        """Start the VM job ``spec`` and return at once (preparation and boot go on in the job's thread)."""
        ok, why = self.available()
        if not ok:
            raise ExecutorError(why)
        vm, ports, command = self._validate(spec)
        accel = self.resolve_accel()
        job = QemuJob(spec, vm, ports, command, accel, self)
        job._launch()
        return job


class _Console:
    """Drains QEMU's serial console (its stdout) and stderr: keeps their tails, timestamps the agent's lines."""

    def __init__(self, out_fd: int, err_fd: int, t0: float) -> None:
        self.t0 = t0
        self.events: dict[str, float] = {}
        self.lines: deque[str] = deque(maxlen=200)
        self.errors = bytearray()
        self._partial = b""
        self._cond = threading.Condition()
        self._closed = False
        self._fds = {out_fd: "out", err_fd: "err"}
        self._thread = threading.Thread(target=self._run, name="xwvm-console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fds = dict(self._fds)
        try:
            while fds:
                ready, _, _ = select.select(list(fds), [], [])
                for fd in ready:
                    data = os.read(fd, 65536)
                    if not data:
                        del fds[fd]
                        os.close(fd)
                    elif fds[fd] == "err":
                        self.errors += data
                        del self.errors[:-8192]
                    else:
                        self._console(data)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def wait_for(self, event: str, timeout: float) -> float | None:
        """Seconds since boot at which the guest said ``event``; None if the console ended or ``timeout`` passed
        first."""
        with self._cond:
            self._cond.wait_for(lambda: event in self.events or self._closed, timeout)
            return self.events.get(event)

    def _console(self, data: bytes) -> None:
        now = time.monotonic() - self.t0
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        self._partial = self._partial[-4096:]
        for raw in complete:
            line = raw.decode(errors="replace").rstrip("\r")
            self.lines.append(f"{now:8.3f} {line[:500]}")  # the host's seconds since QEMU started
            i = line.find(GUEST_PREFIX)
            if i >= 0:
                word = line[i + len(GUEST_PREFIX):].split(" ", 1)[0].rstrip(":")
                with self._cond:
                    self.events.setdefault(word, round(now, 3))
                    self._cond.notify_all()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    def tail(self, n: int = 8) -> str:
        return " | ".join(line[9:].strip() for line in list(self.lines)[-n:] if line[9:].strip())


class QemuJob:
    """A VM job (see the module docstring). A watcher thread prepares, boots, watches, collects and cleans."""

    def __init__(self, spec: JobSpec, vm: VmSpec, ports: list[int], command: list[str], accel: str,
                 executor: QemuExecutor) -> None:
        self.spec = spec
        self.vm = vm
        self.ports = ports
        self.command = command
        self.accel = accel
        self._ex = executor
        self.run_dir = Path(tempfile.mkdtemp(prefix=".xwvm-", dir=spec.jobdir.parent))
        #: seconds since QEMU started of the guest's milestones (job-start, job-end, results-written), of
        #: "exited" and "collected"; "prepare" is the preparation's own duration
        self.timings: dict[str, float] = {}
        self.limits_applied: dict[str, bool] = {}
        self.limits_notes: dict[str, str] = {}
        self.console: _Console | None = None
        self.job_disk: guestio.JobDisk | None = None
        #: the most memory QEMU and its sandbox used at once (MiB; from the cgroup, when there is one)
        self.peak_memory_mb: int | None = None
        self._cgroup: JobCgroup | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._t0 = 0.0
        self._lock = threading.Lock()
        self._stop_reason: str | None = None
        self._stop_event = threading.Event()
        self._spawned = threading.Event()
        self._timed_out = False
        self._done = threading.Event()
        self._outcome: JobOutcome | None = None
        self._thread = threading.Thread(target=self._run, name=f"xwvm-{spec.jobdir.name}", daemon=True)

    # -------------------------------------------------------------------------------------------- public API
    @property
    def pid(self) -> int:
        """Host pid of the sandbox monitor (0 while the VM is being prepared)."""
        return self._proc.pid if self._proc is not None else 0

    @property
    def done(self) -> bool:
        """True once the outcome is known."""
        return self._done.is_set()

    def pids(self) -> set[int]:
        """Host pids of the job's processes now (bwrap, the forwarder, QEMU)."""
        if self._cgroup is not None:
            return self._cgroup.pids()
        return set() if self.done or self._proc is None else {self._proc.pid}

    def wait(self, timeout: float | None = None) -> JobOutcome:
        """Block until the VM is gone and everything cleaned; raise :class:`TimeoutError` after ``timeout``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"VM job still running after {timeout} s")
        assert self._outcome is not None
        return self._outcome

    def wait_for(self, event: str, timeout: float) -> float | None:
        """Block until the guest's console says ``event`` (``job-start``, ``job-end``, ``results-written``); return
        when (seconds since QEMU started), or None if the VM ended or ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        self._spawned.wait(timeout)  # set once QEMU runs, or when the job ended before
        if self.console is None:
            return None
        return self.console.wait_for(event, max(0.0, deadline - time.monotonic()))

    def stop(self, reason: str) -> None:
        """Kill the VM now (no clean shutdown: nothing of it is kept); the outcome becomes ``ABORTED``."""
        with self._lock:
            if self._done.is_set():
                return
            if self._pidfd is not None and select.select([self._pidfd], [], [], 0)[0]:
                return  # it has just powered off by itself: its own outcome stands
            if self._stop_reason is None and not self._timed_out:
                self._stop_reason = reason
        self._stop_event.set()
        self._kill()

    # -------------------------------------------------------------------------------------------- internals
    def _launch(self) -> None:
        try:
            self._setup_cgroup()
        except BaseException:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self._thread.start()

    def _setup_cgroup(self) -> None:
        spec, vm = self.spec, self.vm
        self.limits_applied["memory"] = True
        self.limits_notes["memory"] = f"the VM has {vm.memory_mb} MiB of RAM"
        if spec.wallclock is not None:
            self.limits_applied["wallclock"] = True
            self.limits_notes["wallclock"] = f"the VM is killed after {spec.wallclock:g} s"
        if spec.max_procs is not None:
            self.limits_applied["procs"] = True
            self.limits_notes["procs"] = f"in the guest: at most {spec.max_procs} processes of the job user"
        if not self._ex.use_cgroups:
            if spec.cpu_quota is not None:
                self.limits_applied["cpu"], self.limits_notes["cpu"] = False, "cgroups disabled"
            self.limits_notes["memory"] += "; QEMU itself not limited (cgroups disabled)"
            return
        try:
            cg = JobCgroup.create()
        except CgroupError as e:
            if spec.cpu_quota is not None:
                self.limits_applied["cpu"], self.limits_notes["cpu"] = False, f"cgroups unavailable: {e}"
            self.limits_notes["memory"] += f"; QEMU itself not limited (cgroups unavailable: {e})"
            return
        self._cgroup = cg
        ok, why = cg.set_memory_limit((vm.memory_mb + self._ex.overhead_mb) << 20)
        self.limits_notes["memory"] += f"; QEMU: {why}" if ok else f"; QEMU not limited: {why}"
        cg.set_pids_max(HOST_TASKS + 2 * vm.cpus)
        if spec.cpu_quota is not None:
            self.limits_applied["cpu"], self.limits_notes["cpu"] = cg.set_cpu_quota(spec.cpu_quota)

    def _run(self) -> None:
        try:
            self._outcome = self._lifecycle()
        except BaseException as e:  # the worker must always get an outcome
            self._kill()
            self._reap()
            self._outcome = self._make("ERROR", None, f"executor failure: {e!r}")
        finally:
            if self.console is not None:
                self.console.join()
                with contextlib.suppress(OSError):  # for whoever looks into a failed boot; never packed
                    (self.spec.logdir / "console.txt").write_text("\n".join(self.console.lines) + "\n")
            if self._cgroup is not None:
                self._cgroup.remove()
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self._spawned.set()
            self._done.set()

    def _lifecycle(self) -> JobOutcome:
        t = time.monotonic()
        try:
            drives, binds = self._prepare()
        except (guestio.GuestIOError, ExecutorError) as e:
            return self._make("ERROR", None, f"cannot prepare the VM: {e}", 0.0)
        self.timings["prepare"] = round(time.monotonic() - t, 3)
        if self._stop_event.is_set():
            assert self._stop_reason is not None
            return self._make("ABORTED", None, self._stop_reason, 0.0)
        self._spawn(drives, binds)
        return self._watch()

    def _prepare(self) -> tuple[list[tuple[str, str, bool]], dict[str, Path]]:
        spec, vm, run = self.spec, self.vm, self.run_dir
        binds: dict[str, Path] = {}
        drives: list[tuple[str, str, bool]] = []
        if vm.kernel is not None:
            binds["/vm/kernel"] = vm.kernel
        if vm.initrd is not None:
            binds["/vm/initrd"] = vm.initrd
        if vm.disk is not None:
            binds["/vm/template"] = vm.disk
            self._make_overlay(vm)
            drives.append(("/vm/run/root.qcow2", "qcow2", False))
        content = guestio.SeedContent(
            argv=self.command, env=dict(spec.env), ssh_keys=list(vm.context.ssh_authorized_keys),
            script=vm.context.script, net=bool(self.ports), max_procs=spec.max_procs,
            hostname=vm.context.hostname)
        self.job_disk = guestio.make_job_disk(spec.jobdir, spec.stdin, run / "job.raw", vm.disk_mb, run, content)
        drives.append(("/vm/run/job.raw", "raw", False))
        if vm.disk is not None:  # a distro image: cloud-init reads its NoCloud seed (direct boots need none)
            guestio.make_seed(run / "seed.iso", content, run)
            drives.append(("/vm/run/seed.iso", "raw", True))
        return drives, binds

    def _sandboxed(self, argv: list[str], binds: dict[str, Path], what: str) -> str:
        full = self._ex._bwrap_argv(self.run_dir, binds, None, "tcg", privileged_ports=False) + argv
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=120, check=False,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ExecutorError(f"{what}: {e}") from None
        if proc.returncode != 0:
            raise ExecutorError(f"{what}: {(proc.stderr or proc.stdout).strip()[-400:]}")
        return proc.stdout

    def _make_overlay(self, vm: VmSpec) -> None:
        # qemu-img reads the template only inside the sandbox, where a backing file it might name cannot be
        # opened; a template with a backing file is refused outright (templates stand alone).
        assert vm.disk is not None
        binds = {"/vm/template": vm.disk}
        info = json.loads(self._sandboxed([self._ex.qemu_img, "info", "--output=json", "-f", vm.disk_format,
                                           "/vm/template"], binds, "template disk"))
        if info.get("backing-filename") or info.get("full-backing-filename"):
            raise ExecutorError("the template disk has a backing file: templates must stand alone")
        self._sandboxed([self._ex.qemu_img, "create", "-q", "-f", "qcow2", "-F", vm.disk_format,
                         "-b", "/vm/template", "/vm/run/root.qcow2"], binds, "overlay of the template disk")

    def _spawn(self, drives: list[tuple[str, str, bool]], binds: dict[str, Path]) -> None:
        spec, vm, ex = self.spec, self.vm, self._ex
        append = " ".join(x for x in ("console=ttyS0 panic=-1", vm.append) if x) if vm.kernel else ""
        qemu = ex._qemu_argv(self.accel, vm.cpus, vm.memory_mb, "/vm/kernel" if vm.kernel else None,
                             "/vm/initrd" if vm.initrd else None, append, drives, self.ports,
                             f"xwjob-{spec.jobdir.parent.name}"[:60], rng=vm.disk is not None)
        if self.ports:
            qemu = ["/usr/bin/python3", "-I", "-S", "/xw/xwfwd.py", "--sockets", SOCKETS_MOUNT, "--listen",
                    ",".join(map(str, self.ports)), "--", *qemu]
        argv = ex._bwrap_argv(self.run_dir, binds, spec.unix_socket_dir if self.ports else None, self.accel,
                              privileged_ports=any(p < 1024 for p in self.ports))
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        gate_r, gate_w = os.pipe()
        try:
            self._proc = subprocess.Popen(["/bin/sh", "-c", _GATE_SCRIPT, "xwhep-gate", *argv, *qemu],
                                          stdin=gate_r, stdout=out_w, stderr=err_w, start_new_session=True,
                                          env={"PATH": "/usr/bin:/bin"})
        except BaseException:
            for fd in (out_r, err_r, gate_w):
                os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, gate_r):
                os.close(fd)
        self._t0 = time.monotonic()
        self.console = _Console(out_r, err_r, self._t0)
        self._spawned.set()
        self._pidfd = os.pidfd_open(self._proc.pid)
        with os.fdopen(gate_w, "wb") as gate:
            if self._cgroup is not None:
                try:
                    self._cgroup.add_pid(self._proc.pid)
                except CgroupError as e:
                    self.limits_notes["memory"] += f"; QEMU not limited: {e}"
                    if "cpu" in self.limits_applied:
                        self.limits_applied["cpu"], self.limits_notes["cpu"] = False, str(e)
            gate.write(b"go\n")
        if self._stop_event.is_set():  # stopped while it was being spawned
            self._kill()

    def _watch(self) -> JobOutcome:
        assert self._pidfd is not None and self.console is not None
        spec = self.spec
        deadline = None if spec.wallclock is None else self._t0 + spec.wallclock
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if select.select([self._pidfd], [], [], remaining)[0]:
                break
            with self._lock:
                if self._stop_reason is None:
                    self._timed_out = True
            self._kill()
            deadline = None
        self._kill()  # leftovers of the tree, while the monitor's pid cannot be reused
        rc = self._reap()
        wall = time.monotonic() - self._t0
        self.timings["exited"] = round(wall, 3)
        self.console.join()
        for event, at in self.console.events.items():
            self.timings.setdefault(event, at)
        mem = self._cgroup.memory_stats() if self._cgroup is not None else None
        if mem is not None and mem.max_usage_bytes is not None:
            self.peak_memory_mb = mem.max_usage_bytes >> 20
        if self._stop_reason is not None:
            return self._make("ABORTED", None, self._stop_reason, wall)
        if self._timed_out:
            assert spec.wallclock is not None
            return self._make("FAILED", None, f"wall-clock limit exceeded ({spec.wallclock:g} s)", wall)
        if rc != 0:
            if mem is not None and mem.oom_kills:
                return self._make("ERROR", None, f"QEMU exceeded its memory limit ({self.vm.memory_mb} MiB + "
                                                 f"{self._ex.overhead_mb} MiB)", wall)
            err = self.console.errors.decode(errors="replace").strip().splitlines()
            why = err[-1] if err else self.console.tail(3)
            return self._make("ERROR", None, f"QEMU failed (exit {rc}): {why[-400:]}", wall)
        return self._collect(wall)

    def _collect(self, wall: float) -> JobOutcome:
        assert self.console is not None
        spec = self.spec
        try:
            assert self.job_disk is not None
            res = guestio.read_results(self.job_disk.path, self.job_disk.result_offset, spec.jobdir,
                                       spec.stdout_path, spec.stderr_path)
        except guestio.GuestIOError as e:
            return self._make("ERROR", None, f"cannot read the VM's results: {e}", wall)
        finally:
            self.timings["collected"] = round(time.monotonic() - self._t0, 3)
        if not res.written:
            return self._make("ERROR", None, "the VM powered off without results; console: "
                                             + (self.console.tail() or "(empty)"), wall)
        if res.error is not None:
            return self._make("ERROR", None, f"in the VM: {res.error}", wall)
        if not res.complete or res.return_code is None:
            why = "; ".join(res.skipped[-2:]) or "no exit code"
            return self._make("ERROR", None, f"the VM's results are incomplete ({why}); console: "
                                             + self.console.tail(), wall)
        rc = res.return_code
        reason = f"exited with return code {rc}"
        if rc > 128 and rc - 128 < signal.NSIG:
            reason = f"killed by signal {rc - 128} (return code {rc})"
        return self._make("COMPLETED", rc, reason, wall)

    def _make(self, status: OutcomeStatus, rc: int | None, reason: str, wall: float | None = None) -> JobOutcome:
        if wall is None:
            wall = time.monotonic() - self._t0 if self._t0 else 0.0
        for p in (self.spec.stdout_path, self.spec.stderr_path):
            with contextlib.suppress(OSError):
                p.touch()  # like a native job's, even when the guest never ran
        return JobOutcome(status=status, return_code=rc, reason=reason, stdout=self.spec.stdout_path,
                          stderr=self.spec.stderr_path, limits_applied=dict(self.limits_applied), wall_s=wall,
                          limits_notes=dict(self.limits_notes))

    def _kill(self) -> None:
        with self._lock:
            if self._cgroup is not None:
                self._cgroup.kill_all()
            proc = self._proc
            if proc is None or proc.returncode is not None or self._pidfd is None:
                return
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
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
