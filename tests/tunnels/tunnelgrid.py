"""Helpers of the tunnel tests (the shared grid is the ``grid`` fixture of conftest.py).

Tunnels end to end: a real server, real workers (bubblewrap sandboxes), real clients (``xwsubmit``, ``xwworks``,
``xwproxy``, curl, ssh).

One grid is shared by the tests of this folder that neither restart nor reconfigure it: a server, a worker that
accepts incoming connections, and three users — alice (who submits), carol (in alice's group) and bob (in no
group). Every work is pinned to the grid's worker (``--xwexpectedhost``) and cancelled by the test that made it.
Waits are on observable states (work status, relay state, a service answering), always bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster import ServerProc
from sdkworker import wait_for
from workerproc import WorkerProc

from xwhep.client import Client

BIN = Path(sys.executable).parent
FAST = ["--alive-period", "0.5", "--alive-timeout", "10"]
FINAL = {"COMPLETED", "ERROR", "FAILED"}

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


# --- helpers ---------------------------------------------------------------------------------------------------------

def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def xw(command: str, conf: Path, *args: str, timeout: float = 60,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a classic ``xw<command>`` script."""
    proc = subprocess.run([str(BIN / f"xw{command}"), *args, "--xwconfig", str(conf)], capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"xw{command} {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
    return proc


def xwsubmit(conf: Path, *args: str) -> str:
    """``xwsubmit …``; returns the work's uid."""
    uri = xw("submit", conf, *args).stdout.strip().splitlines()[-1]
    return uri.rsplit("/", 1)[1]


class Proxy:
    """An ``xwproxy`` process; its stdout lines arrive in a queue, its stderr is kept."""

    def __init__(self, conf: Path, *args: str, prefix: list[str] | None = None) -> None:
        self.cmd = [*(prefix or []), str(BIN / "xwproxy"), *args, "--xwconfig", str(conf)]
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.errors: list[str] = []

    def start(self) -> Proxy:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        proc = self.proc

        def out() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.put(line.rstrip("\n"))
            self.lines.put(None)

        def err() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.errors.append(line)

        threading.Thread(target=out, daemon=True).start()
        threading.Thread(target=err, daemon=True).start()
        return self

    def line(self, timeout: float = 30) -> str:
        """The next line it printed on stdout."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"xwproxy printed nothing in {timeout} s; stderr: {self.stderr}") from None
        if line is None:
            assert self.proc is not None
            raise AssertionError(f"xwproxy exited ({self.proc.wait()}): {self.stderr}")
        return line

    def port(self, timeout: float = 30) -> int:
        """The local port of its next ``127.0.0.1:PORT ADDRESS`` line."""
        return int(self.line(timeout).split()[0].rsplit(":", 1)[1])

    @property
    def stderr(self) -> str:
        return "".join(self.errors)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def curl(url: str, *extra: str, timeout: float = 10,
         prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), "curl", "-sS", "--max-time", str(timeout), *extra, url],
                          capture_output=True, text=True, timeout=timeout + 5)


def curl_until_ok(url: str, timeout: float = 30, prefix: list[str] | None = None) -> str:
    """GET ``url`` with curl until it answers (the job's service may still be starting); its body."""
    last: list[subprocess.CompletedProcess[str]] = []

    def attempt() -> str | None:
        r = curl(url, "--fail", prefix=prefix)
        last[:] = [r]
        return r.stdout if r.returncode == 0 else None

    try:
        return str(wait_for(attempt, timeout, f"{url} to answer", interval=0.2))
    except AssertionError:
        raise AssertionError(f"{url} never answered: {last[0].stderr if last else ''}") from None


def result_files(client: Client, uid: str, dest: Path) -> dict[str, bytes]:
    """A work's result: the members of its zip, or the lone file under its name."""
    path = client.fetch_result(uid, dest)
    if path.name == f"{uid}-result.zip":
        with zipfile.ZipFile(path) as z:
            return {n: z.read(n) for n in z.namelist()}
    return {path.name.removeprefix(f"{uid}-"): path.read_bytes()}


def write_conf(server: ServerProc, path: Path, login: str, password: str) -> Path:
    conf = server.conf()
    path.write_text(f'server = "{conf["server"]}"\nca = "{conf["ca"]}"\nlogin = "{login}"\npassword = "{password}"\n')
    path.chmod(0o600)
    return path


def echo(port: int, data: bytes, timeout: float = 10) -> bytes | None:
    """One ECHO exchange with the tcpserv job through the xwproxy on ``port``: what came back, None if refused."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"ECHO\n" + data)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:
        return None


@contextlib.contextmanager
def tcpserv_proxy(grid: Grid) -> Iterator[tuple[str, int]]:
    """A running tcpserv job on port 7000 and an xwproxy to it, both ended on exit: (work uid, local port)."""
    uid = grid.submit(grid.alice, "tcpserv", "7000", "--xwlistenport", "7000")
    try:
        grid.running(uid)
        with Proxy(grid.alice, uid, "--xwlistenport", "0") as proxy:
            port = proxy.port()
            wait_for(lambda: echo(port, b"ping") == b"ping", 30, "tcpserv to answer", interval=0.2)
            yield uid, port
    finally:
        grid.end(uid)


def relay_state(admin: Client, work: str | None = None) -> dict[str, int]:
    """The relay's counters (``streams``: of ``work`` only, with a work)."""
    r = admin.http.get(admin.base + "/relay", params={"work": work} if work else None, headers=admin._auth_header())
    r.raise_for_status()
    return dict(r.json())


def put_script(admin: Client, tmp: Path, name: str, script: str) -> str:
    path = tmp / f"{name}.bin"
    path.write_text(script)
    path.chmod(0o755)
    admin.put_app(name, binaries={"linux/x86_64": path}, access_rights="0x755")
    return name


# --- job applications ------------------------------------------------------------------------------------------------

WEB_APP = """#!/bin/sh
# web PORT [PORT2]: serve ./site (or .) over HTTP on each port, inside the job
cd site 2>/dev/null || true
if [ -n "$2" ]; then mkdir -p /tmp/second && echo "second port $2" > /tmp/second/index.html
  python3 -m http.server "$2" --bind 127.0.0.1 --directory /tmp/second & fi
exec python3 -m http.server "${1:-8080}" --bind 127.0.0.1
"""

FETCH_APP = """#!/bin/sh
# fetch URL: what the job got from URL, into fetched.txt
curl -sS --max-time 20 --retry 3 --retry-connrefused -o fetched.txt "$1"
"""

TCPSERV_APP = r"""#!/usr/bin/python3
# tcpserv PORT: per connection, the first line is a command:
#   ECHO     everything back until EOF, then close (a half-close keeps the echo coming)
#   SHA      read until EOF, answer the sha256 (hex) of what came
#   GEN n s  send n bytes of random.Random(s), then close
#   HOLD     read nothing, keep the connection as long as the job runs
import hashlib, random, socket, sys, threading

def line(c):
    buf = b""
    while not buf.endswith(b"\n"):
        b = c.recv(1)
        if not b:
            return None
        buf += b
    return buf.decode().split()

def serve(c):
    try:
        cmd = line(c)
        if not cmd:
            return
        if cmd[0] == "ECHO":
            while True:
                b = c.recv(1 << 20)
                if not b:
                    break
                c.sendall(b)
        elif cmd[0] == "SHA":
            h = hashlib.sha256()
            while True:
                b = c.recv(1 << 20)
                if not b:
                    break
                h.update(b)
            c.sendall(h.hexdigest().encode() + b"\n")
        elif cmd[0] == "GEN":
            n, rng = int(cmd[1]), random.Random(int(cmd[2]))
            while n:
                k = min(n, 1 << 20)
                c.sendall(rng.randbytes(k))
                n -= k
        elif cmd[0] == "HOLD":
            threading.Event().wait()  # never reads the stream's data; the connection lasts as long as the job
    finally:
        c.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(128)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

PROBE_APP = r"""#!/usr/bin/python3
# probe HOST:PORT…: try to connect to each; print one line "HOST:PORT ok|ERROR" each (a job's view of the network)
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print(target, "ok", flush=True)
    except OSError as exc:
        print(target, type(exc).__name__, exc.errno, flush=True)
"""


# --- the shared grid -------------------------------------------------------------------------------------------------

@dataclass
class Grid:
    root: Path
    server: ServerProc
    worker: WorkerProc
    admin: Client
    host: str
    alice: Path  # client configs
    bob: Path
    carol: Path
    users: dict[str, str]  # login → uid

    def client(self, conf: Path) -> Client:
        return Client.from_config(conf)

    def submit(self, conf: Path, *args: str) -> str:
        """``xwsubmit`` pinned to the grid's worker; returns the uid."""
        return xwsubmit(conf, *args, "--xwexpectedhost", self.host)

    def wait_status(self, uid: str, wanted: set[str], timeout: float = 60) -> dict[str, Any]:
        return dict(wait_for(lambda: (w := self.admin.work(uid))["status"] in wanted and w, timeout,
                             f"work {uid} to become {'/'.join(sorted(wanted))}"))

    def running(self, uid: str) -> dict[str, Any]:
        return self.wait_status(uid, {"RUNNING"})

    def end(self, uid: str) -> None:
        with contextlib.suppress(Exception):
            self.admin.cancel(uid)


def make_grid(root: Path, worker_sections: dict[str, dict[str, Any]] | None = None) -> Grid:
    server = ServerProc(home=root / "server", args=FAST).start()
    admin = server.client()
    try:
        group = admin.create_usergroup(unique("tunnels"))
        users = {}
        confs = {}
        for login, grp in (("alice", group["uid"]), ("carol", group["uid"]), ("bob", None)):
            password = f"{login}-{uuid.uuid4().hex}"
            users[login] = admin.create_user(login, password, "STANDARD_USER", usergroup=grp)["uid"]
            confs[login] = write_conf(server, root / f"{login}.conf", login, password)
        for name, script in (("web", WEB_APP), ("fetch", FETCH_APP), ("tcpserv", TCPSERV_APP),
                             ("probe", PROBE_APP)):
            put_script(admin, root, name, script)
        sections = worker_sections or {"worker": {"incoming_connections": True, "job_memory_mb": 512}}
        worker = WorkerProc(server, root / "worker", sections=sections, pool=6).start()
        worker.wait_status(lambda s: bool(s.get("host")), 30, "the worker to register")
        host = str(worker.status()["host"])
        if sections.get("worker", {}).get("incoming_connections"):
            wait_for(lambda: relay_state(admin)["hosts"] >= 1, 30, "the worker's control channel")
    except BaseException:
        server.stop()
        raise
    return Grid(root, server, worker, admin, host, confs["alice"], confs["bob"], confs["carol"], users)


def stop_grid(grid: Grid) -> None:
    with contextlib.suppress(Exception):
        grid.worker.stop()
    grid.admin.close()
    grid.server.stop()


def relay_request(conf: Path, path: str, params: dict[str, str] | None = None, host: Path | None = None) -> None:
    """Open a relay stream as the user of ``conf`` (the initiator side, as xwproxy or a worker does) and close it;
    with ``host`` (a worker's host.json: uid and key), as that host. :class:`StreamError` carries the refusal
    (``status``: the HTTP status)."""
    from xwhep.client.config import load
    from xwhep.client.streams import Dialer, request

    cfg = load(conf)
    client = Client.from_config(conf)
    if host is not None:
        saved = json.loads(host.read_text())
        client.bind_host({"uid": saved["uid"]}, saved["key"])

    async def go() -> None:
        ws = await Dialer(client, cfg.ca).open(path, params)
        try:
            await request(ws)
        finally:
            await ws.close()

    try:
        asyncio.run(go())
    finally:
        client.close()
