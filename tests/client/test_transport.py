"""The SDK's transport: several TLS records per read, the same bytes, timeouts and errors as plain httpx."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from xwhep.client.transport import Transport, transport
from xwhep.server import pki

RECORD = 16 * 1024  # the largest TLS record's plaintext: one plain TLS read never returns more


@dataclass
class TlsServer:
    """One-connection-at-a-time HTTPS server on loopback answering GET with ``body``; ``stall`` stops after half."""

    ctx: ssl.SSLContext
    body: bytes
    stall: bool = False
    sent: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    port: int = 0

    def serve(self, sock: socket.socket) -> None:
        while True:
            try:
                raw, _ = sock.accept()
            except OSError:
                return
            try:
                conn = self.ctx.wrap_socket(raw, server_side=True)
            except ssl.SSLError:  # a client that refused our certificate
                raw.close()
                continue
            with conn:
                req = b""
                while b"\r\n\r\n" not in req:
                    part = conn.recv(4096)
                    if not part:
                        break
                    req += part
                head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(self.body)
                payload = self.body[: len(self.body) // 2] if self.stall else self.body
                conn.sendall(head)
                for i in range(0, len(payload), RECORD):  # one TLS record per piece
                    conn.sendall(payload[i:i + RECORD])
                self.sent.set()
                self.release.wait(10)


Tls = tuple[Path, Callable[..., TlsServer]]


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[Tls]:
    ca, ca_key = pki.create_ca(tmp_path / "ca")
    cert, key = pki.issue_server_cert(ca, ca_key, tmp_path / "srv", ["localhost"], ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    socks: list[socket.socket] = []
    servers: list[TlsServer] = []

    def start(body: bytes, stall: bool = False) -> TlsServer:
        sock = socket.create_server(("127.0.0.1", 0))
        srv = TlsServer(ctx, body, stall, port=sock.getsockname()[1])
        threading.Thread(target=srv.serve, args=(sock,), daemon=True).start()
        socks.append(sock)
        servers.append(srv)
        return srv

    yield ca, start
    for srv in servers:
        srv.release.set()
    for sock in socks:
        sock.close()


def _client(ca: Path, timeout: float = 10.0) -> httpx.Client:
    limits = httpx.Limits(max_connections=4)
    verify = ssl.create_default_context(cafile=str(ca))
    return httpx.Client(transport=Transport(verify, limits), timeout=timeout)


def test_reads_take_every_record_already_there(tls: Tls) -> None:
    ca, start = tls
    body = os.urandom(128 * 1024)  # fits in the loopback socket buffers: all of it arrives before we read
    srv = start(body)
    with _client(ca) as c, c.stream("GET", f"https://127.0.0.1:{srv.port}/x") as r:
        assert srv.sent.wait(10)
        sizes = [len(chunk) for chunk in r.iter_raw()]
    assert sum(sizes) == len(body)
    assert max(sizes) > RECORD, f"each read returned one TLS record at most: {sizes}"


def test_large_body_arrives_intact(tls: Tls) -> None:
    ca, start = tls
    body = os.urandom(8 * 1024 * 1024 + 123)
    srv = start(body)
    with _client(ca) as c:
        got = c.get(f"https://127.0.0.1:{srv.port}/big").content
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


def test_a_stalled_body_still_times_out(tls: Tls) -> None:
    """Gathering switches the socket to non-blocking for a moment: the read timeout must be back after it."""
    ca, start = tls
    srv = start(os.urandom(256 * 1024), stall=True)
    with _client(ca, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.get(f"https://127.0.0.1:{srv.port}/stall")


def test_the_server_certificate_is_still_verified(tls: Tls, tmp_path: Path) -> None:
    _, start = tls
    other, _ = pki.create_ca(tmp_path / "other")
    srv = start(b"hello")
    with _client(other) as c, pytest.raises(httpx.ConnectError):
        c.get(f"https://127.0.0.1:{srv.port}/")


@pytest.mark.parametrize("var", ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "http_proxy"])
def test_a_proxy_in_the_environment_leaves_the_transport_to_httpx(var: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    limits = httpx.Limits()
    assert isinstance(transport(True, limits), Transport)
    monkeypatch.setenv(var, "http://proxy.invalid:3128")
    assert transport(True, limits) is None
