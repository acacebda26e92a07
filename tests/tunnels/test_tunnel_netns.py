"""Example 1 with the worker behind a firewall that refuses every inbound connection (real network namespaces).

Two namespaces joined by a veth pair, nothing in the host's own: the server (and the client) in one at 10.200.0.1,
the worker in the other at 10.200.0.2 behind an nft ``input`` chain with policy drop (only replies to its own
connections, and loopback, come in). The test proves the firewall (a service inside the worker's namespace is
unreachable from the server's) and then serves curl from a job on that worker through ``xwproxy``. The
namespaces are deleted at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import ServerProc
from tunnels.tunnelgrid import BIN, FAST, WEB_APP, Proxy, curl_until_ok, needs_bwrap, wait_for
from workerproc import WorkerProc

pytestmark = [needs_bwrap, pytest.mark.timeout(240)]

FIREWALL = """table inet xwtest {
  chain input {
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
  }
}
"""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def namespaces() -> Iterator[tuple[list[str], list[str]]]:
    """(server namespace prefix, worker namespace prefix): ``ip netns exec NS`` command prefixes."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not shutil.which("ip") or not shutil.which("nft"):
        pytest.skip("iproute2 and nftables are needed (apt: iproute2 nftables)")
    tag = uuid.uuid4().hex[:6]
    srv_ns, wrk_ns = f"xwt-s-{tag}", f"xwt-w-{tag}"
    created: list[str] = []
    try:
        for ns in (srv_ns, wrk_ns):
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"ip netns add failed: {r.stderr.strip()}")
            created.append(ns)
        steps = [
            ("link", "add", f"xwvs{tag}", "netns", srv_ns, "type", "veth", "peer", "name", f"xwvw{tag}", "netns",
             wrk_ns),
            ("-n", srv_ns, "addr", "add", "10.200.0.1/24", "dev", f"xwvs{tag}"),
            ("-n", wrk_ns, "addr", "add", "10.200.0.2/24", "dev", f"xwvw{tag}"),
            ("-n", srv_ns, "link", "set", f"xwvs{tag}", "up"), ("-n", wrk_ns, "link", "set", f"xwvw{tag}", "up"),
            ("-n", srv_ns, "link", "set", "lo", "up"), ("-n", wrk_ns, "link", "set", "lo", "up"),
        ]
        for step in steps:
            r = _ip(*step)
            assert r.returncode == 0, f"ip {' '.join(step)}: {r.stderr}"
        r = subprocess.run(["ip", "netns", "exec", wrk_ns, "nft", "-f", "-"], input=FIREWALL, capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            pytest.skip(f"nft is not usable here: {r.stderr.strip()}")
        yield ["ip", "netns", "exec", srv_ns], ["ip", "netns", "exec", wrk_ns]
    finally:
        for ns in created:
            _ip("netns", "del", ns)


def _reachable(prefix: list[str], host: str, port: int) -> bool:
    code = (f"import socket\ntry:\n socket.create_connection(({host!r}, {port}), timeout=2).close(); print('yes')\n"
            "except OSError: print('no')")
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30).stdout.strip() == "yes"


def test_a_firewalled_worker_serves_example1(namespaces: tuple[list[str], list[str]], tmp_path: Path) -> None:
    in_server, in_worker = namespaces
    # the firewall: a service in the worker's namespace cannot be reached from the server's
    listener = subprocess.Popen([*in_worker, sys.executable, "-c",
                                 "import socket,time\ns=socket.create_server(('10.200.0.2', 7777))\ntime.sleep(60)"])
    try:
        wait_for(lambda: _reachable(in_worker, "10.200.0.2", 7777), 15, "the probe service to listen")
        assert not _reachable(in_server, "10.200.0.2", 7777), "the firewall let an inbound connection in"
    finally:
        listener.kill()
        listener.wait()

    server = ServerProc(home=tmp_path / "server", args=[*FAST, "--host", "10.200.0.1"], prefix=in_server).start()
    worker = None
    try:
        assert server.url.startswith("https://10.200.0.1:")
        admin = server.admin_conf

        def xw(command: str, *args: str) -> str:
            r = subprocess.run([*in_server, str(BIN / f"xw{command}"), *args, "--xwconfig", str(admin)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, f"xw{command}: {r.stderr}"
            return r.stdout

        app = tmp_path / "web.sh"
        app.write_text(WEB_APP)
        app.chmod(0o755)
        xw("sendapp", "web", "linux", "x86_64", str(app))
        worker = WorkerProc(server, tmp_path / "worker", sections={"worker": {"incoming_connections": True}},
                            prefix=in_worker).start()
        worker.wait_status(lambda s: bool(s.get("host")), 30, "the worker to register from behind its firewall")
        host = str(worker.status()["host"])
        site = tmp_path / "env" / "site"
        site.mkdir(parents=True)
        (site / "index.html").write_text("served from behind a firewall\n")
        uid = xw("submit", "web", "8080", "--xwlistenport", "8080", "--xwenv", str(tmp_path / "env"),
                 "--xwexpectedhost", host).strip().rsplit("/", 1)[1]
        wait_for(lambda: "RUNNING" in xw("status", uid), 60, "the work to run")
        with Proxy(admin, uid, "--xwlistenport", "0", prefix=in_server) as proxy:
            port = proxy.port()
            t0 = time.monotonic()
            body = curl_until_ok(f"http://127.0.0.1:{port}/index.html", 60, prefix=in_server)
            assert body == "served from behind a firewall\n", body
            assert time.monotonic() - t0 < 60
        xw("rm", uid)
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
