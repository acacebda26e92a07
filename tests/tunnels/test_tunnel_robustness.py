"""Tunnels under stress: many concurrent streams, half-close, large transfers, slow readers (bounded memory),
a dropped control channel, a restarted server, a work that ends under open streams, a port nobody listens on.

The job is ``tcpserv`` (see tunnelgrid.py): ECHO, SHA, GEN and HOLD commands on one TCP port inside the job.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from tunnels.tunnelgrid import Grid, Proxy, echo, make_grid, needs_bwrap, relay_state, stop_grid, wait_for

pytestmark = [needs_bwrap, pytest.mark.timeout(240)]

MiB = 1 << 20


def _connect(port: int, command: str, timeout: float = 60) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(command.encode() + b"\n")
    return s


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        b = s.recv(MiB)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def test_twenty_concurrent_streams(grid: Grid, tcpserv: tuple[str, int]) -> None:
    _, port = tcpserv
    payloads = [os.urandom(random.randint(1, 2 * MiB)) for _ in range(20)]
    barrier = threading.Barrier(20)

    def one(data: bytes) -> bool:
        barrier.wait(30)  # all twenty open at once
        return echo(port, data) == data

    with ThreadPoolExecutor(20) as pool:
        assert all(pool.map(one, payloads))


def test_half_close_keeps_the_other_direction(tcpserv: tuple[str, int]) -> None:
    _, port = tcpserv
    with _connect(port, "ECHO") as s:
        s.sendall(b"first")
        s.shutdown(socket.SHUT_WR)  # we are done sending; the job's answer must still come
        assert _read_all(s) == b"first"
    with _connect(port, "SHA") as s:
        s.sendall(b"abc")
        s.shutdown(socket.SHUT_WR)  # the job reads to EOF (our half-close), then answers
        assert _read_all(s).strip() == hashlib.sha256(b"abc").hexdigest().encode()


def test_64_mib_each_way_with_sha256(tcpserv: tuple[str, int]) -> None:
    _, port = tcpserv
    size = 64 * MiB
    h = hashlib.sha256()
    with _connect(port, "SHA", timeout=120) as s:
        rng = random.Random(1)
        left = size
        while left:
            chunk = rng.randbytes(min(left, MiB))
            h.update(chunk)
            s.sendall(chunk)
            left -= len(chunk)
        s.shutdown(socket.SHUT_WR)
        assert _read_all(s).strip().decode() == h.hexdigest()
    expected = hashlib.sha256()
    rng = random.Random(7)
    left = size
    while left:
        k = min(left, MiB)
        expected.update(rng.randbytes(k))
        left -= k
    got = hashlib.sha256()
    n = 0
    with _connect(port, f"GEN {size} 7", timeout=120) as s:
        while b := s.recv(MiB):
            got.update(b)
            n += len(b)
    assert n == size and got.hexdigest() == expected.hexdigest()


def test_a_slow_reader_stalls_the_writer_not_the_server(grid: Grid, tcpserv: tuple[str, int]) -> None:
    """The job never reads: the client's sends must stop being accepted after a bounded amount (the buffers along
    the way), and the server's memory must not grow with what the client tries to push (on the raw path, the
    default: the server splices transport to transport)."""
    uid, port = tcpserv
    server = psutil.Process(grid.server.proc.pid)  # type: ignore[union-attr]
    before = server.memory_info().rss
    chunk = os.urandom(MiB)
    accepted = 0
    with _connect(port, "HOLD") as s:
        s.settimeout(3)  # a send blocked this long: backpressure reached the client
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and accepted < 512 * MiB:
                accepted += s.send(chunk)
        except TimeoutError:
            pass
        grown = server.memory_info().rss - before
        assert relay_state(grid.admin, uid)["raw_streams"] == 1
    assert accepted < 256 * MiB, f"{accepted / MiB:.0f} MiB accepted: nothing pushed back"
    assert grown < 48 * MiB, f"the server grew by {grown / MiB:.0f} MiB for {accepted / MiB:.0f} MiB pushed"
    assert echo(port, b"still fine") == b"still fine"  # the stalled stream harmed no other


def test_a_dropped_control_channel_reconnects(grid: Grid, tcpserv: tuple[str, int]) -> None:
    _, port = tcpserv
    with _connect(port, "ECHO") as inflight:
        inflight.sendall(b"up")  # a round trip first: the stream is set up (in flight) before the drop
        got = b""
        while len(got) < 2 and (b := inflight.recv(2 - len(got))):
            got += b
        assert got == b"up"
        r = grid.admin.http.delete(f"{grid.admin.base}/relay/hosts/{grid.host}", headers=grid.admin._auth_header())
        assert r.status_code == 200 and r.json()["dropped"] >= 1, r.text
        # the stream in flight does not depend on the control channel
        inflight.sendall(b"during the drop")
        inflight.shutdown(socket.SHUT_WR)
        assert _read_all(inflight) == b"during the drop"
    wait_for(lambda: relay_state(grid.admin)["hosts"] >= 1, 30, "the control channel to come back")
    assert wait_for(lambda: echo(port, b"after") == b"after", 30, "a new stream after the reconnection")


def test_a_port_nobody_listens_on_is_refused_with_a_reason(grid: Grid) -> None:
    uid = grid.submit(grid.alice, "tcpserv", "7000", "--xwlistenport", "7000,7001")
    try:
        grid.running(uid)
        with Proxy(grid.alice, uid, "--xwlistenport", "0,0") as proxy:
            p7000, p7001 = proxy.port(), proxy.port()
            wait_for(lambda: echo(p7000, b"x") == b"x", 30, "tcpserv to answer")
            with socket.create_connection(("127.0.0.1", p7001), timeout=30) as s:
                try:
                    assert _read_all(s) == b""  # ended without data…
                except ConnectionResetError:  # …or reset: a failed stream must not look like a clean end
                    pass
            wait_for(lambda: "nothing listens on port 7001" in proxy.stderr, 15, "xwproxy to say why")
    finally:
        grid.end(uid)


def test_ending_the_work_closes_its_streams(grid: Grid) -> None:
    uid = grid.submit(grid.alice, "tcpserv", "7000", "--xwlistenport", "7000")
    try:
        grid.running(uid)
        with Proxy(grid.alice, uid, "--xwlistenport", "0") as proxy:
            port = proxy.port()
            wait_for(lambda: echo(port, b"x") == b"x", 30, "tcpserv to answer")
            held = [_connect(port, "HOLD") for _ in range(3)]
            wait_for(lambda: relay_state(grid.admin, uid)["streams"] == 3, 15, "the streams to be up")
            t0 = time.monotonic()
            grid.admin.cancel(uid)
            for s in held:
                s.settimeout(30)
                try:
                    assert s.recv(1) == b""
                except ConnectionResetError:
                    pass
                s.close()
            assert time.monotonic() - t0 < 30
            wait_for(lambda: relay_state(grid.admin, uid)["streams"] == 0, 15, "the relay to forget them")
    finally:
        grid.end(uid)


def test_streams_work_again_after_a_server_restart(tmp_path: Path) -> None:
    """A server restart drops every control channel: workers and server proxies reconnect, and a running
    xwproxy serves new connections again."""
    g = make_grid(tmp_path)
    try:
        uid = g.submit(g.alice, "tcpserv", "7000", "--xwlistenport", "7000")
        g.running(uid)
        with Proxy(g.alice, uid, "--xwlistenport", "0") as proxy:
            port = proxy.port()
            wait_for(lambda: echo(port, b"before") == b"before", 30, "tcpserv to answer")
            g.server.restart()
            wait_for(lambda: relay_state(g.admin)["hosts"] >= 1, 30, "the worker's control channel to come back")
            assert g.admin.work(uid)["status"] == "RUNNING"
            assert wait_for(lambda: echo(port, b"after") == b"after", 30, "a stream after the restart")
        g.end(uid)
    finally:
        stop_grid(g)
