"""The native executor against the real bubblewrap and cgroups of this host (no mocks).

Jobs report back through files in their job dir, their stdout, or a Unix socket in the sandbox's socket dir;
the tests wait on those events (accept/recv), never on sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from xwhep.worker.cgroups import discover
from xwhep.worker.executors import Executor, ExecutorError, JobOutcome, JobSpec, RunningJob
from xwhep.worker.executors.native import NativeExecutor, NativeJob, build_bwrap_argv, measure_overhead

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.fixture
def ex() -> NativeExecutor:
    return NativeExecutor()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    job, log = tmp_path / "job", tmp_path / "log"
    job.mkdir()
    return job, log


@pytest.fixture(autouse=True)
def no_leftover_cgroups() -> Iterator[None]:
    yield
    prefix = f"xwhep-{os.getpid()}-"
    left = [d for h in discover() for d in h.own_dir.glob(prefix + "*")]
    assert not left, f"job cgroups left behind: {left}"


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes: keep the host side short (pytest's tmp_path can be long).
    d = Path(tempfile.mkdtemp(prefix="xws", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def listen_unix(sockdir: Path) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sockdir / "s"))
    srv.listen(4)
    srv.settimeout(20)
    return srv


def run(ex: NativeExecutor, dirs: tuple[Path, Path], argv: list[str], **kw: object) -> JobOutcome:
    job, log = dirs
    return ex.start(JobSpec(jobdir=job, logdir=log, argv=argv, **kw)).wait(timeout=60)  # type: ignore[arg-type]


def out_of(o: JobOutcome) -> str:
    return o.stdout.read_text()


def test_native_executor_implements_the_interface(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    assert isinstance(ex, Executor)
    job = ex.start(JobSpec(jobdir=dirs[0], logdir=dirs[1], argv=["true"]))
    assert isinstance(job, RunningJob)
    assert job.wait(30).status == "COMPLETED"


def test_job_cannot_read_files_outside_its_job_dir(ex: NativeExecutor, dirs: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    content = f"SECRET-{uuid.uuid4().hex}\n"
    secret_tmp = tmp_path / "secret.txt"  # under the host /tmp
    config_dir = Path.home() / ".config" / "xwhep"
    created_config = not config_dir.exists()
    config_dir.mkdir(parents=True, exist_ok=True)
    secret_cfg = config_dir / f"secret-{token}.key"
    secret_etc = Path("/etc") / f"xwhep-secret-{token}"
    secrets = [secret_tmp, secret_cfg, secret_etc]
    try:
        for p in secrets:
            p.write_text(content)
            assert p.read_text() == content  # the worker itself can read it
        (dirs[0] / "mine.txt").write_text("job input\n")
        script = (
            "import json, os, subprocess, sys\n"
            "res = {}\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        res[p] = open(p).read()\n"
            "    except OSError as e:\n"
            "        res[p] = type(e).__name__\n"
            "    r = subprocess.run(['cat', p], capture_output=True, text=True)\n"
            "    res[p + ' (cat)'] = r.stdout if r.returncode == 0 else 'cat failed'\n"
            "dirs = ('/root', '/home', '/work', '/etc/passwd', '/etc/shadow')\n"
            "res['visible'] = {d: os.path.exists(d) for d in dirs}\n"
            "res['etc'] = sorted(os.listdir('/etc'))\n"
            "print(json.dumps(res))\n"
        )
        o = run(ex, dirs, ["python3", "-c", script, "/job/mine.txt", *map(str, secrets)])
    finally:
        for p in secrets:
            p.unlink(missing_ok=True)
        if created_config:
            shutil.rmtree(config_dir, ignore_errors=True)
    assert o.status == "COMPLETED" and o.return_code == 0, o.stderr.read_text()
    assert content not in out_of(o) and content.strip() not in o.stderr.read_text()
    res = json.loads(out_of(o))
    assert res["/job/mine.txt"] == "job input\n"  # the probe did run and could read its own files
    for p in secrets:
        assert res[str(p)] == "FileNotFoundError"
        assert res[f"{p} (cat)"] == "cat failed"
    assert res["visible"] == {"/root": False, "/home": False, "/work": False, "/etc/passwd": True,
                              "/etc/shadow": False}
    # Only the minimal pieces of /etc are there, and the synthetic passwd holds no host account.
    assert set(res["etc"]) <= {"alternatives", "ld.so.cache", "passwd", "group", "hosts"}


def test_job_cannot_write_outside_its_job_dir(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    token = uuid.uuid4().hex
    targets = [f"/usr/xw-{token}", f"/etc/xw-{token}", f"/xw-{token}", f"/tmp/xw-{token}",
               f"{dirs[1]}/xw-{token}", f"{dirs[0].parent}/xw-{token}", "/job/result.txt"]
    script = (
        "import json, sys\n"
        "res = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        open(p, 'w').write('x')\n"
        "        res[p] = 'written'\n"
        "    except OSError as e:\n"
        "        res[p] = type(e).__name__\n"
        "print(json.dumps(res))\n"
    )
    o = run(ex, dirs, ["python3", "-c", script, *targets])
    assert o.status == "COMPLETED" and o.return_code == 0, o.stderr.read_text()
    res = json.loads(out_of(o))
    assert res["/job/result.txt"] == "written"
    assert (dirs[0] / "result.txt").read_text() == "x"
    assert res[f"/usr/xw-{token}"] == "OSError" or res[f"/usr/xw-{token}"] == "PermissionError"
    assert res[f"/etc/xw-{token}"] != "written" and res[f"/xw-{token}"] != "written"
    assert res[f"/tmp/xw-{token}"] == "written"  # its private /tmp...
    for p in targets[:-1]:  # ...but nothing reached the host
        assert not Path(p).exists(), p


def test_job_cannot_reach_host_loopback_or_lan(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("0.0.0.0", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    lan = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
           if a.family == socket.AF_INET and not a.address.startswith("127.")]
    try:
        # From the worker (the test) the service is reachable...
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        script = (
            "import json, socket, sys\n"
            "res = {}\n"
            "for h in sys.argv[2:]:\n"
            "    try:\n"
            "        socket.create_connection((h, int(sys.argv[1])), timeout=3).close()\n"
            "        res[h] = 'connected'\n"
            "    except OSError as e:\n"
            "        res[h] = type(e).__name__\n"
            "print(json.dumps({'res': res, 'ifaces': [n for _, n in socket.if_nameindex()]}))\n"
        )
        o = run(ex, dirs, ["python3", "-c", script, str(port), "127.0.0.1", *lan[:2]])
        assert o.status == "COMPLETED" and o.return_code == 0, o.stderr.read_text()
        res = json.loads(out_of(o))
        assert res["ifaces"] == ["lo"]
        assert set(res["res"]) == {"127.0.0.1", *lan[:2]}
        assert all(v != "connected" for v in res["res"].values()), res
        # ...and the server saw exactly one connection: the test's own.
        srv.setblocking(False)
        accepted = 0
        while True:
            try:
                c, _ = srv.accept()
            except BlockingIOError:
                break
            c.close()
            accepted += 1
        assert accepted == 1
    finally:
        srv.close()


DAEMON = r"""
import os, socket, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:          # the daemon: detached from the job, holding on forever
        os.close(r)
        os.write(w, b"x")
        os.close(w)
        while True:
            time.sleep(3600)
    os._exit(0)
os.close(w)
assert os.read(r, 1) == b"x"   # the daemon is up
os.wait()
s = socket.socket(socket.AF_UNIX)
s.connect("/xw/sockets/s")
s.sendall(b"ready\n")
s.recv(1)                       # wait for the test to let the job end
"""


def _procs_with(token: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        # bwrap's own two processes carry the job's command line too; only the job's processes count here
        if token in cmd and cmd[0] != "bwrap" and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_no_process_survives_the_job(ex: NativeExecutor, dirs: tuple[Path, Path], sockdir: Path) -> None:
    token = f"xwtoken-{uuid.uuid4().hex}"
    (dirs[0] / "daemon.py").write_text(DAEMON)
    srv = listen_unix(sockdir)
    job = ex.start(JobSpec(jobdir=dirs[0], logdir=dirs[1], argv=["python3", "/job/daemon.py", token],
                           unix_socket_dir=sockdir))
    conn, _ = srv.accept()
    with conn:
        assert conn.recv(16) == b"ready\n"
        procs = _procs_with(token)
        assert len(procs) == 2  # the job's main process and the double-forked, setsid daemon
        assert len({p.info["cmdline"][0] for p in procs}) == 1
        assert all(p.pid in job.pids() for p in procs)  # the cgroup tracks the daemon despite setsid
        conn.sendall(b"x")
        o = job.wait(30)
    srv.close()
    assert o.status == "COMPLETED" and o.return_code == 0, o.stderr.read_text()
    assert all(_gone(p) for p in procs)
    assert _procs_with(token) == []
    assert not any(token in (p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))


def test_stop_ends_the_whole_tree_at_once(ex: NativeExecutor, dirs: tuple[Path, Path], sockdir: Path) -> None:
    script = (
        "import socket, subprocess\n"
        "child = subprocess.Popen(['sleep', '1000'])\n"
        "s = socket.socket(socket.AF_UNIX); s.connect('/xw/sockets/s'); s.sendall(b'ready')\n"
        "s.recv(1)\n"
        "child.wait()\n"
    )
    srv = listen_unix(sockdir)
    job = ex.start(JobSpec(jobdir=dirs[0], logdir=dirs[1], argv=["python3", "-c", script], unix_socket_dir=sockdir))
    conn, _ = srv.accept()
    with conn:
        assert conn.recv(16) == b"ready"
        procs = [psutil.Process(pid) for pid in job.pids()]
        names = {p.name() for p in procs}
        assert {"bwrap", "python3", "sleep"} <= names
        t = time.monotonic()
        job.stop("worker deactivated")
        o = job.wait(10)
        elapsed = time.monotonic() - t
    srv.close()
    assert o.status == "ABORTED"
    assert o.reason == "worker deactivated"
    assert o.return_code is None
    assert elapsed < 3
    assert all(_gone(p) for p in procs)


def test_memory_hungry_job_is_stopped_with_the_reason(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    o = run(ex, dirs, ["python3", "-c", "x = b'a' * (300 << 20); print('survived', len(x))"], memory_mb=64)
    assert o.limits_applied == {"memory": True}
    assert o.status == "ERROR"
    assert o.reason == "memory limit exceeded (64 MiB)"
    assert "survived" not in out_of(o)


def test_job_within_its_memory_limit_completes(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    o = run(ex, dirs, ["python3", "-c", "x = b'a' * (16 << 20); print('ok', len(x))"], memory_mb=128)
    assert (o.status, o.return_code) == ("COMPLETED", 0), o.reason
    assert out_of(o) == f"ok {16 << 20}\n"


def test_wallclock_limit_fails_the_job(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    o = run(ex, dirs, ["sleep", "30"], wallclock=0.5)
    assert o.status == "FAILED"
    assert o.reason == "wall-clock limit exceeded (0.5 s)"
    assert o.return_code is None
    assert o.limits_applied == {"wallclock": True}
    assert 0.5 <= o.wall_s < 10


def test_nonzero_exit_is_completed_with_its_return_code(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    o = run(ex, dirs, ["python3", "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (o.status, o.return_code) == ("COMPLETED", 3)
    assert o.stdout == dirs[1] / "stdout.txt" and o.stderr == dirs[1] / "stderr.txt"
    assert o.stdout.read_text() == "out\n"
    assert o.stderr.read_text() == "err\n"
    assert list(dirs[0].iterdir()) == []  # the captured streams are not in the job dir


def test_stdin_file_is_fed_to_the_job(ex: NativeExecutor, dirs: tuple[Path, Path], tmp_path: Path) -> None:
    stdin = tmp_path / "stdin.txt"
    stdin.write_text("hello\nworld\n")
    o = run(ex, dirs, ["python3", "-c", "import sys; print(sys.stdin.read().upper(), end='')"], stdin=stdin)
    assert (o.status, o.return_code) == ("COMPLETED", 0)
    assert out_of(o) == "HELLO\nWORLD\n"
    o = run(ex, dirs, ["python3", "-c", "import sys; print(repr(sys.stdin.read()))"])
    assert out_of(o) == "''\n"  # no stdin: empty, not the worker's


def test_system_python_and_clean_environment(ex: NativeExecutor, dirs: tuple[Path, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XW_WORKER_SECRET", "do-not-leak")
    script = "import json, os, sys; print(json.dumps([sys.executable, sys.prefix, os.getcwd(), dict(os.environ)]))"
    o = run(ex, dirs, ["python3", "-c", script], env={"XW_JOB": "yes"})
    assert (o.status, o.return_code) == ("COMPLETED", 0), o.stderr.read_text()
    exe, prefix, cwd, env = json.loads(out_of(o))
    assert (exe, prefix, cwd) == ("/usr/bin/python3", "/usr", "/job")
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert env["HOME"] == "/job"
    assert env["XW_JOB"] == "yes"
    assert "XW_WORKER_SECRET" not in env
    assert set(env) <= {"PATH", "HOME", "XW_JOB", "PWD", "LC_CTYPE"}


def test_cpu_quota_is_enforced(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    script = (
        "import time\n"
        "t = time.monotonic()\n"
        "while time.monotonic() - t < 0.8:\n"
        "    pass\n"
        "print(time.process_time() / (time.monotonic() - t))\n"
    )
    o = run(ex, dirs, ["python3", "-c", script], cpu_quota=0.2)
    assert o.limits_applied == {"cpu": True}
    assert (o.status, o.return_code) == ("COMPLETED", 0)
    assert float(out_of(o)) < 0.45  # unlimited, a busy loop gets ~1.0 of a CPU


def test_process_limit_is_enforced(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    script = (
        "import os\n"
        "r, w = os.pipe()\n"
        "n = 0\n"
        "for _ in range(20):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except BlockingIOError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        os.close(w); os.read(r, 1); os._exit(0)\n"
        "    n += 1\n"
        "print(n)\n"
    )
    o = run(ex, dirs, ["python3", "-c", script], max_procs=4)
    assert o.limits_applied == {"procs": True}
    assert (o.status, o.return_code) == ("COMPLETED", 0), o.stderr.read_text()
    assert int(out_of(o)) == 3  # the job's own process + 3 children = 4


def test_unstartable_job_is_an_error(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    o = run(ex, dirs, ["/job/no-such-program"])
    assert o.status == "ERROR"
    assert o.reason.startswith("sandbox failed: bwrap: execvp /job/no-such-program")


def test_bad_specs_are_refused_before_starting(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    job, log = dirs
    with pytest.raises(ExecutorError, match="outside the job dir"):
        ex.start(JobSpec(jobdir=job, logdir=job / "logs", argv=["true"]))
    with pytest.raises(ExecutorError, match="empty argv"):
        ex.start(JobSpec(jobdir=job, logdir=log, argv=[]))
    with pytest.raises(ExecutorError, match="does not exist"):
        ex.start(JobSpec(jobdir=job / "missing", logdir=log, argv=["true"]))
    with pytest.raises(ExecutorError, match="not found"):
        NativeExecutor(bwrap="no-such-bwrap").start(JobSpec(jobdir=job, logdir=log, argv=["true"]))


def test_without_cgroups_limits_are_reported_unapplied(dirs: tuple[Path, Path]) -> None:
    o = run(NativeExecutor(use_cgroups=False), dirs, ["python3", "-c", "print(1)"], memory_mb=64, wallclock=30)
    assert (o.status, o.return_code) == ("COMPLETED", 0)
    assert o.limits_applied == {"memory": False, "wallclock": True}
    assert "disabled" in o.limits_notes["memory"]


def test_wait_times_out_while_running(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    job = ex.start(JobSpec(jobdir=dirs[0], logdir=dirs[1], argv=["sleep", "30"]))
    assert isinstance(job, NativeJob)
    with pytest.raises(TimeoutError):
        job.wait(timeout=0.05)
    assert not job.done
    job.stop("test over")
    assert job.wait(10).status == "ABORTED"


def test_bwrap_command_line_shape(dirs: tuple[Path, Path], sockdir: Path) -> None:
    argv = build_bwrap_argv(JobSpec(jobdir=dirs[0], logdir=dirs[1], argv=["python3", "x.py"],
                                    unix_socket_dir=sockdir))
    joined = " ".join(argv)
    for flag in ("--unshare-all", "--die-with-parent", "--new-session", "--clearenv", "--cap-drop ALL"):
        assert flag in joined
    assert f"--bind {dirs[0].resolve()} /job" in joined
    assert f"--bind {sockdir.resolve()} /xw/sockets" in joined
    assert "--share-net" not in argv
    assert argv[-3:] == ["--", "python3", "x.py"]
    # Never the whole /etc, nor the host's home or /tmp.
    for i, a in enumerate(argv[:-1]):
        if a in ("--bind", "--ro-bind", "--ro-bind-try"):
            assert argv[i + 1] not in ("/etc", "/root", "/home", "/tmp", "/work", "/")


def test_measure_overhead_returns_milliseconds() -> None:
    ms = measure_overhead(3)
    assert 0 < ms < 2000


# --- what the job can learn of the host, and what it can leave there (issue 13 §3) ---------------------------------

PROBE = r"""
for p in /proc/[0-9]*; do
  echo "== $p"; tr '\0' ' ' < $p/cmdline; echo; tr '\0' ' ' < $p/environ; echo
  for f in $p/fd/*; do readlink "$f"; done
  readlink $p/cwd $p/root $p/exe
done
cat /proc/self/mountinfo /proc/self/mounts
cat
"""


def test_job_sees_no_host_path(ex: NativeExecutor, dirs: tuple[Path, Path], tmp_path: Path) -> None:
    # Issue 13 §3: the host workdir showed in /proc/1/cmdline (bwrap's arguments) and in mountinfo.
    stdin = tmp_path / "stdin.txt"
    stdin.write_text("the stdin\n")
    o = run(ex, dirs, ["/bin/sh", "-c", PROBE], stdin=stdin)
    assert o.status == "COMPLETED", o.reason
    out = out_of(o)
    assert "== /proc/1" in out and " /job rw,nosuid,nodev" in out and out.endswith("the stdin\n")  # it looked
    for secret in (str(tmp_path), str(tmp_path.resolve()), "pytest-of-"):
        assert secret not in out, [line for line in out.splitlines() if secret in line]
    assert sorted(p.name for p in dirs[0].parent.iterdir()) == ["job", "log", "stdin.txt"]  # no overlay leftovers


def test_without_the_overlay_mountinfo_would_show_the_job_dir(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    # the control of the test above: the probe does see a host path where there is one
    o = run(NativeExecutor(hide_paths=False), dirs, ["/bin/sh", "-c", PROBE])
    assert str(dirs[0].resolve()) in out_of(o)


SETUID = r"""
cp /bin/true t && chmod 755 t && ./t && echo "chmod 755: ok"
for m in u+s g+s 4755 2755 6755; do chmod $m t 2>/dev/null && echo "chmod $m: ok" || echo "chmod $m: refused"; done
cp -p /usr/bin/passwd . 2>/dev/null; echo "cp -p passwd: $(stat -c %a passwd)"
python3 - <<'PY'
import os
tries = [("open 4755", lambda: os.open("o", os.O_CREAT | os.O_WRONLY, 0o4755)),
         ("open tmpfile 2755", lambda: os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o2755)),
         ("mkdir 2755", lambda: os.mkdir("d", 0o2755)),
         ("mknod 4755", lambda: os.mknod("n", 0o104755)),
         ("mknod char device", lambda: os.mknod("c", 0o020644, os.makedev(1, 3))),
         ("fchmod 4755", lambda: os.fchmod(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644), 0o4755)),
         ("chmod via /proc/self/fd", lambda: os.chmod(f"/proc/self/fd/{os.open('t', os.O_RDONLY)}", 0o4755)),
         ("open plain", lambda: os.open("p", os.O_CREAT | os.O_WRONLY, 0o644))]
for what, call in tries:
    try:
        call()
        print(f"{what}: ok")
    except OSError as e:
        print(f"{what}: refused ({e.strerror})")
PY
grep " /job " /proc/self/mountinfo
"""


def test_job_cannot_make_setuid_files_nor_devices(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    # Issue 13 §3: with the worker as root, the job's uid 1000 is root on the host: a job could leave a setuid-root
    # binary in the workdir. The bits are refused at the source; /job is also mounted nosuid,nodev.
    o = run(ex, dirs, ["/bin/sh", "-c", SETUID])
    assert o.status == "COMPLETED", o.reason
    lines = out_of(o).splitlines()
    assert lines[:6] == ["chmod 755: ok", "chmod u+s: refused", "chmod g+s: refused", "chmod 4755: refused",
                         "chmod 2755: refused", "chmod 6755: refused"], lines
    assert lines[6] == "cp -p passwd: 700"  # copied, without its setuid bit
    assert lines[7:15] == [
        "open 4755: refused (Operation not permitted)", "open tmpfile 2755: refused (Operation not permitted)",
        "mkdir 2755: refused (Operation not permitted)", "mknod 4755: refused (Operation not permitted)",
        "mknod char device: refused (Operation not permitted)", "fchmod 4755: refused (Operation not permitted)",
        "chmod via /proc/self/fd: refused (Operation not permitted)", "open plain: ok"], lines
    assert " /job rw,nosuid,nodev" in lines[15], lines[15]
    # on the host: the files are there, and not one carries a setuid/setgid bit or is a device
    made = {p.name: p.lstat() for p in dirs[0].iterdir()}
    assert {"t", "passwd", "p", "f"} <= set(made), made
    assert made["t"].st_uid == os.getuid() and made["t"].st_mode & 0o777 == 0o755
    for name, st in made.items():
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), name
        assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), name


def test_the_seccomp_filter_is_built_for_both_abis() -> None:
    from xwhep.worker.executors.seccomp import setuid_filter, supported

    assert supported()
    for machine in ("x86_64", "aarch64"):
        prog = setuid_filter(machine)
        assert len(prog) % 8 == 0 and 8 < len(prog) // 8 < 256


OVERLAY_OPS = r"""
echo changed > in.txt; rm gone.txt; mv sub moved; mkdir -p new/deep; echo x > new/deep/x.txt
ln moved/a.txt hard.txt; ln -s moved/a.txt soft.txt; rmdir empty; echo "$(cat moved/a.txt)" > copy.txt
"""


def test_job_dir_through_the_overlay_is_the_job_dir(ex: NativeExecutor, dirs: tuple[Path, Path]) -> None:
    job = dirs[0]
    (job / "in.txt").write_text("original\n")
    (job / "gone.txt").write_text("delete me\n")
    (job / "sub").mkdir()
    (job / "sub" / "a.txt").write_text("a\n")
    (job / "empty").mkdir()
    o = run(ex, dirs, ["/bin/sh", "-c", OVERLAY_OPS])
    assert (o.status, o.return_code) == ("COMPLETED", 0), o.reason
    # every change lands in the job dir itself, as plain files: no whiteouts, nothing of the overlay's own
    files = sorted(str(p.relative_to(job)) for p in job.rglob("*"))
    assert files == ["copy.txt", "hard.txt", "in.txt", "moved", "moved/a.txt", "new", "new/deep", "new/deep/x.txt",
                     "soft.txt"], files
    assert (job / "in.txt").read_text() == "changed\n" and (job / "copy.txt").read_text() == "a\n"
    assert os.readlink(job / "soft.txt") == "moved/a.txt"
    assert (job / "hard.txt").stat().st_ino == (job / "moved" / "a.txt").stat().st_ino
    assert not any(stat.S_ISCHR(p.lstat().st_mode) for p in job.rglob("*"))


def test_big_stdin_and_stdout_go_through_the_pipes(ex: NativeExecutor, dirs: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    stdin = tmp_path / "big.bin"
    stdin.write_bytes(os.urandom(3 << 20))  # more than any pipe buffer
    o = run(ex, dirs, ["/bin/sh", "-c", "cat; head -c 5000000 /dev/zero >&2"], stdin=stdin)
    assert (o.status, o.return_code) == ("COMPLETED", 0), o.reason
    assert o.stdout.read_bytes() == stdin.read_bytes()
    assert o.stderr.read_bytes() == bytes(5_000_000)
    o = run(ex, dirs, ["true"], stdin=stdin)  # a job that never reads its stdin still ends
    assert (o.status, o.return_code) == ("COMPLETED", 0), o.reason
