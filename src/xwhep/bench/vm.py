"""Benchmark 7, vm: what the VM and container executors add to a bare hypervisor or container run.

* ``vm_overhead_ratio``: a minimal VM job (``true`` in the minimal image, through :class:`QemuExecutor`: disks,
  seed, sandbox, cgroup, boot, agent, results read back, clean-up), start to outcome, over a bare
  ``qemu-system-x86_64`` booting the same kernel and initramfs to its init and powering off; medians of
  interleaved runs in the same process, same accelerator (TCG where KVM does not work). Target ≤ 1.2.
* ``vm_job_start_s`` / ``vm_bare_boot_s``: the job's boot-to-job-start (from QEMU's start to the agent's
  ``job-start`` line) and the bare boot, medians.
* ``container_overhead_ratio``: a ``true`` container job through :class:`PodmanExecutor` over
  ``podman run --rm --network=none IMAGE true`` directly, medians. Target ≤ 1.2.
* ``debian_ssh_ready_s`` (full runs only): the Debian cloud-init image, from QEMU's start to its sshd answering
  through a forwarded port (the agent's ``job-start`` comes after cloud-init has made the user and started sshd).

Images are built (or taken from the cache) before anything is timed; their build times are in the details.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from xwhep.bench.common import Result, Settings, rnd

if TYPE_CHECKING:
    from xwhep.worker.executors.qemu import QemuExecutor

KEYS = ["vm_overhead_ratio", "vm_job_start_s", "vm_bare_boot_s", "container_overhead_ratio", "debian_ssh_ready_s"]


def run(settings: Settings) -> Result:
    res = Result("vm")
    n = 2 if settings.smoke else 5
    with tempfile.TemporaryDirectory(prefix="xwbench-vm-", dir=settings.workdir) as tmp:
        work = Path(tmp)
        try:
            _vm(res, work, n, full=not settings.smoke)
        except Exception as exc:  # one part failing must not lose the other
            res.skip(["vm_overhead_ratio", "vm_job_start_s", "vm_bare_boot_s", "debian_ssh_ready_s"],
                     f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        try:
            _container(res, work, 3 if settings.smoke else 20)
        except Exception as exc:
            res.skip(["container_overhead_ratio"], f"failed: {type(exc).__name__}: {str(exc)[:300]}")
    return res


def _vm(res: Result, work: Path, n: int, full: bool) -> None:
    from xwhep.vm import images
    from xwhep.worker.executors.base import JobSpec, VmSpec
    from xwhep.worker.executors.qemu import QemuExecutor

    missing = [t for t in ("qemu-system-x86_64", "qemu-img", "bwrap", "mkfs.ext4", "genisoimage", "cpio", "depmod")
               if shutil.which(t) is None]
    if missing:
        res.skip(["vm_overhead_ratio", "vm_job_start_s", "vm_bare_boot_s", "debian_ssh_ready_s"],
                 f"not installed: {', '.join(missing)}")
        return
    t = time.perf_counter()
    image = images.build_minimal()
    res.details["minimal_image_s"] = rnd(time.perf_counter() - t, 2)
    res.details["minimal_image_build_s"] = image.build_seconds
    ex = QemuExecutor(work / "worker", probe_kernel=image.kernel, probe_initrd=image.initrd)
    accel = ex.probe()["accel"]
    res.details["accel"] = accel
    bare_argv = [ex.qemu, "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
                 "-m", "256", "-smp", "1", *(["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else
                                              ["-accel", "tcg"]),
                 "-kernel", str(image.kernel), "-initrd", str(image.initrd),
                 "-append", f"{image.append} xw.probe"]
    bare: list[float] = []
    jobs: list[float] = []
    starts: list[float] = []
    for i in range(n + 1):  # the first round warms the page cache and is not counted
        t = time.perf_counter()
        proc = subprocess.run(bare_argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
                              check=False)
        b = time.perf_counter() - t
        if proc.returncode != 0 or "probe-ok" not in proc.stdout:
            raise RuntimeError(f"the bare boot failed: {proc.stderr.strip()[-200:]}")
        root = work / f"job{i}"
        (root / "job").mkdir(parents=True)
        spec = JobSpec(jobdir=root / "job", logdir=root / "log", argv=["true"], wallclock=300,
                       vm=VmSpec(kernel=image.kernel, initrd=image.initrd, append="quiet", memory_mb=256))
        t = time.perf_counter()
        job = ex.start(spec)
        out = job.wait(600)
        j = time.perf_counter() - t
        if out.status != "COMPLETED" or out.return_code != 0:
            raise RuntimeError(f"the VM job failed: {out.reason}")
        if i:
            bare.append(b)
            jobs.append(j)
            starts.append(job.timings["job-start"])
        shutil.rmtree(root)
    b_med, j_med = statistics.median(bare), statistics.median(jobs)
    res.values["vm_overhead_ratio"] = rnd(j_med / b_med, 3)
    res.values["vm_bare_boot_s"] = rnd(b_med, 2)
    res.values["vm_job_start_s"] = rnd(statistics.median(starts), 2)
    res.details.update(vm_runs=n, vm_job_s=[rnd(x, 2) for x in jobs], vm_bare_s=[rnd(x, 2) for x in bare],
                       vm_job_start_s=[rnd(x, 2) for x in starts])
    print(f"  vm ({accel}): job {j_med:.2f} s vs bare boot {b_med:.2f} s = {j_med / b_med:.2f}x; "
          f"job-start at {statistics.median(starts):.2f} s (medians of {n})", flush=True)
    if not full:
        res.skip(["debian_ssh_ready_s"], "not in --smoke (the Debian image takes a minute or more to boot)")
        return
    if shutil.which("mmdebstrap") is None or shutil.which("ssh") is None:
        res.skip(["debian_ssh_ready_s"], "mmdebstrap or ssh is not installed")
        return
    res.values["debian_ssh_ready_s"] = _debian_ssh_ready(res, ex, work)


def _debian_ssh_ready(res: Result, ex: QemuExecutor, work: Path) -> float:
    import socket

    from xwhep.vm import images
    from xwhep.worker.executors.base import JobSpec, VmContext, VmSpec
    from xwhep.worker.tunnel import _unix_listener

    t = time.perf_counter()
    image = images.build_debian()
    res.details["debian_image_s"] = rnd(time.perf_counter() - t, 1)
    res.details["debian_image_build_s"] = image.build_seconds
    assert image.disk is not None
    key = work / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    root = work / "debian"
    (root / "job").mkdir(parents=True)
    sockdir = Path(tempfile.mkdtemp(prefix="xwb", dir="/tmp"))
    listener = _unix_listener(sockdir, "listen-22.sock")
    listener.setblocking(True)
    listener.settimeout(60)
    spec = JobSpec(jobdir=root / "job", logdir=root / "log", unix_socket_dir=sockdir, wallclock=900,
                   argv=["sh", "-c", "while [ ! -e /job/done ]; do sleep 0.2; done"],
                   vm=VmSpec(kernel=image.kernel, initrd=image.initrd, append=image.append, disk=image.disk,
                             memory_mb=512, listen_ports=[22],
                             context=VmContext(ssh_authorized_keys=[key.with_suffix(".pub").read_text().strip()])))
    t0 = time.perf_counter()
    job = ex.start(spec)
    try:
        job_start = job.wait_for("job-start", 600)
        if job_start is None:
            raise RuntimeError("the Debian VM never started its job")
        ready: float | None = None
        while ready is None and time.perf_counter() - t0 < 900:
            conn, _ = listener.accept()  # the forwarder's idle connection
            with conn:
                conn.sendall(b"C")
                data, fds, _, _ = socket.recv_fds(conn, 1, 1)
            if data != b"F" or not fds:
                continue
            with socket.socket(fileno=fds[0]) as s:
                s.settimeout(30)
                if s.recv(64).startswith(b"SSH-2.0-"):  # sshd's banner: it answers
                    ready = time.perf_counter() - t0
        if ready is None:
            raise RuntimeError("sshd in the Debian VM never answered")
        res.details["debian_job_start_s"] = job_start
        print(f"  vm: Debian cloud-init image ssh-ready {ready:.1f} s after start (job-start at {job_start} s)",
              flush=True)
    finally:
        job.stop("benchmark over")
        job.wait(120)
        listener.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    return round(ready, 1)


def _busybox_rootfs(work: Path) -> Path:
    from xwhep.vm.images import _busybox

    broot, _ = _busybox(work)
    tar = work / "rootfs.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(broot / "bin" / "busybox", "bin/busybox")
        info = tarfile.TarInfo("bin/true")
        info.type, info.linkname = tarfile.SYMTYPE, "busybox"
        tf.addfile(info)
    return tar


def _container(res: Result, work: Path, n: int) -> None:
    from xwhep.worker.executors.base import ContainerSpec, JobSpec
    from xwhep.worker.executors.container import PodmanExecutor

    ex = PodmanExecutor()
    ok, why = ex.available()
    if not ok:
        res.skip(["container_overhead_ratio"], f"podman executor unavailable: {why}")
        return
    tar = _busybox_rootfs(work)
    c = ContainerSpec(image=tar)
    ref = ex.ensure_image(c)
    direct_argv = [ex.podman, "run", "--rm", "--network=none", ref, "true"]
    direct: list[float] = []
    ours: list[float] = []
    for i in range(n + 1):
        t = time.perf_counter()
        proc = subprocess.run(direct_argv, capture_output=True, env=ex.env(), check=False)
        d = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"podman run failed: {proc.stderr.decode(errors='replace')[-200:]}")
        root = work / f"c{i}"
        (root / "job").mkdir(parents=True)
        t = time.perf_counter()
        out = ex.start(JobSpec(jobdir=root / "job", logdir=root / "log", argv=["true"], memory_mb=256,
                               container=c)).wait(120)
        o = time.perf_counter() - t
        if out.status != "COMPLETED" or out.return_code != 0:
            raise RuntimeError(f"the container job failed: {out.reason}")
        if i:
            direct.append(d)
            ours.append(o)
    d_med, o_med = statistics.median(direct), statistics.median(ours)
    res.values["container_overhead_ratio"] = rnd(o_med / d_med, 3)
    res.details.update(container_runs=n, container_job_s=[rnd(x, 3) for x in ours],
                       podman_run_s=[rnd(x, 3) for x in direct])
    print(f"  container: job {o_med * 1000:.0f} ms vs podman run {d_med * 1000:.0f} ms = {o_med / d_med:.2f}x "
          f"(medians of {n})", flush=True)
