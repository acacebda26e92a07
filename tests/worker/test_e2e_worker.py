"""The worker end to end: a real server process, real worker processes, real bubblewrap sandboxes.

Works are submitted with the SDK, results fetched with the classic ``xwresults`` command. Tests that do not stop,
kill or specially configure the grid share one server and one worker (every work is pinned to its worker with
``expected_host``, so a worker started by one test never takes another test's work). Waits are on observable
states (the server's work status and events, the worker's ``status.json``, files the job writes in its job dir),
always bounded.

Gate jobs: a job that must be "in the middle" while the test does something (kill its worker, stop the server,
pause the worker) writes ``started.txt`` and then waits until the test creates ``go`` in its job dir on the host.
So no test depends on how long a job sleeps.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from cluster import ServerProc
from sdkworker import wait_for, wait_status
from workerproc import WorkerProc

from xwhep.client import Client
from xwhep.worker.executors.native import live_job_dir

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.timeout(120),
]

FAST = ["--alive-period", "0.5", "--alive-timeout", "3"]  # workers take their alive period from the server
FINAL = {"COMPLETED", "ERROR", "FAILED"}
XWRESULTS = Path(sys.executable).parent / "xwresults"


# --- helpers ---------------------------------------------------------------------------------------------------------

def put_app(client: Client, tmp: Path, name: str, script: str) -> str:
    """Register a one-file app (a script with its #! line) for linux/x86_64; returns the app name."""
    path = tmp / f"{name}.bin"
    path.write_text(script)
    path.chmod(0o755)
    client.put_app(name, binaries={"linux/x86_64": path})
    return name


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def transitions(client: Client, uid: str) -> list[str]:
    """The work's states in event order (the submission's target first)."""
    return [e["target"] for e in client.events(uid) if e["action"] in ("work.submit", "work.transition")]


def in_order(seq: list[str], wanted: list[str]) -> bool:
    """``wanted`` is a subsequence of ``seq``."""
    it = iter(seq)
    return all(any(x == w for x in it) for w in wanted)


def xwresults(server: ServerProc, uid: str, out: Path) -> Path:
    """Download a work's result with the classic command (verified by it); returns the file it printed."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(XWRESULTS), "--xwconfig", str(server.admin_conf), "--xwout", str(out),
                           "--xwnoerase", uid], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"xwresults failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
    paths = [Path(line.strip()) for line in proc.stdout.splitlines() if line.strip()]
    assert len(paths) == 1 and paths[0].is_file(), f"xwresults printed {proc.stdout!r}"
    return paths[0]


def result_files(server: ServerProc, uid: str, out: Path) -> dict[str, bytes]:
    """The result's members: a zip is opened; a lone result file is returned under its own name."""
    path = xwresults(server, uid, out)
    if path.name == f"{uid}-result.zip":
        with zipfile.ZipFile(path) as z:
            return {n: z.read(n) for n in z.namelist()}
    prefix = f"{uid}-"
    assert path.name.startswith(prefix), path
    return {path.name[len(prefix):]: path.read_bytes()}


def job_dir(worker: WorkerProc, task: str) -> Path:
    return worker.workdir / "jobs" / task / "job"


def running_task(worker: WorkerProc, work: str, timeout: float = 30.0) -> str:
    """Wait until ``work`` runs in a sandbox on ``worker`` (its gate job has written started.txt); return the
    task uid. Then the worker's status must say so too (it is refreshed at least every alive period)."""
    st = worker.wait_status(lambda s: any(j["work"] == work for j in s["running"]), timeout,
                            f"work {work} taken by the worker")
    task = str(next(j["task"] for j in st["running"] if j["work"] == work))
    wait_for(lambda: (job_dir(worker, task) / "started.txt").exists(), timeout, "the job to start")
    worker.wait_status(lambda s: any(j["task"] == task and j["phase"] == "running" for j in s["running"]), 30,
                       f"the worker status to show task {task} running")
    return task


def release(worker: WorkerProc, task: str) -> None:
    """Open the gate of a gate job: through the job's own view of its dir (its overlay, see live_job_dir)."""
    (live_job_dir(job_dir(worker, task)) / "go").write_text("go\n")


def sleep_1000_pids() -> set[int]:
    pids = set()
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["cmdline"] == ["sleep", "1000"] and p.info["status"] != psutil.STATUS_ZOMBIE:
                pids.add(p.pid)
        except psutil.Error:
            continue
    return pids


def pids_mentioning(text: str) -> set[int]:
    """Processes whose command line or working directory mentions ``text`` (a job's bwrap monitor works in the
    job dir's parent; its command line names no host path)."""
    pids = set()
    for p in psutil.process_iter(["cmdline", "status", "cwd"]):
        try:
            mentions = any(text in a for a in [*(p.info["cmdline"] or []), p.info["cwd"] or ""])
            if p.info["status"] != psutil.STATUS_ZOMBIE and mentions:
                pids.add(p.pid)
        except psutil.Error:
            continue
    return pids


GATE_APP = """#!/bin/sh
# A gate job: starts, waits for the test to create ./go, then writes its result.
echo "started" > started.txt
while [ ! -e go ]; do sleep 0.05; done
echo "finished: $*" > result.txt
"""


# --- one shared grid: server + worker --------------------------------------------------------------------------------

@dataclass
class Grid:
    root: Path
    server: ServerProc
    client: Client
    worker: WorkerProc
    host: str

    def submit(self, app: str, worker: WorkerProc | None = None, **kw: Any) -> str:
        """Submit a work pinned to ``worker`` (default: the grid's own); returns its uid."""
        host = self.host if worker is None else str(worker.status()["host"])
        return str(self.client.submit(app, expected_host=host, **kw)["uid"])

    def run(self, app: str, worker: WorkerProc | None = None, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
        """Submit, wait until final, return the work."""
        uid = self.submit(app, worker, **kw)
        wait_status(self.client, uid, FINAL, timeout)
        return self.client.work(uid)


def start_worker(server: ServerProc, root: Path, **kw: Any) -> WorkerProc:
    w = WorkerProc(server, root, **kw).start()
    try:
        w.wait_status(lambda s: bool(s.get("host")), 30, "the worker to register")
    except BaseException:
        w.kill9()
        raise
    return w


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    """Start extra workers for one test (``spawn(server, "name", sections=…)``); all are stopped afterwards."""
    started: list[WorkerProc] = []

    def start(server: ServerProc, name: str, **kw: Any) -> WorkerProc:
        w = start_worker(server, tmp_path / name, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    root = tmp_path_factory.mktemp("grid")
    server = ServerProc(home=root / "server", args=FAST).start()
    worker: WorkerProc | None = None
    client: Client | None = None
    try:
        worker = start_worker(server, root / "worker", pool=2)
        client = server.client()
        yield Grid(root, server, client, worker, str(worker.status()["host"]))
    finally:
        if worker is not None:
            worker.stop()
        if client is not None:
            client.close()
        server.stop()


# --- real applications, inputs and results ------------------------------------------------------------------------

SHELL_APP = """#!/bin/sh
# Reads its dirin (greeting.txt, counter.txt, keep.txt) and stdin; writes result.txt, rewrites counter.txt.
echo "args: $*"
echo "a line on stderr" >&2
sum=0
while read -r n; do sum=$((sum + n)); done
{
  echo "greeting: $(cat greeting.txt)"
  echo "numbers from stdin summed: $sum"
  echo "uid: $(id -u) cwd: $(pwd) home: $HOME"
} > result.txt
echo $(( $(cat counter.txt) + 1 )) > counter.txt
"""

PY_APP = """#!/usr/bin/python3
# Reads config.json from its dirin and numbers from stdin; writes only summary.json (nothing on stdout/stderr).
import json
import sys

cfg = json.load(open("config.json"))
nums = [int(x) for x in sys.stdin.read().split()]
with open("summary.json", "w") as f:
    json.dump({"label": cfg["label"], "total": cfg["scale"] * sum(nums), "args": sys.argv[1:],
               "python": sys.executable}, f)
"""


def test_shell_app_with_dirin_and_stdin(grid: Grid, tmp_path: Path) -> None:
    app = put_app(grid.client, tmp_path, unique("sh"), SHELL_APP)
    env = tmp_path / "env"
    env.mkdir()
    (env / "greeting.txt").write_text("hello from the dirin\n")
    (env / "counter.txt").write_text("41\n")
    (env / "keep.txt").write_text("untouched\n")
    stdin = tmp_path / "numbers.txt"
    stdin.write_text("1\n2\n3\n4\n")
    w = grid.run(app, args="one 'two words'", xwenv=str(env), stdin=str(stdin))
    assert (w["status"], w["return_code"]) == ("COMPLETED", 0), w
    files = result_files(grid.server, w["uid"], tmp_path / "out")
    # new and modified files plus the captured streams; the untouched dirin files are not sent back
    assert set(files) == {"result.txt", "counter.txt", "stdout.txt", "stderr.txt"}
    assert files["result.txt"].decode().splitlines() == [
        "greeting: hello from the dirin", "numbers from stdin summed: 10", "uid: 1000 cwd: /job home: /job"]
    assert files["counter.txt"] == b"42\n"
    assert files["stdout.txt"] == b"args: one two words\n"
    assert files["stderr.txt"] == b"a line on stderr\n"


def test_python_app_with_dirin_and_stdin(grid: Grid, tmp_path: Path) -> None:
    import json

    app = put_app(grid.client, tmp_path, unique("py"), PY_APP)
    env = tmp_path / "env"
    env.mkdir()
    (env / "config.json").write_text(json.dumps({"label": "scaled", "scale": 3}))
    stdin = tmp_path / "numbers.txt"
    stdin.write_text("5 6\n7\n")
    w = grid.run(app, args="--flag x", xwenv=str(env), stdin=str(stdin))
    assert (w["status"], w["return_code"]) == ("COMPLETED", 0), w
    files = result_files(grid.server, w["uid"], tmp_path / "out")
    # a lone result file comes back as is, not zipped
    assert list(files) == ["summary.json"]
    assert json.loads(files["summary.json"]) == {"label": "scaled", "total": 54, "args": ["--flag", "x"],
                                                 "python": "/usr/bin/python3"}


def test_nonzero_exit_is_completed_with_its_return_code(grid: Grid, tmp_path: Path) -> None:
    app = put_app(grid.client, tmp_path, unique("exit7"), "#!/bin/sh\necho partial output\nexit 7\n")
    w = grid.run(app)
    assert (w["status"], w["return_code"]) == ("COMPLETED", 7), w
    [task] = grid.client.tasks(w["uid"])
    assert (task["status"], task["return_code"]) == ("COMPLETED", 7)
    assert result_files(grid.server, w["uid"], tmp_path / "out") == {"stdout.txt": b"partial output\n"}


# --- the sandbox, seen from a real worker ---------------------------------------------------------------------------

CAT_APP = """#!/bin/sh
for f in "$@"; do
  if cat "$f" 2>/dev/null; then echo "READ $f"; else echo "DENIED $f"; fi
done
"""


def test_job_cannot_read_the_workers_credentials(grid: Grid, tmp_path: Path) -> None:
    secrets = [grid.worker.config, grid.server.worker_conf, grid.server.admin_conf, grid.worker.workdir / "host.json"]
    for f in secrets:
        assert f.is_file()
    password = grid.server.conf("worker")["password"]
    assert password and password in grid.worker.config.read_text()
    app = put_app(grid.client, tmp_path, unique("cat"), CAT_APP)
    w = grid.run(app, args=" ".join(str(f) for f in secrets))
    assert w["status"] == "COMPLETED", w
    files = result_files(grid.server, w["uid"], tmp_path / "out")
    out = files["stdout.txt"].decode()
    assert out.splitlines() == [f"DENIED {f}" for f in secrets]
    for content in files.values():
        assert password.encode() not in content
        assert grid.server.conf("admin")["password"].encode() not in content


WRITE_APP = """#!/bin/sh
try() { if (echo pwned > "$1") 2>/dev/null; then echo "WROTE $1"; else echo "DENIED $1"; fi; }
for f in "$@"; do try "$f"; done
try inside.txt
"""


def test_job_cannot_write_outside_its_job_dir(grid: Grid, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    targets = [Path(f"/var/tmp/xwhep-e2e-{tag}"), grid.worker.workdir / f"pwned-{tag}",
               grid.worker.workdir / "jobs" / f"pwned-{tag}", grid.server.home / f"pwned-{tag}",
               tmp_path / f"pwned-{tag}", Path(f"/usr/pwned-{tag}"), Path(f"/etc/pwned-{tag}"),
               Path(f"/pwned-{tag}"), Path(f"/job/../pwned-{tag}"), Path(f"/root/pwned-{tag}")]
    app = put_app(grid.client, tmp_path, unique("write"), WRITE_APP)
    try:
        w = grid.run(app, args=" ".join(str(t) for t in targets))
        assert w["status"] == "COMPLETED", w
        files = result_files(grid.server, w["uid"], tmp_path / "out")
        assert files["stdout.txt"].decode().splitlines() == [*(f"DENIED {t}" for t in targets), "WROTE inside.txt"]
        assert files["inside.txt"] == b"pwned\n"  # the job dir itself is writable
        leaked = [t for t in targets if t.exists() or Path(os.path.normpath(t)).exists()]
        assert not leaked
    finally:
        for t in targets:  # only there if the sandbox leaked; the names are unique to this run
            if t.is_file():
                t.unlink()


NET_APP = """#!/usr/bin/python3
import socket
import sys

for port in sys.argv[1:]:
    try:
        socket.create_connection(("127.0.0.1", int(port)), timeout=3).close()
        print("CONNECTED", port)
    except OSError as e:
        print("BLOCKED", port, type(e).__name__)
# the sandbox has its own loopback: connecting to itself works
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
socket.create_connection(srv.getsockname(), timeout=3).close()
print("OWN LOOPBACK OK")
"""


def test_job_cannot_reach_a_server_on_the_hosts_loopback(grid: Grid, tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel would complete a handshake even without accept()
        port = listener.getsockname()[1]
        app = put_app(grid.client, tmp_path, unique("net"), NET_APP)
        w = grid.run(app, args=f"{port} {grid.server.port}")
        assert w["status"] == "COMPLETED", w
        out = result_files(grid.server, w["uid"], tmp_path / "out")["stdout.txt"].decode().splitlines()
        assert out[0].startswith(f"BLOCKED {port} ")
        assert out[1].startswith(f"BLOCKED {grid.server.port} ")  # nor the xwhep server itself
        assert out[2] == "OWN LOOPBACK OK"
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()[0].close()  # nothing ever connected


DAEMON_APP = """#!/bin/sh
# Double-fork a daemon in a new session, make sure it runs, then wait for ./go and exit leaving it behind.
setsid sh -c 'sleep 1000 & echo $! > daemon.pid' </dev/null >/dev/null 2>&1 &
while [ ! -s daemon.pid ]; do sleep 0.05; done
kill -0 "$(cat daemon.pid)" && echo "daemon running"
echo started > started.txt
while [ ! -e go ]; do sleep 0.05; done
echo "main process exits"
"""


def test_job_leaves_no_process_behind(grid: Grid, tmp_path: Path) -> None:
    before = sleep_1000_pids()
    app = put_app(grid.client, tmp_path, unique("daemon"), DAEMON_APP)
    uid = grid.submit(app)
    task = running_task(grid.worker, uid)
    assert grid.worker.proc is not None
    worker = psutil.Process(grid.worker.proc.pid)

    def daemon_under_worker() -> set[int]:
        kids = {p.pid for p in worker.children(recursive=True)}
        return (sleep_1000_pids() - before) & kids

    wait_for(daemon_under_worker, 30, "the job's daemon to show up among the worker's descendants")
    release(grid.worker, task)
    assert wait_status(grid.client, uid, FINAL) == "COMPLETED"
    assert sleep_1000_pids() - before == set(), "the job's daemon survived the job"
    out = result_files(grid.server, uid, tmp_path / "out")["stdout.txt"].decode()
    assert out == "daemon running\nmain process exits\n"


def test_memory_hungry_job_ends_in_error(grid: Grid, spawn: Callable[..., WorkerProc], tmp_path: Path) -> None:
    worker = spawn(grid.server, "small", sections={"worker": {"job_memory_mb": 64}})
    app = put_app(grid.client, tmp_path, unique("hog"),
                  "#!/usr/bin/python3\nx = b'a' * (400 << 20)\nprint('survived', len(x))\n")
    w = grid.run(app, worker=worker)
    assert w["status"] == "ERROR", w
    assert "memory limit" in w["reason"] and "64 MiB" in w["reason"], w["reason"]
    assert w["result"] is None


def test_wallclock_limit_fails_the_work(grid: Grid, tmp_path: Path) -> None:
    app = put_app(grid.client, tmp_path, unique("slow"), "#!/bin/sh\necho start\nsleep 30\necho end\n")
    t0 = time.monotonic()
    w = grid.run(app, wallclock=2, timeout=25)
    assert w["status"] == "FAILED", w
    assert "wall-clock" in w["reason"], w["reason"]
    assert time.monotonic() - t0 < 25


def test_zip_slip_dirin_is_refused(grid: Grid, tmp_path: Path) -> None:
    evil = tmp_path / "slip.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("fine.txt", "fine\n")
        z.writestr("../../evil.txt", "evil\n")
    data = grid.client.put_data(evil, name="slip.zip")
    app = put_app(grid.client, tmp_path, unique("slip"), "#!/bin/sh\necho ran > ran.txt\n")
    w = grid.run(app, dirin=data["uid"])
    assert w["status"] == "ERROR", w
    assert "../../evil.txt" in w["reason"], w["reason"]
    assert w["result"] is None
    # ../../ from the job dir (WORKDIR/jobs/TASK/job) is WORKDIR/jobs; look through the whole grid and this test
    found = [p for d in (grid.root, tmp_path) for p in d.rglob("evil.txt")]
    assert not found


def test_symlink_out_of_the_job_dir_is_refused(grid: Grid, tmp_path: Path) -> None:
    app = put_app(grid.client, tmp_path, unique("link"), "#!/bin/sh\nln -s /etc/passwd leak\necho linked\n")
    w = grid.run(app)
    assert w["status"] == "ERROR", w
    assert "symbolic link" in w["reason"] and "leak" in w["reason"], w["reason"]
    assert w["result"] is None


# --- failures: a worker killed, the server down -----------------------------------------------------------------------

RESCUE = {"xw-e2e-rescue": "1"}  # only the workers of the kill -9 test declare this package: the grid's cannot help


def test_killed_worker_work_is_rescheduled_on_another(grid: Grid, spawn: Callable[..., WorkerProc],
                                                        tmp_path: Path) -> None:
    c = grid.client
    first = spawn(grid.server, "first", sections={"worker": {"packages": RESCUE}})
    first_host = str(first.status()["host"])
    gate = tmp_path / "gate.sh"
    gate.write_text(GATE_APP)
    app = unique("rescue")
    c.put_app(app, binaries={"linux/x86_64": gate}, packages=RESCUE)
    uid = str(c.submit(app, args="x")["uid"])
    assert wait_status(c, uid, {"RUNNING"}) == "RUNNING"
    task = running_task(first, uid)
    first.kill9()
    # the sandbox dies with its worker (bwrap --die-with-parent)
    wait_for(lambda: not pids_mentioning(str(first.workdir)), 30, "the killed worker's job to disappear")

    assert wait_status(c, uid, {"PENDING"}, timeout=30) == "PENDING"  # LOST after the 3 s alive timeout
    second = spawn(grid.server, "second", sections={"worker": {"packages": RESCUE}})
    second_host = str(second.status()["host"])
    task2 = running_task(second, uid)
    assert task2 != task
    release(second, task2)
    assert wait_status(c, uid, FINAL) == "COMPLETED"
    assert result_files(grid.server, uid, tmp_path / "out")["result.txt"] == b"finished: x\n"

    w = c.work(uid)
    assert (w["host"], w["task"], w["retries"]) == (second_host, task2, 1)
    states = transitions(c, uid)
    assert in_order(states, ["PENDING", "RUNNING", "LOST", "PENDING", "RUNNING", "COMPLETED"]), states
    assert states.count("COMPLETED") == 1 and states.count("LOST") == 1, states
    tasks = sorted(c.tasks(uid), key=lambda t: t["trial"])
    assert [(t["uid"], t["host"], t["status"], t["trial"]) for t in tasks] == [
        (task, first_host, "LOST", 1), (task2, second_host, "COMPLETED", 2)]
    assert [t["result_sha256"] for t in tasks] == [None, w["result_sha256"]]  # one result, from the second
    assert len([e for e in c.events(task) if e["action"] == "task.lost"]) == 1
    # nothing counted twice: neither host still counts the work as running
    running = {h["uid"]: h["running"] for h in c.hosts() if h["uid"] in (first_host, second_host)}
    assert running == {first_host: 0, second_host: 0}


def test_result_made_while_the_server_is_down_is_delivered(make_server: Callable[..., ServerProc],
                                                           spawn: Callable[..., WorkerProc],
                                                           tmp_path: Path) -> None:
    # its own server, stopped and restarted; a generous alive timeout: the reaper must not declare the task LOST
    server = make_server(args=["--alive-period", "0.5", "--alive-timeout", "60"])
    c = server.client()
    worker = spawn(server, "w")
    app = put_app(c, tmp_path, "gate", GATE_APP)
    uid = str(c.submit(app, args="offline")["uid"])
    task = running_task(worker, uid)
    port = server.port
    server.stop()
    release(worker, task)
    report = worker.workdir / "spool" / task / "report.json"
    wait_for(report.exists, 30, "the finished job's report in the worker's spool")
    st = worker.wait_status(lambda s: s["results_pending"] == 1 and not s["running"], 30,
                            "the worker to hold one result")
    assert st["host"] and worker.status()["process_alive"]
    server.restart()
    assert server.port == port
    assert wait_status(c, uid, FINAL, timeout=60) == "COMPLETED"
    wait_for(lambda: not report.exists(), 30, "the spool entry to be dropped once the server has the result")
    assert result_files(server, uid, tmp_path / "out")["result.txt"] == b"finished: offline\n"
    assert [t["status"] for t in c.tasks(uid)] == ["COMPLETED"]
    assert "LOST" not in transitions(c, uid)
    c.close()


# --- activation -------------------------------------------------------------------------------------------------------

def test_worker_outside_its_time_windows_stays_idle(grid: Grid, spawn: Callable[..., WorkerProc],
                                                    tmp_path: Path) -> None:
    c = grid.client
    days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    other_day = days[(datetime.date.today().weekday() + 3) % 7]  # neither today nor tomorrow (midnight-safe)
    worker = spawn(grid.server, "w", sections={"activation": {"time_windows": f"{other_day} *"}})
    st = worker.wait_status(lambda s: "inactive" in (s["idle_reason"] or ""), 30, "the worker to be inactive")
    assert other_day in st["idle_reason"] and not st["active"], st
    host = str(st["host"])
    app = put_app(c, tmp_path, unique("hello"), "#!/bin/sh\necho hello\n")
    uid = grid.submit(app, worker)

    def last_alive() -> str:
        return str(next(h["last_alive"] for h in c.hosts() if h["uid"] == host))

    # the worker keeps signalling (alive every 0.5 s) without taking the work: watch 4 alive signals go by
    seen = {last_alive()}
    while len(seen) < 5:
        assert c.work(uid)["status"] == "PENDING"
        seen.add(wait_for(lambda: (t := last_alive()) not in seen and t, 20, "the next alive signal"))
    assert c.work(uid)["status"] == "PENDING"
    assert c.tasks(uid) == []
    st = worker.status()
    assert st["running"] == [] and "inactive" in st["idle_reason"] and st["process_alive"], st
    c.cancel(uid)


def test_pausing_mid_job_aborts_and_the_work_runs_again(grid: Grid, spawn: Callable[..., WorkerProc],
                                                        tmp_path: Path) -> None:
    c = grid.client
    pause = tmp_path / "pause"
    worker = spawn(grid.server, "w", sections={"activation": {"pause_file": str(pause)}})
    app = put_app(c, tmp_path, unique("gate"), GATE_APP)
    uid = grid.submit(app, worker, args="again")
    task = running_task(worker, uid)
    pause.touch()
    assert wait_status(c, uid, {"PENDING"}, timeout=20) == "PENDING"
    states = transitions(c, uid)
    assert in_order(states, ["RUNNING", "ABORTED", "PENDING"]), states
    st = worker.wait_status(lambda s: "paused by" in (s["idle_reason"] or ""), 30, "the worker to be paused")
    assert not st["active"] and st["running"] == []
    assert not pids_mentioning(str(job_dir(worker, task).parent)), "the aborted job is still running"
    aborted = next(t for t in c.tasks(uid) if t["uid"] == task)
    assert aborted["status"] == "ABORTED" and "deactivated" in (aborted["reason"] or ""), aborted

    pause.unlink()
    task2 = running_task(worker, uid)
    assert task2 != task
    release(worker, task2)
    assert wait_status(c, uid, FINAL) == "COMPLETED"
    assert result_files(grid.server, uid, tmp_path / "out")["result.txt"] == b"finished: again\n"
    states = transitions(c, uid)
    assert in_order(states, ["PENDING", "RUNNING", "ABORTED", "PENDING", "RUNNING", "COMPLETED"]), states
    assert states.count("COMPLETED") == 1
    tasks = sorted(c.tasks(uid), key=lambda t: t["started"])  # an abort charges no retry, but is its own trial
    assert tasks[0]["uid"] == task and tasks[-1]["uid"] == task2 and tasks[-1]["status"] == "COMPLETED", tasks
    # the deactivated worker announced itself inactive before aborting: its long-poll in flight got nothing back
    assert [t["status"] for t in tasks] == ["ABORTED", "COMPLETED"], [(t["status"], t["reason"]) for t in tasks]
