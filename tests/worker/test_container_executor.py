"""The podman executor with real podman and runc (CONTAINERS_CONF: the one the project ships), on an image made
here from busybox-static (a root filesystem tarball: no registry anywhere)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from xwhep.vm import images
from xwhep.worker.cgroups import discover
from xwhep.worker.executors import ExecutorError, JobSpec
from xwhep.worker.executors.base import ContainerSpec
from xwhep.worker.executors.container import PARENT_PREFIX, PodmanExecutor, PodmanJob, image_ref
from xwhep.worker.packing import pack_results, snapshot


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def podman() -> PodmanExecutor:
    ex = PodmanExecutor()
    ok, why = ex.available()
    if not ok:
        if _in_ci():
            pytest.fail(f"podman is required in CI: {why}", pytrace=False)
        pytest.skip(why)
    return ex


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox root filesystem as a tarball (busybox-static from the Debian mirror, as the VM images)."""
    work = tmp_path_factory.mktemp("rootfs")
    broot, _ = images._busybox(work)
    tar = work / "rootfs.tar"
    with tarfile.open(tar, "w") as tf:
        def add_dir(name: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        for d in ("bin", "etc", "tmp", "job", "proc", "sys", "dev"):
            add_dir(d)
        tf.add(broot / "bin" / "busybox", "bin/busybox")
        for applet in ("sh", "cat", "echo", "id", "ls", "sleep", "dd", "nc", "env", "head", "wc", "touch", "true"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tf.addfile(info)
        passwd = b"root:x:0:0:root:/:/bin/sh\nxwjob:x:1000:1000:xwhep job:/job:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size, info.mode = len(passwd), 0o644
        tf.addfile(info, io.BytesIO(passwd))
    return tar


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "job").mkdir()
    return tmp_path


def spec_for(root: Path, rootfs: Path, argv: list[str], **kw: object) -> JobSpec:
    return JobSpec(jobdir=root / "job", logdir=root / "log", argv=argv,  # type: ignore[arg-type]
                   container=ContainerSpec(image=rootfs), **kw)


def assert_nothing_left(podman: PodmanExecutor, job: PodmanJob, root: Path) -> None:
    ps = podman._podman("ps", "--all", "--filter", f"name={job.name}", "--format", "{{.Names}}")
    assert ps.returncode == 0 and ps.stdout.strip() == "", ps.stdout
    left = [h.mountpoint / job.parent.lstrip("/") for h in discover()]
    assert not [d for d in left if d.exists()], left
    mine = [p for h in discover() for p in h.mountpoint.glob(f"{PARENT_PREFIX}{os.getpid()}-*")]
    assert not mine, mine
    for p in [root / "job", *(root / "job").rglob("*")]:
        assert p.lstat().st_uid == os.geteuid(), f"{p} still belongs to the job's uid"


def test_a_container_job_runs_as_a_user_and_returns_its_results(podman: PodmanExecutor, rootfs: Path,
                                                                root: Path) -> None:
    job = root / "job"
    (job / "in.txt").write_text("input")
    (job / "sub").mkdir()
    (job / "sub" / "mod.txt").write_text("a")
    stdin = root / "stdin"
    stdin.write_text("piped\n")
    snap = snapshot(job)
    script = ('id -u; id -g; pwd; echo "$GREETING"; cat; cat in.txt; echo; echo b >> sub/mod.txt; '
              'echo made > new.txt; echo oops >&2; touch /etc/x 2>/dev/null || echo read-only-root; exit 3')
    running = podman.start(spec_for(root, rootfs, ["sh", "-c", script], env={"GREETING": "hi there"}, stdin=stdin,
                                    wallclock=60, memory_mb=128, cpu_quota=0.5, max_procs=32))
    out = running.wait(120)
    assert (out.status, out.return_code) == ("COMPLETED", 3), (out.reason, (root / "log/stderr.txt").read_text())
    assert (root / "log" / "stdout.txt").read_text() == "1000\n1000\n/job\nhi there\npiped\ninput\nread-only-root\n"
    assert (root / "log" / "stderr.txt").read_text() == "oops\n"
    assert (job / "sub" / "mod.txt").read_text() == "ab\n" and (job / "new.txt").read_text() == "made\n"
    assert out.limits_applied == {"wallclock": True, "cpu": True, "procs": True, "memory": True}
    packed = pack_results(job, snap, running.spec.stdout_path, running.spec.stderr_path, root / "result.zip")
    assert packed is not None and packed.files == ["new.txt", "sub/mod.txt", "stdout.txt", "stderr.txt"]
    assert_nothing_left(podman, running, root)


def test_the_container_has_no_network(podman: PodmanExecutor, rootfs: Path, root: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    anyaddr = socket.create_server(("0.0.0.0", 0))
    port, any_port = server.getsockname()[1], anyaddr.getsockname()[1]
    script = (f"cat /proc/net/dev | tail -n +3 | cut -d: -f1; "
              f"echo x | nc -w 2 127.0.0.1 {port} && echo REACHED || echo BLOCKED; "
              f"echo x | nc -w 2 10.0.2.2 {any_port} && echo REACHED || echo BLOCKED")
    out = podman.start(spec_for(root, rootfs, ["sh", "-c", script])).wait(60)
    assert out.status == "COMPLETED", out.reason
    assert [x.strip() for x in (root / "log" / "stdout.txt").read_text().split()] == ["lo", "BLOCKED", "BLOCKED"]
    for srv in (server, anyaddr):
        srv.setblocking(False)
        with pytest.raises(BlockingIOError):
            srv.accept()
        srv.close()


def test_the_memory_limit_is_enforced(podman: PodmanExecutor, rootfs: Path, root: Path) -> None:
    running = podman.start(spec_for(root, rootfs, ["dd", "if=/dev/zero", "of=/dev/null", "bs=100M", "count=1"],
                                    memory_mb=48))
    out = running.wait(60)
    assert out.status == "ERROR" and out.reason == "memory limit exceeded (48 MiB)", out.reason
    assert_nothing_left(podman, running, root)
    # the same within its limit runs
    ok = podman.start(spec_for(root, rootfs, ["dd", "if=/dev/zero", "of=/dev/null", "bs=16M", "count=1"],
                               memory_mb=48)).wait(60)
    assert (ok.status, ok.return_code) == ("COMPLETED", 0), ok.reason


def test_wall_clock_and_stop_kill_the_container_and_leave_nothing(podman: PodmanExecutor, rootfs: Path,
                                                                  root: Path) -> None:
    ready = root / "job" / "ready"
    running = podman.start(spec_for(root, rootfs, ["sh", "-c", "touch ready; exec sleep 600"], wallclock=3))
    out = running.wait(60)
    assert out.status == "FAILED" and "wall-clock limit exceeded (3 s)" in out.reason
    assert 3 <= out.wall_s < 30
    assert_nothing_left(podman, running, root)
    ready.unlink(missing_ok=True)
    # stop, once the job has said it runs (a FIFO it opens: the event, no polling)
    fifo = root / "job" / "started"
    os.mkfifo(fifo)
    os.chmod(fifo, 0o666)
    running = podman.start(spec_for(root, rootfs, ["sh", "-c", "echo up > started; exec sleep 600"]))
    opened = threading.Event()

    def read_fifo() -> None:
        with open(fifo) as f:
            opened.set()
            f.read()

    t = threading.Thread(target=read_fifo, daemon=True)
    t.start()
    t.join(60)
    assert opened.is_set()
    running.stop("the server cancelled the work")
    out = running.wait(60)
    assert (out.status, out.reason) == ("ABORTED", "the server cancelled the work")
    assert_nothing_left(podman, running, root)


def test_an_image_is_imported_once_per_worker(podman: PodmanExecutor, rootfs: Path, root: Path) -> None:
    sha = hashlib.sha256(rootfs.read_bytes()).hexdigest()
    ref = image_ref(sha)
    podman.start(spec_for(root, rootfs, ["true"])).wait(60)
    created = json.loads(podman._podman("image", "inspect", ref).stdout)[0]["Created"]
    fresh = PodmanExecutor()  # a new worker process: finds the image in the store by its sha256
    out = fresh.start(JobSpec(jobdir=root / "job", logdir=root / "log", argv=["true"],
                              container=ContainerSpec(image=rootfs, image_sha256=sha))).wait(60)
    assert out.status == "COMPLETED"
    assert json.loads(podman._podman("image", "inspect", ref).stdout)[0]["Created"] == created


def test_bad_container_specs_are_refused(podman: PodmanExecutor, rootfs: Path, root: Path) -> None:
    cases: list[tuple[JobSpec, str]] = [
        (JobSpec(jobdir=root / "job", logdir=root / "log", argv=["true"]), "not a container job"),
        (JobSpec(jobdir=root / "job", logdir=root / "log", argv=["true"],
                 container=ContainerSpec(image=root / "missing.tar")), "does not exist"),
        (JobSpec(jobdir=root / "job", logdir=root / "log", argv=["true"],
                 container=ContainerSpec(image=rootfs, image_sha256="0" * 64)), "does not match its sha256"),
        (spec_for(root, rootfs, []), "empty argv"),
        (spec_for(root, rootfs, ["true"], memory_mb=0), "memory limit must be positive"),
    ]
    for spec, why in cases:
        with pytest.raises(ExecutorError, match=why):
            podman.start(spec)


def test_a_command_the_runtime_cannot_start_is_an_error(podman: PodmanExecutor, rootfs: Path, root: Path) -> None:
    out = podman.start(spec_for(root, rootfs, ["/no/such/program"])).wait(60)
    assert out.status == "ERROR" and out.return_code is None, out
    assert out.reason.startswith("podman failed: ") and "/no/such/program" in out.reason
    # the job's own exit codes, even podman's, stay the job's
    own = podman.start(spec_for(root, rootfs, ["sh", "-c", "exit 125"])).wait(60)
    assert (own.status, own.return_code) == ("COMPLETED", 125)
