"""Connection limits on a real server, through real sockets: a request head is bounded in size (431 before it is
buffered), a half-sent head or a silent connection is closed after ``head_timeout``, a TCP connection that never
starts TLS after ``tls_handshake_timeout``; and none of that touches an ordinary request."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator

import psutil
import pytest
from cluster import ServerProc

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 2.0
TLS_TIMEOUT = 2.0
BOUND = 15.0  # what "closed within the bound" allows for a loaded 2-core machine


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    home = tmp_path_factory.mktemp("limits")
    (home / "server.toml").write_text(f"max_head = {MAX_HEAD}\nhead_timeout = {HEAD_TIMEOUT}\n"
                                      f"tls_handshake_timeout = {TLS_TIMEOUT}\n")
    s = ServerProc(home=home).start()
    yield s
    s.stop()


def _tls(srv: ServerProc) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(srv.ca))
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=BOUND)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open at ``deadline``."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"connection still open after the bound; got {data[:200]!r}"
        sock.settimeout(left)
        try:
            more = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return data
        except TimeoutError:
            continue
        if not more:
            return data
        data += more


def _json_status(data: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"] == "application/json", headers
    return int(lines[0].split()[1]), json.loads(body[: int(headers["content-length"])])


def test_huge_request_head_is_refused_before_it_is_buffered(srv: ServerProc) -> None:
    """A 200 MB header: the server answers 431 once about MAX_HEAD bytes came, holds none of the rest in memory,
    and closes the connection within the bound."""
    assert srv.proc is not None
    server = psutil.Process(srv.proc.pid)
    rss = server.memory_info().rss
    with _tls(srv) as tls:
        tls.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * 65536
        sent, answered = 0, b""
        deadline = time.monotonic() + BOUND
        while sent < 200 * 1024 * 1024 and time.monotonic() < deadline and not answered:
            try:
                tls.sendall(chunk)
            except OSError:
                break  # closed by the server while we were still sending
            sent += len(chunk)
            tls.setblocking(False)
            try:
                answered = tls.recv(65536)  # the answer, as soon as it comes (session tickets are no answer)
            except (ssl.SSLWantReadError, BlockingIOError):
                pass
            except OSError:
                break
            finally:
                tls.setblocking(True)
        grown = server.memory_info().rss - rss
        answered += _read_until_closed(tls, time.monotonic() + BOUND)
    assert grown < 64 * 1024 * 1024, f"the server grew by {grown >> 20} MiB while refusing a {sent >> 20} MiB head"
    status, body = _json_status(answered)
    assert status == 431 and "head" in str(body["error"])


def test_half_sent_head_is_closed_after_head_timeout(srv: ServerProc) -> None:
    with _tls(srv) as tls:
        start = time.monotonic()
        tls.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        answered = _read_until_closed(tls, start + BOUND)
        took = time.monotonic() - start
    assert took >= HEAD_TIMEOUT * 0.9, f"closed after {took:.1f} s, before the timeout"
    status, body = _json_status(answered)
    assert status == 408 and body["error"]


def test_silent_connection_after_tls_is_closed(srv: ServerProc) -> None:
    with _tls(srv) as tls:
        start = time.monotonic()
        _read_until_closed(tls, start + BOUND)  # handshake done, no request ever sent


def test_tcp_connection_without_tls_hello_is_closed(srv: ServerProc) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=BOUND) as raw:
        start = time.monotonic()
        data = _read_until_closed(raw, start + BOUND)
        took = time.monotonic() - start
    assert data == b""
    assert took >= TLS_TIMEOUT * 0.9, f"closed after {took:.1f} s, before the handshake timeout"


def test_malformed_request_is_a_json_400(srv: ServerProc) -> None:
    with _tls(srv) as tls:
        tls.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nBad Header Name: y\r\n\r\n")
        status, body = _json_status(_read_until_closed(tls, time.monotonic() + BOUND))
    assert status == 400 and body["error"]


def test_ordinary_requests_are_untouched(srv: ServerProc) -> None:
    """A small head with a body larger than MAX_HEAD in the same write, then a second request on the same
    connection after a pause shorter than the head timeout: both answered as usual."""
    body = json.dumps({"login": "admin", "password": "x" * 100_000}).encode()
    with _tls(srv) as tls, tls.makefile("rb") as f:
        tls.sendall(b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        status = f.readline()
        assert b" 400 " in status, status  # the password is over its bound: an ordinary validation answer
        headers = {}
        while (line := f.readline().rstrip(b"\r\n")):
            k, _, v = line.partition(b":")
            headers[k.lower()] = v.strip()
        f.read(int(headers[b"content-length"]))
        time.sleep(HEAD_TIMEOUT / 4)  # idle between requests: keep-alive's business, not the head timer's
        tls.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 200 " in f.readline()


def test_head_timeout_counts_from_the_head_not_the_connection(srv: ServerProc) -> None:
    """On a kept-alive connection the head timer runs from each head's first byte: a half-sent second head is
    closed HEAD_TIMEOUT after it began, not earlier (the connection's age does not count) nor never."""
    with _tls(srv) as tls, tls.makefile("rb") as f:
        tls.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 200 " in f.readline()
        length = 0
        while (line := f.readline().strip()):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        f.read(length)  # the whole first answer: what comes next is the server's word on the second head
        time.sleep(HEAD_TIMEOUT * 0.6)  # a pause between requests (what is measured starts below)
        start = time.monotonic()
        tls.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
        answered = _read_until_closed(tls, start + BOUND)
        took = time.monotonic() - start
    assert took >= HEAD_TIMEOUT * 0.9, f"closed {took:.1f} s after the head began, before the timeout"
    assert b" 408 " in answered
