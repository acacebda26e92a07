"""The QEMU executor with real QEMU (TCG here: KVM does not boot on these machines, the probe finds out), real
bubblewrap and cgroups, and the real images (tests/worker/conftest.py builds them once per machine).

Every test boots a VM or two; they wait on the guest's console lines, the job's own answers or the end of the VM,
never on sleeps. "Nothing left" means: no process of the VM, no run dir (overlay, disks, seed), no cgroup.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from tunnelside import JobPort, TcpBridge

from xwhep.vm.images import VmImage
from xwhep.worker.cgroups import discover
from xwhep.worker.executors import ExecutorError, JobSpec
from xwhep.worker.executors.base import VmContext, VmSpec
from xwhep.worker.executors.qemu import PROBE_FILE, QemuExecutor, QemuJob, split_forwarder
from xwhep.worker.packing import pack_results, snapshot

pytestmark = pytest.mark.vm


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "job").mkdir()
    return tmp_path


@pytest.fixture(autouse=True)
def no_leftover_cgroups() -> Iterator[None]:
    yield
    prefix = f"xwhep-{os.getpid()}-"
    left = [d for h in discover() for d in h.own_dir.glob(prefix + "*")]
    assert not left, f"job cgroups left behind: {left}"


def spec_for(root: Path, image: VmImage, argv: list[str], **kw: object) -> JobSpec:
    vm = kw.pop("vm", None) or VmSpec(kernel=image.kernel, initrd=image.initrd, append="quiet")
    return JobSpec(jobdir=root / "job", logdir=root / "log", argv=argv, vm=vm, **kw)  # type: ignore[arg-type]


def vm_processes(root: Path) -> list[psutil.Process]:
    """QEMU processes of the job rooted at ``root`` (their -name embeds the root's name)."""
    tag = f"xwjob-{root.name}"[:60]
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(a == tag for a in cmd):
            found.append(p)
    return found


def assert_nothing_left(root: Path, job: QemuJob, pids: set[int]) -> None:
    assert not job.run_dir.exists(), "the VM's run dir (overlay, disks, seed) is still there"
    assert not list(root.glob(".xwvm-*"))
    assert not vm_processes(root)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes of the VM still alive: {alive}"


def test_a_vm_job_gets_its_inputs_and_returns_its_results(qemu: QemuExecutor, minimal_image: VmImage,
                                                          root: Path) -> None:
    job = root / "job"
    (job / "data").mkdir()
    (job / "data" / "numbers.txt").write_text("3\n4\n")
    (job / "untouched.txt").write_text("stays as it is")
    (job / "modify.txt").write_text("old")
    stdin = root / "stdin"
    stdin.write_text("from stdin\n")
    script = ("id -un; pwd; echo \"GREETING=$GREETING\"; cat; "
              "s=0; for n in $(cat data/numbers.txt); do s=$((s+n)); done; echo $s > data/sum.txt; "
              "echo new >> modify.txt; mkdir -p out/deep; echo \"$@\" > out/deep/args.txt; "
              "echo to-stderr >&2; test -w /xw/disk || echo 'no access to the job disk root'")
    spec = spec_for(root, minimal_image, ["sh", "-c", script, "sh", "a b", "c"], env={"GREETING": "hello world"},
                    stdin=stdin, wallclock=120)
    snap = snapshot(job)
    running = qemu.start(spec)
    out = running.wait(180)
    assert out.status == "COMPLETED" and out.return_code == 0, (out.reason, running.console and
                                                                 running.console.tail(20))
    assert (root / "log" / "stdout.txt").read_text() == (
        "xwjob\n/job\nGREETING=hello world\nfrom stdin\nno access to the job disk root\n")
    assert (root / "log" / "stderr.txt").read_text() == "to-stderr\n"
    assert (job / "data" / "sum.txt").read_text() == "7\n"
    assert (job / "modify.txt").read_text() == "oldnew\n"
    assert (job / "out" / "deep" / "args.txt").read_text() == "a b c\n"
    assert (job / "untouched.txt").read_text() == "stays as it is"
    # packed like a native job's result: only what the job created or changed, and its streams
    packed = pack_results(job, snap, spec.stdout_path, spec.stderr_path, root / "result.zip")
    assert packed is not None and packed.zipped
    assert packed.files == ["data/sum.txt", "modify.txt", "out/deep/args.txt", "stdout.txt", "stderr.txt"]
    assert {"job-start", "job-end", "results-written", "exited", "collected"} <= set(running.timings)
    assert running.timings["job-start"] < running.timings["job-end"] < running.timings["exited"]
    assert out.limits_applied["memory"] and out.limits_applied["wallclock"]
    assert_nothing_left(root, running, set())


def test_a_non_zero_exit_is_completed_with_its_code(qemu: QemuExecutor, minimal_image: VmImage,
                                                    root: Path) -> None:
    # ten background sleeps under a limit of five processes: some cannot even start (in a subshell: the shell's
    # fork failure is fatal); those that did do not keep the VM up after the job's end
    script = "(for i in 1 2 3 4 5 6 7 8 9 10; do sleep 300 & done); echo partial > part.txt; exit 42"
    out = qemu.start(spec_for(root, minimal_image, ["sh", "-c", script], max_procs=5)).wait(180)
    assert (out.status, out.return_code) == ("COMPLETED", 42), out.reason
    assert (root / "job" / "part.txt").read_text() == "partial\n"
    assert "can't fork" in (root / "log" / "stderr.txt").read_text()
    assert out.limits_applied["procs"] and out.wall_s < 120


def test_the_wall_clock_covers_the_whole_vm_and_leaves_nothing(qemu: QemuExecutor, minimal_image: VmImage,
                                                                root: Path) -> None:
    running = qemu.start(spec_for(root, minimal_image, ["sleep", "600"], wallclock=20))
    assert running.wait_for("job-start", 60) is not None
    pids = running.pids()
    assert pids and vm_processes(root)
    out = running.wait(60)
    assert out.status == "FAILED" and "wall-clock limit exceeded (20 s)" in out.reason
    assert 20 <= out.wall_s < 40
    assert_nothing_left(root, running, pids)


def test_stop_kills_the_confined_vm_and_leaves_nothing(qemu: QemuExecutor, minimal_image: VmImage,
                                                       root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other_job = tmp_path_factory.mktemp("other-job")
    (other_job / "secret.txt").write_text("another job's file")
    # a template disk too (the guest boots by kernel and ignores it): its overlay must go as well
    template = tmp_path_factory.mktemp("template") / "template.raw"
    template.write_bytes(b"\0" * (1 << 20))
    vm = VmSpec(kernel=minimal_image.kernel, initrd=minimal_image.initrd, append="quiet", disk=template,
                disk_format="raw")
    running = qemu.start(spec_for(root, minimal_image, ["sleep", "600"], wallclock=300, vm=vm))
    pids: set[int] = set()
    try:
        assert running.wait_for("job-start", 60) is not None
        pids = running.pids()
        inspect_confinement(running, root, other_job)
    finally:
        running.stop("deactivated by the volunteer")
    out = running.wait(30)
    assert (out.status, out.reason) == ("ABORTED", "deactivated by the volunteer")
    assert_nothing_left(root, running, pids)
    assert sorted(p.name for p in root.iterdir()) == ["job", "log"]


def inspect_confinement(running: QemuJob, root: Path, other_job: Path) -> None:
    assert running.wait_for("job-start", 60) is not None
    [vm] = [p for p in vm_processes(root) if p.name().startswith("qemu-system")]  # (bwrap's argv has the tag too)
    # QEMU is confined: its own mount namespace shows /usr and its run dir, nothing of the worker or other jobs
    seen = sorted(os.listdir(f"/proc/{vm.pid}/root"))
    assert set(seen) <= {"bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp", "usr", "vm"}, seen
    assert os.listdir(f"/proc/{vm.pid}/root/etc") == ["ld.so.cache"]
    assert sorted(os.listdir(f"/proc/{vm.pid}/root/vm")) == ["initrd", "kernel", "run", "template"]
    assert sorted(os.listdir(running.run_dir)) == ["job.raw", "root.qcow2", "seed.iso"]
    assert not os.path.exists(f"/proc/{vm.pid}/root{other_job}")
    assert not os.path.exists(f"/proc/{vm.pid}/root{root / 'job'}")
    assert not os.path.exists(f"/proc/{vm.pid}/root{Path.home()}")
    # its own network namespace, no capabilities, QEMU's seccomp filter, its own cgroup with the VM's memory
    assert os.readlink(f"/proc/{vm.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{vm.pid}/status").read_text().splitlines()
                  if ":\t" in line)
    assert status["Seccomp"].strip() == "2" and int(status["CapEff"], 16) == 0
    cg = Path(f"/proc/{vm.pid}/cgroup").read_text()
    m = re.search(rf"^\d+:memory:(.*/xwhep-{os.getpid()}-\w+)$", cg, re.M)
    assert m, cg
    limit = int(Path(f"/sys/fs/cgroup/memory{m.group(1)}/memory.limit_in_bytes").read_text())
    assert limit == (256 + running._ex.overhead_mb) << 20  # the VM's memory + QEMU's overhead


def test_the_guest_reaches_nothing_but_a_forward_reaches_the_guest(qemu: QemuExecutor, minimal_image: VmImage,
                                                                   root: Path) -> None:
    # host services the guest must not reach: one on the host's loopback, one on every address (the LAN's)
    loopback = socket.create_server(("127.0.0.1", 0))
    anyaddr = socket.create_server(("0.0.0.0", 0))
    lo_port, any_port = loopback.getsockname()[1], anyaddr.getsockname()[1]
    lan_ips = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
               if a.family == socket.AF_INET and not a.address.startswith("127.")]
    targets = [f"10.0.2.2 {lo_port}", f"10.0.2.2 {any_port}", "10.0.2.3 53", "192.0.2.1 80", "1.1.1.1 443",
               *(f"{ip} {any_port}" for ip in lan_ips[:2])]
    probes = " ".join(f"(echo x | nc -w 3 {t} >/dev/null 2>&1 && echo 'REACHED {t}' || echo 'BLOCKED {t}') &"
                      for t in targets)
    script = f"{probes} wait; echo served-by-the-guest | nc -l -p 8080"
    sockdir = Path(os.path.realpath("/tmp")) / f"xwq{os.getpid()}{root.name[-6:]}"
    sockdir.mkdir()
    port = JobPort(sockdir, 8080)
    try:
        # the argv exactly as the tunnel layer wraps it (TunnelManager.wrap): the executor unwraps it and runs
        # the forwarder itself, around QEMU
        wrapped = ["/usr/bin/python3", "-I", "-S", "/xw/sockets/xwfwd.py", "--sockets", "/xw/sockets",
                   "--listen", "8080", "--", "sh", "-c", script]
        running = qemu.start(spec_for(root, minimal_image, wrapped, unix_socket_dir=sockdir, wallclock=150))
        assert running.wait_for("job-start", 90) is not None
        deadline = time.monotonic() + 90
        answer = b""
        while not answer and time.monotonic() < deadline:
            # until the guest's nc listens, QEMU accepts and closes at once: ask again (the event is the answer)
            with port.connect() as conn:
                conn.settimeout(20)
                answer = conn.recv(100)
        assert answer == b"served-by-the-guest\n"
        out = running.wait(120)
    finally:
        port.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert out.status == "COMPLETED", out.reason
    lines = sorted((root / "log" / "stdout.txt").read_text().splitlines())
    assert lines == sorted(f"BLOCKED {t}" for t in targets), lines
    for srv in (loopback, anyaddr):
        srv.setblocking(False)
        with pytest.raises(BlockingIOError):
            srv.accept()  # no connection ever arrived
        srv.close()


def test_the_vm_may_use_all_its_memory_within_its_cgroup(qemu: QemuExecutor, minimal_image: VmImage,
                                                         root: Path) -> None:
    vm = VmSpec(kernel=minimal_image.kernel, initrd=minimal_image.initrd, append="quiet", memory_mb=256)
    # dd's one 160 MiB buffer, filled from /dev/zero: most of the guest's RAM really used
    running = qemu.start(spec_for(root, minimal_image, ["dd", "if=/dev/zero", "of=/dev/null", "bs=160M", "count=1"],
                                  vm=vm))
    out = running.wait(180)
    assert (out.status, out.return_code) == ("COMPLETED", 0), (out.reason, (root / "log/stderr.txt").read_text())
    assert (root / "log" / "stderr.txt").read_text() == "1+0 records in\n1+0 records out\n"
    assert running.peak_memory_mb is not None and running.peak_memory_mb > 160
    assert "QEMU: memory limited to" in out.limits_notes["memory"]


@pytest.mark.slow
def test_ssh_into_a_debian_vm_through_a_forwarded_port(qemu: QemuExecutor, debian_image: VmImage, root: Path,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    assert debian_image.disk is not None
    before = hashlib.sha256(debian_image.disk.read_bytes()).hexdigest()
    keys = tmp_path_factory.mktemp("keys")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "id")], check=True)
    vm = VmSpec(kernel=debian_image.kernel, initrd=debian_image.initrd, append=debian_image.append,
                disk=debian_image.disk, disk_format="qcow2", memory_mb=512, listen_ports=[22],
                context=VmContext(ssh_authorized_keys=[(keys / "id.pub").read_text().strip()]))
    sockdir = Path("/tmp") / f"xwq{os.getpid()}{root.name[-6:]}"
    sockdir.mkdir()
    bridge = TcpBridge(JobPort(sockdir, 22))
    ssh = ["ssh", "-p", str(bridge.port), "-i", str(keys / "id"), "-o", "StrictHostKeyChecking=no",
           "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
           "-o", "LogLevel=ERROR"]
    running = qemu.start(JobSpec(
        jobdir=root / "job", logdir=root / "log", unix_socket_dir=sockdir, wallclock=600, vm=vm,
        argv=["sh", "-c", "echo waiting; while [ ! -e /job/done ]; do sleep 0.2; done; cat /job/done"]))
    try:
        assert running.wait_for("job-start", 400) is not None, running.console and running.console.tail(30)
        booted = time.monotonic()
        deadline = booted + 240
        while True:  # sshd comes up after the job started (cloud-init's final stage): retry until it answers
            proc = subprocess.run([*ssh, "xwjob@127.0.0.1", "id -un; pwd; command -v sudo su-to-root || echo no-sudo"],
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
        assert proc.returncode == 0, proc.stderr
        print(f"job-start {running.timings.get('job-start') or (running.console and running.console.events)}, "
              f"ssh ready {time.monotonic() - booted:.1f} s later")
        assert proc.stdout.splitlines() == ["xwjob", "/home/xwjob", "no-sudo"], proc.stdout
        # key only: a password login is not even offered; root may not log in
        pw = subprocess.run([*ssh, "-o", "PreferredAuthentications=password,keyboard-interactive",
                             "xwjob@127.0.0.1", "true"], capture_output=True, text=True, timeout=60)
        assert pw.returncode != 0 and "Permission denied (publickey)" in pw.stderr, pw.stderr
        rt = subprocess.run([*ssh, "root@127.0.0.1", "true"], capture_output=True, text=True, timeout=60)
        assert rt.returncode != 0 and "Permission denied" in rt.stderr, rt.stderr
        # the job user writes into the job dir; the job sees it and ends, and so does the VM
        done = subprocess.run([*ssh, "xwjob@127.0.0.1", "echo via-ssh > /job/done"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        out = running.wait(120)
    finally:
        running.stop("test over")
        bridge.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert (out.status, out.return_code) == ("COMPLETED", 0), out.reason
    assert (root / "log" / "stdout.txt").read_text() == "waiting\nvia-ssh\n"
    assert (root / "job" / "done").read_text() == "via-ssh\n"
    # the guest wrote its root disk all along (cloud-init, host keys, logs): only the overlay took it
    assert hashlib.sha256(debian_image.disk.read_bytes()).hexdigest() == before
    assert_nothing_left(root, running, set())


def test_the_probe_boots_and_is_cached_per_worker(qemu: QemuExecutor, qemu_workdir: Path,
                                                  minimal_image: VmImage) -> None:
    info = qemu.probe()
    assert info["hypervisor"] == "qemu" and info["accel"] in ("kvm", "tcg") and info["version"]
    assert info["max_cpus"] >= 1 and info["max_memory_mb"] > 256
    if info["accel"] == "tcg" and os.path.exists("/dev/kvm"):
        assert "did not boot" in info["kvm"]  # /dev/kvm alone is not taken as proof: the probe booted
    cache = qemu_workdir / PROBE_FILE
    doc = json.loads(cache.read_text())
    doc["result"]["kvm"] = "read from the cache"
    cache.write_text(json.dumps(doc))
    again = QemuExecutor(qemu_workdir, probe_kernel=minimal_image.kernel, probe_initrd=minimal_image.initrd)
    assert again.probe()["kvm"] == "read from the cache"  # a new executor on the same workdir: no new boot


def test_bad_vm_specs_are_refused_before_anything_runs(qemu: QemuExecutor, minimal_image: VmImage,
                                                       root: Path) -> None:
    base = VmSpec(kernel=minimal_image.kernel, initrd=minimal_image.initrd)
    cases: list[tuple[JobSpec, str]] = [
        (JobSpec(jobdir=root / "job", logdir=root / "log", argv=["true"]), "not a VM job"),
        (spec_for(root, minimal_image, ["true"], vm=VmSpec(initrd=minimal_image.initrd)), "kernel or a disk"),
        (spec_for(root, minimal_image, ["true"], vm=VmSpec(kernel=root / "nope")), "does not exist"),
        (spec_for(root, minimal_image, ["true"], vm=VmSpec(kernel=minimal_image.kernel, cpus=999)), "cpus"),
        (spec_for(root, minimal_image, ["true"], vm=base, memory_mb=128), "more than a job may use"),
        (spec_for(root, minimal_image, ["true"], vm=base, env={"A-B": "x"}), "A-B"),
        (spec_for(root, minimal_image, ["true"], vm=VmSpec(kernel=minimal_image.kernel, listen_ports=[22])),
         "socket dir"),
        (spec_for(root, minimal_image, ["/usr/bin/python3", "-I", "-S", "/xw/sockets/xwfwd.py", "--sockets",
                                        "/xw/sockets", "--forward", "1234", "--", "true"], vm=base), "forward"),
    ]
    for spec, why in cases:
        with pytest.raises(ExecutorError, match=why):
            qemu.start(spec)
    assert sorted(p.name for p in root.iterdir()) == ["job", "log"]


def test_a_template_with_a_backing_file_is_refused(qemu: QemuExecutor, minimal_image: VmImage, root: Path) -> None:
    evil = root / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", "-u", str(evil),
                    "1M"], check=True)
    vm = VmSpec(kernel=minimal_image.kernel, initrd=minimal_image.initrd, disk=evil, disk_format="qcow2")
    running = qemu.start(spec_for(root, minimal_image, ["true"], vm=vm))
    out = running.wait(60)
    assert out.status == "ERROR" and "backing file" in out.reason, out.reason
    assert not running.run_dir.exists()


def test_split_forwarder_unwraps_only_the_forwarder() -> None:
    assert split_forwarder(["sh", "-c", "x"]) == ([], [], ["sh", "-c", "x"])
    wrapped = ["/usr/bin/python3", "-I", "-S", "/xw/sockets/xwfwd.py", "--sockets", "/xw/sockets", "--listen",
               "22,8080", "--forward", "5432", "--", "sh", "-c", "x -- y"]
    assert split_forwarder(wrapped) == ([22, 8080], [5432], ["sh", "-c", "x -- y"])
