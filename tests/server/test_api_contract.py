"""The API's error contract on a real server: whatever a client sends, a bad value is a 4xx with a JSON body
``{"error", "field"}`` naming what was wrong — never a 500, never a text/plain page.

Integers beyond what the database holds, booleans where integers belong, lone UTF-16 surrogates in any string
(bodies, query and path parameters, the unauthenticated login), Range errors, methods a route does not have,
unknown routes, oversized chunked bodies (FastAPI routes and the workers' fast path alike).
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from cluster import ServerProc
from sdkworker import SdkWorker

MAX_BODY = 256 * 1024  # the server's JSON body limit here (server.toml), so an oversized body is quick to send


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    home = tmp_path_factory.mktemp("contract")
    (home / "server.toml").write_text(f"max_json_body = {MAX_BODY}\n")
    s = ServerProc(home=home).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(srv: ServerProc) -> Iterator[httpx.Client]:
    token = srv.client().login()
    with httpx.Client(verify=ssl.create_default_context(cafile=str(srv.ca)), base_url=srv.url,
                      headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def registration(srv: ServerProc) -> dict[str, Any]:
    return SdkWorker(srv.client("worker")).registration


@pytest.fixture(scope="module")
def host(registration: dict[str, Any]) -> str:
    return str(registration["uid"])


@pytest.fixture(scope="module")
def worker_http(srv: ServerProc, registration: dict[str, Any]) -> Iterator[httpx.Client]:
    token = registration["token"]  # host calls need the host's own token
    with httpx.Client(verify=ssl.create_default_context(cafile=str(srv.ca)), base_url=srv.url,
                      headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        yield c


def _post_raw(http: httpx.Client, path: str, text: str, **kw: Any) -> httpx.Response:
    return http.post(path, content=text.encode(), headers={"content-type": "application/json"}, **kw)


def _fields(r: httpx.Response) -> set[str]:
    body = r.json()
    return {body.get("field")} | {d["field"] for d in body.get("details", [])}


def _is_error(r: httpx.Response, status: int, field: str | None = "") -> dict[str, Any]:
    assert r.status_code == status, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    body: dict[str, Any] = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert "field" in body, body
    if field != "":
        assert field in _fields(r), f"{field} not named in {body}"
    return body


# -- integers --------------------------------------------------------------------------------------------------------

BIG = 2**63  # one past SQLite's and PostgreSQL's bigint
INT32 = 2**31  # one past PostgreSQL's integer

INTEGER_CASES = [
    ("/api/v1/datas", {"name": "d", "size": BIG}, "size"),
    ("/api/v1/hosts", {"name": "h", "cpuspeed": BIG}, "cpuspeed"),
    ("/api/v1/hosts", {"name": "h", "memory": BIG}, "memory"),
    ("/api/v1/hosts", {"name": "h", "disk": BIG}, "disk"),
    ("/api/v1/hosts", {"name": "h", "memory": INT32}, "memory"),  # a 32-bit column
    ("/api/v1/apps", {"name": "a", "type": "SHARED", "min_memory": BIG}, "min_memory"),
    ("/api/v1/apps", {"name": "a", "type": "SHARED", "min_cpuspeed": BIG}, "min_cpuspeed"),
    ("/api/v1/apps", {"name": "a", "type": "SHARED", "min_disk": INT32}, "min_disk"),
    ("/api/v1/works", {"app": "a", "min_memory": BIG}, "min_memory"),
    ("/api/v1/works", {"app": "a", "wallclock": INT32}, "wallclock"),
    ("/api/v1/works", {"works": [{"app": "a", "max_retries": BIG}]}, "works.0.max_retries"),
    ("/api/v1/datas", {"name": "d", "size": -1}, "size"),
]


@pytest.mark.parametrize(("path", "body", "field"), INTEGER_CASES)
def test_integer_out_of_database_range_is_400_naming_the_field(http: httpx.Client, path: str,
                                                                 body: dict[str, Any], field: str) -> None:
    _is_error(http.post(path, json=body), 400, field)


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/api/v1/datas", {"name": "d", "size": True}, "size"),
    ("/api/v1/hosts", {"name": "h", "memory": True}, "memory"),
    ("/api/v1/apps", {"name": "a", "type": "SHARED", "min_disk": False}, "min_disk"),
    ("/api/v1/works", {"app": "a", "replicas": True}, "replicas"),
    ("/api/v1/hosts", {"name": "h", "active": 1}, "active"),  # nor an integer where a boolean belongs
])
def test_boolean_is_not_an_integer(http: httpx.Client, path: str, body: dict[str, Any], field: str) -> None:
    _is_error(http.post(path, json=body), 400, field)


def test_worker_hot_path_integers_are_bounded(worker_http: httpx.Client, host: str) -> None:
    """The fast path (sync/alive below FastAPI) shares the models: the same 400s."""
    report = {"task": "00000000-0000-0000-0000-000000000000", "return_code": BIG}
    _is_error(worker_http.post(f"/api/v1/hosts/{host}/sync", json={"reports": [report]}), 400,
              "reports.0.return_code")
    _is_error(worker_http.post(f"/api/v1/hosts/{host}/sync", json={"max": True}), 400, "max")
    _is_error(worker_http.post(f"/api/v1/hosts/{host}/alive", json={"running": BIG}), 400, "running")


@pytest.mark.parametrize(("path", "param"), [
    (f"/api/v1/works?after={BIG}", "after"),
    (f"/api/v1/works?limit={BIG}", "limit"),
    (f"/api/v1/events?limit={BIG}", "limit"),
    ("/api/v1/relay/tickets?n=" + str(BIG), "n"),
])
def test_query_integer_out_of_range_is_400(http: httpx.Client, path: str, param: str) -> None:
    method = "POST" if "tickets" in path else "GET"
    _is_error(http.request(method, path), 400, param)


# -- lone surrogates ---------------------------------------------------------------------------------------------------

LONE = '"\\ud800"'  # JSON text: a valid escape that names no character


def test_lone_surrogate_in_unauthenticated_login_is_400(srv: ServerProc) -> None:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(srv.ca)), base_url=srv.url) as anon:
        r = _post_raw(anon, "/api/v1/auth/login", '{"login": ' + LONE + ', "password": "x"}')
        _is_error(r, 400, "login")
        r = _post_raw(anon, "/api/v1/auth/login", '{"login": "admin", "password": "a\\udfff"}')
        _is_error(r, 400, "password")


@pytest.mark.parametrize(("path", "text", "field"), [
    ("/api/v1/datas", '{"name": ' + LONE + '}', "name"),
    ("/api/v1/works", '{"app": "a", "label": ' + LONE + '}', "label"),
    ("/api/v1/works", '{"works": [{"app": "a", "env": {' + LONE + ': "v"}}]}', "works.0.env"),
    ("/api/v1/usergroups", '{"label": ' + LONE + '}', "label"),
    ("/api/v1/mandates", '{"mandatary": ' + LONE + '}', "mandatary"),
])
def test_lone_surrogate_in_body_is_400_naming_the_field(http: httpx.Client, path: str, text: str,
                                                        field: str) -> None:
    _is_error(_post_raw(http, path, text), 400, field)


def test_lone_surrogate_on_the_fast_path_is_400_naming_the_field(worker_http: httpx.Client, host: str) -> None:
    r = _post_raw(worker_http, f"/api/v1/hosts/{host}/sync", '{"tasks": [' + LONE + ']}')
    _is_error(r, 400, "tasks.0")
    r = _post_raw(worker_http, f"/api/v1/hosts/{host}/alive", '{"results": [' + LONE + ']}')
    _is_error(r, 400, "results.0")


def test_invalid_utf8_in_query_and_path_is_400_naming_it(http: httpx.Client) -> None:
    # %ED%A0%80 is U+D800 in UTF-8 form: not UTF-8; Starlette would quietly turn it into U+FFFD
    _is_error(http.get("/api/v1/works?label=%ED%A0%80"), 400, "label")
    _is_error(http.get("/api/v1/works/%ED%A0%80"), 400, "path")
    _is_error(http.get("/api/v1/datas?after=%FF"), 400, "after")


# -- every error is JSON -----------------------------------------------------------------------------------------------

def test_range_errors_are_json(http: httpx.Client, srv: ServerProc, tmp_path: Any) -> None:
    f = tmp_path / "r.bin"
    f.write_bytes(b"0123456789")
    d = srv.client().put_data(f)
    url = f"/api/v1/datas/{d['uid']}/content"
    r = http.get(url, headers={"Range": "bytes=100-"})
    _is_error(r, 416, "Range")
    assert r.headers["content-range"] == "bytes */10"
    _is_error(http.get(url, headers={"Range": "lines=1-2"}), 400, "Range")
    r = http.get(url, headers={"Range": "bytes=2-4"})
    assert r.status_code == 206 and r.content == b"234"
    # an If-Range that no longer matches: the whole content, as RFC 9110 says, not an error
    r = http.get(url, headers={"Range": "bytes=100-", "If-Range": '"other"'})
    assert r.status_code == 200 and r.content == b"0123456789"


def test_method_not_allowed_says_allow(http: httpx.Client, host: str) -> None:
    r = http.put("/api/v1/health")
    _is_error(r, 405, None)
    assert r.headers["allow"] == "GET"
    r = http.get(f"/api/v1/hosts/{host}/sync")  # the fast path's route: only POST
    _is_error(r, 405, None)
    assert r.headers["allow"] == "POST"
    r = http.put("/api/v1/apps")  # one path, two routes (GET and POST): Allow names both
    _is_error(r, 405, None)
    assert r.headers["allow"] == "GET, POST"
    r = http.get("/api/v1/works/wait")  # a literal path beside /works/{uid}: not taken for the work "wait"
    _is_error(r, 405, None)
    assert r.headers["allow"] == "POST"


def test_a_value_another_object_holds_is_409(http: httpx.Client) -> None:
    """Unique columns beyond the ones services check by hand (here a user's X.509 DN): 409 naming the field,
    not the database's integrity error as a 500."""
    dn = "CN=twin,O=xwhep-test"
    assert http.post("/api/v1/users", json={"login": "twin-1", "x509_dn": dn}).status_code == 201
    _is_error(http.post("/api/v1/users", json={"login": "twin-2", "x509_dn": dn}), 409, "x509_dn")


def test_an_account_cannot_delete_itself(http: httpx.Client) -> None:
    me = http.get("/api/v1/me").json()
    _is_error(http.delete(f"/api/v1/users/{me['uid']}"), 409, "uid")
    assert http.get("/api/v1/me").status_code == 200


def test_integers_are_json_schema_integers(worker_http: httpx.Client, host: str) -> None:
    """3.0 is the integer 3 (as JSON Schema, and so the OpenAPI document, says); 3.5 and true are not."""
    assert worker_http.post(f"/api/v1/hosts/{host}/sync", json={"max": 1.0}).status_code == 200
    _is_error(worker_http.post(f"/api/v1/hosts/{host}/sync", json={"max": 1.5}), 400, "max")
    _is_error(worker_http.post(f"/api/v1/hosts/{host}/sync", json={"wait": False}), 400, "wait")


def test_unknown_route_is_json_404(http: httpx.Client) -> None:
    _is_error(http.get("/api/v1/no-such-thing"), 404, None)
    _is_error(http.get("/nowhere"), 404, None)


def _chunked(srv: ServerProc, path: str, token: str, total: int) -> tuple[int, dict[str, str], bytes]:
    """POST ``total`` bytes as a chunked body through a raw TLS socket; the response, however early it comes."""
    ctx = ssl.create_default_context(cafile=str(srv.ca))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        chunk = b"[" + b" " * 16382 + b"]"
        sent = 0
        try:
            while sent < total:
                tls.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            tls.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed before the body ended: the answer is what counts
        data = b""
        while b"\r\n\r\n" not in data:
            more = tls.recv(65536)
            assert more, "connection closed without a response"
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", "0"))
        while len(body) < n:
            more = tls.recv(65536)
            if not more:
                break
            body += more
        return int(lines[0].split()[1]), headers, body


def test_oversized_chunked_body_is_413(srv: ServerProc, host: str) -> None:
    token = srv.client().login()
    status, headers, body = _chunked(srv, "/api/v1/datas", token, 4 * MAX_BODY)
    assert status == 413, body
    assert headers["content-type"] == "application/json" and json.loads(body)["error"]
    wtoken = srv.client("worker").login()
    status, headers, body = _chunked(srv, f"/api/v1/hosts/{host}/sync", wtoken, 4 * MAX_BODY)
    assert status == 413, body
    assert headers["content-type"] == "application/json" and json.loads(body)["error"]


def test_unique_violation_is_409_on_either_database(make_server: Callable[..., ServerProc], db_url: str | None) -> None:
    srv = make_server(db=db_url)
    token = srv.client().login()
    with httpx.Client(verify=ssl.create_default_context(cafile=str(srv.ca)), base_url=srv.url,
                      headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        dn = "CN=twin,O=xwhep-test"
        assert c.post("/api/v1/users", json={"login": "twin-1", "x509_dn": dn}).status_code == 201
        _is_error(c.post("/api/v1/users", json={"login": "twin-2", "x509_dn": dn}), 409, "x509_dn")
