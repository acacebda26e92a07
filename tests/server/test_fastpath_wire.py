"""The fast path writes a whole response at once into uvicorn's transport (``fastpath._one_write``): on the wire it
must stay the HTTP/1.1 uvicorn itself would send — status line, date and server headers, content type and length
matching the body — keep the connection alive across requests, and close it when the client asked to."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable

from cluster import ServerProc
from sdkworker import SdkWorker

from xwhep.server.api import fastpath


def _read_response(f: object) -> tuple[str, dict[str, str], bytes]:
    status = f.readline().decode("latin-1").rstrip("\r\n")  # type: ignore[attr-defined]
    headers: dict[str, str] = {}
    while (line := f.readline().decode("latin-1").rstrip("\r\n")):  # type: ignore[attr-defined]
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"header {name} sent twice"
        headers[name.lower()] = value.strip()
    body = f.read(int(headers["content-length"]))  # type: ignore[attr-defined]
    return status, headers, body


def _request(path: str, body: dict[str, object], token: str, port: int, close: bool = False) -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n")
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + data


def test_fast_path_responses_on_the_wire(make_server: Callable[..., ServerProc]) -> None:
    assert fastpath.RequestResponseCycle is not None, "uvicorn's httptools cycle: the one-write path must be used"
    srv = make_server()
    reg = SdkWorker(srv.client("worker")).registration
    host = reg["uid"]
    ctx = ssl.create_default_context(cafile=str(srv.ca))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls, tls.makefile("rb") as f:
        tls.sendall(_request("/api/v1/auth/host", {"host": host, "key": reg["key"]}, "-", srv.port))
        status, _, body = _read_response(f)
        assert status == "HTTP/1.1 200 OK", status
        token = json.loads(body)["token"]
        for _ in range(3):  # keep-alive: the same connection serves request after request
            tls.sendall(_request(f"/api/v1/hosts/{host}/sync", {"max": 0}, token, srv.port))
            status, headers, body = _read_response(f)
            assert status == "HTTP/1.1 200 OK"
            assert headers["content-type"] == "application/json"
            assert "date" in headers and "server" in headers
            assert "connection" not in headers and "transfer-encoding" not in headers
            reply = json.loads(body)
            assert reply["works"] == [] and reply["reports"] == [] and reply["alive_period"] > 0
        # an error through the fast path: the same framing, the JSON error naming the field
        tls.sendall(_request(f"/api/v1/hosts/{host}/sync", {"max": "many"}, token, srv.port))
        status, headers, body = _read_response(f)
        assert status == "HTTP/1.1 400 Bad Request"
        assert json.loads(body)["field"] == "max"
        # the client asks to close: the reply says so and the server closes the connection after it
        tls.sendall(_request(f"/api/v1/hosts/{host}/sync", {"max": 0}, token, srv.port, close=True))
        status, headers, body = _read_response(f)
        assert status == "HTTP/1.1 200 OK" and headers["connection"] == "close"
        assert json.loads(body)["works"] == []
        assert f.read() == b"", "the server must close the connection after a Connection: close request"
