"""The VirtualBox executor: XWHEP's VIRTUALBOX app type behind the same interface as the QEMU executor, driving
``VBoxManage`` (VirtualBox 7.0 command syntax).

**VirtualBox cannot be installed on this project's build machines** (no package in Debian's main archive, no
kernel modules on the CI's VMs): this adapter has never run a real VirtualBox here. Its tests
(tests/worker/test_virtualbox_executor.py) are *contract tests*: they run it against a strict recorder of
``VBoxManage``'s documented command syntax and outputs (tests/fakevbox/VBoxManage), which refuses any argument
the manual does not describe and plays the part of the hypervisor's state; nothing there boots a guest.

A run, with the guest protocol of :mod:`xwhep.vm` (the same agent, disks and seed as under QEMU):

1. the job disk is made raw (:mod:`xwhep.vm.guestio`) and converted to VDI (``convertfromraw``); the NoCloud seed
   ISO goes in a DVD drive;
2. ``createvm --register`` in a private run dir beside the job dir; ``modifyvm`` (memory, CPUs, boot from disk,
   no audio, no USB, the serial console to a file, no NIC — or NAT with only the job's port forwards, see below);
   a SATA controller (``storagectl``) with the template disk attached as ``multiattach`` (VirtualBox puts a
   differencing image in front of it: the template is never written), the job disk, the seed;
3. ``startvm --type headless``; ``showvminfo --machinereadable`` is polled for ``VMState`` (VBoxManage has no
   blocking wait without Guest Additions); the wall clock and :meth:`VirtualBoxJob.stop` end it with
   ``controlvm poweroff``;
4. after a clean power-off, ``clonemedium --format RAW`` of the job disk, whose result stream is read as under
   QEMU;
5. ``unregistervm --delete`` (the VM, its differencing image, its disks) and the run dir removed.

Differences from QEMU, by VirtualBox's design: no direct kernel boot (the template must be a bootable VDI, VMDK or
raw disk; raw ones are converted to VDI once per worker); no equivalent of QEMU's ``restrict=on``: a NAT NIC lets
the guest reach the LAN and the internet, so jobs with listen ports are refused unless the executor is built with
``allow_nat=True`` (``--nat-localhostreachable1 off`` still keeps the host's loopback out of reach); the forwarded
ports listen on the host's 127.0.0.1 (:attr:`VirtualBoxJob.host_ports`), not in a sandbox of their own; and the
hypervisor runs as the worker's user, outside bubblewrap (VirtualBox needs its kernel driver and VBoxSVC).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from xwhep.vm import guestio
from xwhep.worker.executors.base import ExecutorError, JobOutcome, JobSpec, OutcomeStatus, VmSpec
from xwhep.worker.executors.qemu import GUEST_PREFIX, split_forwarder

__all__ = ["VBoxError", "VirtualBoxExecutor", "VirtualBoxJob"]

POLL_S = 0.5
CONTROLLER = "SATA"
_CHUNK = 1 << 20


class VBoxError(Exception):
    """A VBoxManage command failed (its ``VBoxManage: error:`` lines are the message)."""


class VirtualBoxExecutor:
    """Runs VM jobs (``JobSpec.vm``) in VirtualBox through ``VBoxManage`` (see the module docstring).

    ``workdir`` keeps VDI copies of raw templates (by sha256). ``allow_nat`` lets jobs with listen ports have a
    NAT NIC (the guest can then reach the network: VirtualBox cannot restrict it like QEMU).
    """

    name = "virtualbox"

    def __init__(self, workdir: Path, *, vboxmanage: str = "VBoxManage", allow_nat: bool = False,
                 poll_s: float = POLL_S, max_memory_mb: int | None = None, max_cpus: int | None = None) -> None:
        self.workdir = workdir
        self.vboxmanage = vboxmanage
        self.allow_nat = allow_nat
        self.poll_s = poll_s
        self.max_memory_mb = max_memory_mb
        self.max_cpus = max_cpus
        self._template_lock = threading.Lock()

    def vbox(self, *args: str, timeout: float = 300.0) -> str:
        """Run ``VBoxManage ARGS``; its stdout, or :class:`VBoxError` with its error lines."""
        try:
            proc = subprocess.run([self.vboxmanage, "-q", *args], capture_output=True, text=True, timeout=timeout,
                                  check=False, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise VBoxError(f"{self.vboxmanage} is not installed") from None
        except subprocess.TimeoutExpired:
            raise VBoxError(f"VBoxManage {args[0]} did not answer in {timeout:g} s") from None
        if proc.returncode != 0:
            errors = [line.removeprefix("VBoxManage: error: ") for line in proc.stderr.splitlines()
                      if line.startswith("VBoxManage: error:")]
            raise VBoxError(f"VBoxManage {args[0]}: " + ("; ".join(errors) or proc.stderr.strip()[-300:]))
        return proc.stdout

    def available(self) -> tuple[bool, str]:
        """Whether ``VBoxManage`` is installed and answers."""
        if shutil.which(self.vboxmanage) is None:
            return False, f"{self.vboxmanage} not found on PATH"
        for tool in ("mkfs.ext4", "genisoimage"):
            if shutil.which(tool) is None:
                return False, f"{tool} not found on PATH"
        try:
            version = self.vbox("--version", timeout=30).strip()
        except VBoxError as e:
            return False, str(e)
        return True, version

    def probe(self) -> dict[str, Any]:
        """What the worker declares: ``{"hypervisor": "virtualbox", "version", "max_memory_mb", "max_cpus"}``."""
        ok, version = self.available()
        if not ok:
            raise ExecutorError(version)
        mem = max(0, (psutil.virtual_memory().total >> 20) - 1024)
        if self.max_memory_mb is not None:
            mem = min(mem, self.max_memory_mb)
        cpus = os.cpu_count() or 1
        if self.max_cpus is not None:
            cpus = min(cpus, self.max_cpus)
        return {"hypervisor": "virtualbox", "accel": "vbox", "version": version, "max_memory_mb": mem,
                "max_cpus": cpus}

    def _validate(self, spec: JobSpec) -> tuple[VmSpec, list[int], list[str]]:
        vm = spec.vm
        if vm is None:
            raise ExecutorError("not a VM job (JobSpec.vm is not set)")
        if spec.container is not None:
            raise ExecutorError("a job is a VM or a container, not both")
        listen, forward, command = split_forwarder(spec.argv)
        if forward:
            raise ExecutorError("forward addresses are not supported for VM jobs")
        ports = sorted(set(listen) | set(vm.listen_ports))
        if ports and not self.allow_nat:
            raise ExecutorError("listen ports need a NAT NIC in VirtualBox, which lets the guest reach the network; "
                                "this worker does not allow it")
        if not command or not command[0]:
            raise ExecutorError("empty argv")
        if vm.kernel is not None or vm.initrd is not None:
            raise ExecutorError("VirtualBox boots disks only (no direct kernel boot): give a bootable template disk")
        if vm.disk is None or not vm.disk.is_file():
            raise ExecutorError(f"VM disk {vm.disk} does not exist")
        if vm.disk_format not in ("vdi", "vmdk", "raw"):
            raise ExecutorError(f"VirtualBox reads vdi, vmdk or raw template disks, not {vm.disk_format}")
        if not spec.jobdir.is_dir():
            raise ExecutorError(f"job dir {spec.jobdir} does not exist")
        job, log = spec.jobdir.resolve(), spec.logdir.resolve()
        if log == job or job in log.parents:
            raise ExecutorError(f"log dir {spec.logdir} must be outside the job dir {spec.jobdir}")
        spec.logdir.mkdir(parents=True, exist_ok=True)
        if spec.stdin is not None and not spec.stdin.is_file():
            raise ExecutorError(f"stdin file {spec.stdin} does not exist")
        if vm.cpus < 1 or vm.memory_mb < 64 or vm.disk_mb < 1:
            raise ExecutorError("VM cpus, memory and disk size must be positive (memory at least 64 MiB)")
        if spec.memory_mb is not None and vm.memory_mb > spec.memory_mb:
            raise ExecutorError(f"VM memory {vm.memory_mb} MiB is more than a job may use here ({spec.memory_mb})")
        if spec.wallclock is not None and spec.wallclock <= 0:
            raise ExecutorError("wall-clock limit must be positive")
        try:
            guestio.run_script(command, spec.env, False)
        except guestio.GuestIOError as e:
            raise ExecutorError(str(e)) from None
        return vm, ports, command

    def template(self, vm: VmSpec) -> Path:
        """The template as VirtualBox reads it: itself (VDI, VMDK), or a VDI made once from a raw disk."""
        assert vm.disk is not None
        if vm.disk_format != "raw":
            return vm.disk
        h = hashlib.sha256()
        with open(vm.disk, "rb") as f:
            while b := f.read(_CHUNK):
                h.update(b)
        dest = self.workdir / "vbox-templates" / f"{h.hexdigest()}.vdi"
        with self._template_lock:
            if not dest.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}.vdi")
                tmp.unlink(missing_ok=True)
                try:
                    self.vbox("convertfromraw", str(vm.disk), str(tmp), "--format", "VDI")
                    os.replace(tmp, dest)
                finally:
                    tmp.unlink(missing_ok=True)
        return dest

    def start(self, spec: JobSpec) -> VirtualBoxJob:
        """Start the VM job ``spec`` and return at once (disks are made in the job's thread)."""
        ok, why = self.available()
        if not ok:
            raise ExecutorError(why)
        vm, ports, command = self._validate(spec)
        job = VirtualBoxJob(spec, vm, ports, command, self)
        job._thread.start()
        return job


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def parse_machinereadable(text: str) -> dict[str, str]:
    """``key="value"`` lines of ``showvminfo --machinereadable`` as a dict (quotes removed)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip('"')] = value.strip().strip('"')
    return out


class VirtualBoxJob:
    """A VM job in VirtualBox; a watcher thread prepares, starts, polls, collects and cleans."""

    def __init__(self, spec: JobSpec, vm: VmSpec, ports: list[int], command: list[str],
                 executor: VirtualBoxExecutor) -> None:
        self.spec = spec
        self.vm = vm
        self.ports = ports
        self.command = command
        self._ex = executor
        self.name = f"xwjob-{uuid.uuid4().hex[:16]}"
        self.run_dir = Path(tempfile.mkdtemp(prefix=".xwvbox-", dir=spec.jobdir.parent))
        #: guest port → the host's 127.0.0.1 port VirtualBox forwards to it
        self.host_ports: dict[int, int] = {}
        self.timings: dict[str, float] = {}
        self.registered = False
        self._t0 = 0.0
        self._lock = threading.Lock()
        self._stop_reason: str | None = None
        self._timed_out = False
        self._wake = threading.Event()
        self._done = threading.Event()
        self._outcome: JobOutcome | None = None
        self._console_seen = 0
        self._console_partial = b""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    @property
    def pid(self) -> int:
        """VirtualBox runs the VM in its own service's process tree: there is no pid of ours to give."""
        return 0

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> JobOutcome:
        """Block until the VM is gone and unregistered; raise :class:`TimeoutError` after ``timeout``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"VM job still running after {timeout} s")
        assert self._outcome is not None
        return self._outcome

    def stop(self, reason: str) -> None:
        """Power the VM off now; the outcome becomes ``ABORTED`` with ``reason`` (if it was still running)."""
        with self._lock:
            if self._done.is_set():
                return
            if self._stop_reason is None and not self._timed_out:
                self._stop_reason = reason
        self._wake.set()

    # ----------------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._outcome = self._lifecycle()
        except (VBoxError, guestio.GuestIOError) as e:
            self._outcome = self._make("ERROR", None, str(e))
        except Exception as e:  # the worker must always get an outcome
            self._outcome = self._make("ERROR", None, f"executor failure: {e!r}")
        finally:
            self._cleanup()
            self._done.set()

    def _lifecycle(self) -> JobOutcome:
        ex, spec, vm, run = self._ex, self.spec, self.vm, self.run_dir
        template = ex.template(vm)
        content = guestio.SeedContent(
            argv=self.command, env=dict(spec.env), ssh_keys=list(vm.context.ssh_authorized_keys),
            script=vm.context.script, net=bool(self.ports), max_procs=spec.max_procs,
            hostname=vm.context.hostname)
        disk = guestio.make_job_disk(spec.jobdir, spec.stdin, run / "job.raw", vm.disk_mb, run, content)
        guestio.make_seed(run / "seed.iso", content, run)
        ex.vbox("convertfromraw", str(disk.path), str(run / "job.vdi"), "--format", "VDI")
        disk.path.unlink()
        if self._stop_reason is not None:
            return self._make("ABORTED", None, self._stop_reason, 0.0)
        out = ex.vbox("createvm", "--name", self.name, "--ostype", "Linux_64", "--basefolder", str(run),
                      "--register")
        self.registered = True
        if not re.search(r"^UUID: \S+", out, re.M):
            raise VBoxError(f"createvm gave no UUID: {out.strip()[-200:]}")
        modify = ["modifyvm", self.name, "--memory", str(vm.memory_mb), "--cpus", str(vm.cpus), "--ioapic", "on",
                  "--boot1", "disk", "--boot2", "none", "--boot3", "none", "--boot4", "none",
                  "--audio-enabled", "off", "--usb-ohci", "off", "--graphicscontroller", "vmsvga",
                  "--uart1", "0x3F8", "4", "--uart-mode1", "file", str(run / "console.log")]
        if self.ports:
            modify += ["--nic1", "nat", "--nat-localhostreachable1", "off"]
            for p in self.ports:
                self.host_ports[p] = _free_port()
                modify += ["--nat-pf1", f"xw{p},tcp,127.0.0.1,{self.host_ports[p]},,{p}"]
        else:
            modify += ["--nic1", "none"]
        ex.vbox(*modify)
        ex.vbox("storagectl", self.name, "--name", CONTROLLER, "--add", "sata", "--controller", "IntelAhci",
                "--portcount", "3", "--bootable", "on")
        attach = ["storageattach", self.name, "--storagectl", CONTROLLER, "--device", "0"]
        ex.vbox(*attach, "--port", "0", "--type", "hdd", "--medium", str(template), "--mtype", "multiattach")
        ex.vbox(*attach, "--port", "1", "--type", "hdd", "--medium", str(run / "job.vdi"))
        ex.vbox(*attach, "--port", "2", "--type", "dvddrive", "--medium", str(run / "seed.iso"))
        if self._stop_reason is not None:
            return self._make("ABORTED", None, self._stop_reason, 0.0)
        ex.vbox("startvm", self.name, "--type", "headless")
        self._t0 = time.monotonic()
        state = self._watch()
        wall = time.monotonic() - self._t0
        if self._stop_reason is not None:
            return self._make("ABORTED", None, self._stop_reason, wall)
        if self._timed_out:
            assert spec.wallclock is not None
            return self._make("FAILED", None, f"wall-clock limit exceeded ({spec.wallclock:g} s)", wall)
        if state != "poweroff":
            return self._make("ERROR", None, f"the VM ended in state {state}; console: {self._console_tail()}",
                              wall)
        ex.vbox("clonemedium", "disk", str(run / "job.vdi"), str(run / "job-read.raw"), "--format", "RAW")
        res = guestio.read_results(run / "job-read.raw", disk.result_offset, spec.jobdir, spec.stdout_path,
                                   spec.stderr_path)
        self.timings["collected"] = round(time.monotonic() - self._t0, 3)
        if not res.written:
            return self._make("ERROR", None, f"the VM powered off without results; console: {self._console_tail()}",
                              wall)
        if res.error is not None:
            return self._make("ERROR", None, f"in the VM: {res.error}", wall)
        if not res.complete or res.return_code is None:
            return self._make("ERROR", None, "the VM's results are incomplete: "
                                             + ("; ".join(res.skipped[-2:]) or "no exit code"), wall)
        rc = res.return_code
        reason = f"exited with return code {rc}"
        if rc > 128 and rc - 128 < signal.NSIG:
            reason = f"killed by signal {rc - 128} (return code {rc})"
        return self._make("COMPLETED", rc, reason, wall)

    def _state(self) -> str:
        info = parse_machinereadable(self._ex.vbox("showvminfo", self.name, "--machinereadable"))
        return info.get("VMState", "unknown")

    def _watch(self) -> str:
        deadline = None if self.spec.wallclock is None else self._t0 + self.spec.wallclock
        while True:
            state = self._state()
            self._read_console()
            if state not in ("running", "starting", "paused", "restoring"):
                self.timings.setdefault("exited", round(time.monotonic() - self._t0, 3))
                return state
            if deadline is not None and time.monotonic() >= deadline:
                with self._lock:
                    if self._stop_reason is None:
                        self._timed_out = True
            if self._stop_reason is not None or self._timed_out:
                with contextlib.suppress(VBoxError):
                    self._ex.vbox("controlvm", self.name, "poweroff")
                deadline = None
                continue
            wait = self._ex.poll_s if deadline is None else min(self._ex.poll_s, max(0.0, deadline - time.monotonic()))
            self._wake.wait(wait)

    def _read_console(self) -> None:
        try:
            with open(self.run_dir / "console.log", "rb") as f:
                f.seek(self._console_seen)
                data = f.read(1 << 20)
        except OSError:
            return
        self._console_seen += len(data)
        now = round(time.monotonic() - self._t0, 3)
        *lines, self._console_partial = (self._console_partial + data).split(b"\n")
        self._console_partial = self._console_partial[-4096:]
        for raw in lines:
            line = raw.decode(errors="replace")
            i = line.find(GUEST_PREFIX)
            if i >= 0:
                self.timings.setdefault(line[i + len(GUEST_PREFIX):].split(" ", 1)[0].rstrip(":"), now)

    def _console_tail(self, n: int = 6) -> str:
        with contextlib.suppress(OSError):
            lines = (self.run_dir / "console.log").read_bytes()[-8192:].decode(errors="replace").splitlines()
            return " | ".join(line.strip() for line in lines[-n:] if line.strip()) or "(empty)"
        return "(none)"

    def _make(self, status: OutcomeStatus, rc: int | None, reason: str, wall: float | None = None) -> JobOutcome:
        if wall is None:
            wall = time.monotonic() - self._t0 if self._t0 else 0.0
        limits = {"memory": True}
        notes = {"memory": f"the VM has {self.vm.memory_mb} MiB of RAM"}
        if self.spec.wallclock is not None:
            limits["wallclock"] = True
            notes["wallclock"] = f"the VM is powered off after {self.spec.wallclock:g} s"
        if self.spec.cpu_quota is not None:
            limits["cpu"] = False
            notes["cpu"] = "VirtualBox runs outside the worker's cgroups: the VM's CPUs are its limit"
        for p in (self.spec.stdout_path, self.spec.stderr_path):
            with contextlib.suppress(OSError):
                p.touch()
        return JobOutcome(status=status, return_code=rc, reason=reason, stdout=self.spec.stdout_path,
                          stderr=self.spec.stderr_path, limits_applied=limits, wall_s=wall, limits_notes=notes)

    def _cleanup(self) -> None:
        if self.registered:
            with contextlib.suppress(VBoxError):
                if self._state() in ("running", "starting", "paused"):
                    self._ex.vbox("controlvm", self.name, "poweroff")
            with contextlib.suppress(VBoxError):
                self._ex.vbox("unregistervm", self.name, "--delete")
                self.registered = False
        shutil.rmtree(self.run_dir, ignore_errors=True)
