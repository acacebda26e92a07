"""Who may use a tunnel, and what a job can reach.

* a stream to a work: only who may EXECUTE it (owner, group per rights, admin); refusals are events;
* a server proxy's address: only works of the user who registered it;
* a job reaches its forward ports and nothing else: not the host's loopback, not the server, not the LAN, not a
  port it was not given; and the relay refuses a forward address the work does not name, even when the worker
  itself asks.
"""

from __future__ import annotations

import http.server
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from tunnels.tunnelgrid import (
    Grid,
    Proxy,
    curl,
    curl_until_ok,
    needs_bwrap,
    relay_request,
    relay_state,
    result_files,
    unique,
    wait_for,
    xw,
    xwsubmit,
)
from workerproc import WorkerProc

from xwhep.client.streams import StreamError

pytestmark = [needs_bwrap, pytest.mark.timeout(180)]


@pytest.fixture
def loopback_service() -> Iterator[int]:
    """A TCP service on the host's loopback that no job was given (it answers 'reached')."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.sendall(b"reached\n")
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        srv.close()


def _refusals(grid: Grid, uid: str, who: str) -> list[dict[str, object]]:
    return [e for e in grid.admin.events(uid) if e["action"] == "tunnel.refuse" and e["actor"] == grid.users[who]]


@pytest.fixture
def alices_worker(grid: Grid) -> Iterator[str]:
    """A private worker of alice's (her own credentials): it runs her works whatever their rights, so rights can
    keep others out. Yields its host uid."""
    worker = WorkerProc(SimpleNamespace(worker_conf=grid.alice), grid.root / unique("alices-worker"),  # type: ignore
                        sections={"worker": {"incoming_connections": True}}, pool=2).start()
    try:
        worker.wait_status(lambda s: bool(s.get("host")), 30, "alice's worker to register")
        host = str(worker.status()["host"])
        wait_for(lambda: relay_state(grid.admin)["hosts"] >= 2, 30, "its control channel")
        yield host
    finally:
        worker.stop()


def test_only_who_may_execute_the_work_opens_streams(grid: Grid, alices_worker: str) -> None:
    # 0x750: alice rwx, her group (carol) r-x, others (bob) nothing; 0x740: the group may read, not execute
    open_to_group = xwsubmit(grid.alice, "web", "8080", "--xwlistenport", "8080", "--xwrights", "0x750",
                             "--xwexpectedhost", alices_worker)
    readable = xwsubmit(grid.alice, "web", "8080", "--xwlistenport", "8080", "--xwrights", "0x740",
                        "--xwexpectedhost", alices_worker)
    try:
        grid.running(open_to_group)
        grid.running(readable)
        with Proxy(grid.carol, open_to_group, "--xwlistenport", "0") as carol:
            assert curl_until_ok(f"http://127.0.0.1:{carol.port()}/") != ""
        relay_request(grid.server.admin_conf, f"/works/{open_to_group}/ports/8080")  # the admin may too
        with pytest.raises(StreamError) as unseen:
            relay_request(grid.bob, f"/works/{open_to_group}/ports/8080")
        assert unseen.value.status == 404  # bob may not even read it: no existence leak
        bob = Proxy(grid.bob, open_to_group, "--xwlistenport", "0").start()
        assert bob.proc is not None and bob.proc.wait(30) == 1
        assert bob.stderr.startswith("xwproxy: error:") and bob.stderr.count("\n") == 1, bob.stderr
        # carol may read the second work but not execute it: xwproxy starts, every connection is refused
        with Proxy(grid.carol, readable, "--xwlistenport", "0") as carol:
            r = curl(f"http://127.0.0.1:{carol.port()}/")
            assert r.returncode != 0 and r.stdout == ""
            wait_for(lambda: "may not" in carol.stderr, 15, "xwproxy to say why")
            assert carol.stderr.startswith("xwproxy: error: port 8080: carol may not execute"), carol.stderr
        with pytest.raises(StreamError) as refused:
            relay_request(grid.carol, f"/works/{readable}/ports/8080")
        assert refused.value.status == 403
        wait_for(lambda: _refusals(grid, readable, "carol"), 10, "carol's refusals in the event log")
        assert _refusals(grid, open_to_group, "bob")
        with pytest.raises(StreamError) as other_port:  # the owner, on a port the work does not listen on
            relay_request(grid.alice, f"/works/{open_to_group}/ports/9999")
        assert other_port.value.status == 404 and "does not listen on port 9999" in other_port.value.message
    finally:
        grid.end(open_to_group)
        grid.end(readable)


@pytest.fixture
def client_site(tmp_path: Path) -> Iterator[int]:
    root = tmp_path / "site"
    root.mkdir()
    (root / "page.txt").write_text("client page\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(root), **kw)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _lan_address() -> str | None:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        return line.split()[3].split("/")[0]
    return None


def test_a_job_reaches_its_forward_ports_and_nothing_else(grid: Grid, client_site: int, loopback_service: int,
                                                          tmp_path: Path) -> None:
    server_port = grid.server.port
    targets = [f"127.0.0.1:{loopback_service}",  # a service on the host's loopback
               f"127.0.0.1:{server_port}",  # the server itself
               "127.0.0.1:1235",  # a port next to the one it was given
               "127.0.0.1:1234"]  # the one it was given
    lan = _lan_address()
    if lan:
        targets.insert(0, f"{lan}:{server_port}")  # the host from the LAN side
    with Proxy(grid.alice, "--xwlistenport", str(client_site)) as proxy:
        address = proxy.line()
        uid = grid.submit(grid.alice, "probe", *targets, "--xwforwardaddresses", f"{address},1234")
        try:
            grid.wait_status(uid, {"COMPLETED", "ERROR", "FAILED"})
            files = result_files(grid.admin, uid, tmp_path)
        finally:
            grid.end(uid)
    out = next(v for k, v in files.items() if "stdout" in k).decode()
    seen = dict(line.split(" ", 1) for line in out.splitlines())
    assert seen.pop("127.0.0.1:1234") == "ok", out
    assert seen and all(not v.startswith("ok") for v in seen.values()), out


def test_a_server_proxy_serves_only_its_owners_works(grid: Grid, client_site: int) -> None:
    """Refused at submission (issue 13: it was accepted, and the job found its tunnel closed when it ran), whether
    bob's proxy is connected or not: its address is bound to its owner."""
    with Proxy(grid.bob, "--xwlistenport", str(client_site)) as bobs:
        address = bobs.line()
        refused = xw("submit", grid.alice, "fetch", "http://localhost:1234/page.txt", "--xwforwardaddresses",
                     f"{address},1234", "--xwexpectedhost", grid.host, check=False)
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr.startswith(f"xwsubmit: error: forward_addresses: server proxy {address} belongs to "
                                         "another user"), refused.stderr
    stopped = xw("submit", grid.alice, "fetch", "http://localhost:1234/page.txt", "--xwforwardaddresses",
                 f"{address},1234", "--xwexpectedhost", grid.host, check=False)
    assert stopped.returncode == 1 and "belongs to another user" in stopped.stderr, stopped.stderr
    # bob himself may name it
    uid = grid.submit(grid.bob, "fetch", "http://localhost:1234/page.txt", "--xwforwardaddresses",
                      f"{address},1234")
    grid.end(uid)


def test_the_relay_refuses_an_address_the_work_does_not_name(grid: Grid, client_site: int) -> None:
    """Even the worker running the job (its own credentials) cannot open a stream to another address."""
    with Proxy(grid.alice, "--xwlistenport", str(client_site)) as given, \
            Proxy(grid.alice, "--xwlistenport", str(client_site)) as other:
        mine, not_given = given.line(), other.line()
        uid = grid.submit(grid.alice, "web", "8080", "--xwlistenport", "8080", "--xwforwardaddresses",
                          f"{mine},1234")
        try:
            task = grid.running(uid)["task"]
            path = f"/hosts/{grid.host}/tasks/{task}/forward"
            as_host = grid.worker.workdir / "host.json"  # the worker's own host identity (uid and key)
            relay_request(grid.server.worker_conf, path, {"address": mine}, host=as_host)
            with pytest.raises(StreamError) as refused:
                relay_request(grid.server.worker_conf, path, {"address": not_given}, host=as_host)
            assert refused.value.status == 403 and "not among the forward addresses" in refused.value.message
            with pytest.raises(StreamError) as not_host:  # the worker credential alone is no host
                relay_request(grid.server.worker_conf, path, {"address": mine})
            assert not_host.value.status == 403
            with pytest.raises(StreamError) as not_worker:  # and a user is not a worker
                relay_request(grid.alice, path, {"address": mine})
            assert not_worker.value.status == 404
        finally:
            grid.end(uid)
