"""The relay's WebSocket endpoints (see :mod:`xwhep.server.relay` for the design).

* ``/hosts/{uid}/channel`` — a worker's control channel (the host's owner only);
* ``/works/{uid}/ports/{port}`` — a client's stream to a work's listen port (``xwproxy UID``);
* ``/proxies[?address=A&key=K]`` — a client's server proxy: the first message gives its address and the key to
  take the same address again after a reconnection; then it is the proxy's control channel;
* ``/hosts/{uid}/tasks/{task}/forward?address=A`` — a job's stream to one of its forward addresses (opened by
  the worker running it);
* ``/relay/{sid}`` — the target of a stream joins it;
* ``/hosts/{uid}/spare``, ``/proxies/spare?address=A`` — a target's spare WebSockets (see the relay module).

The stream endpoints (client and forward streams, spares) are also served on the raw relay port: a raw
connection names one of these paths and a stream ticket (``POST /relay/tickets``), and gets the same checks.

Authentication is the bearer token of the handshake, exactly as for HTTP requests; a failed one is refused
before the WebSocket is accepted, as an HTTP error with the usual ``{"error": …}`` body. An initiator (the
first two stream endpoints) is then accepted and may wait (dialed ahead) before it sends ``open``; its first
bytes may follow right behind. The rights are checked when ``open`` comes (a refusal is written to the event log
at once, an opened stream's event shortly after, in a batch). It gets ``ok`` once the target joined, or a close
with code 4000 + the HTTP status and the reason (4403, 4404, 4409, 4503, …).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from fastapi import APIRouter, Depends, Query, WebSocket

from xwhep.core import relaywire as wire
from xwhep.server import hosts as hostcache
from xwhep.server.api import schemas as S
from xwhep.server.api.deps import FastJSON, identity, revoked, state, state_dep
from xwhep.server.api.models import RefQuery, UidPath
from xwhep.server.auth import Identity
from xwhep.server.errors import ApiError
from xwhep.server.relay import (
    SPARE_TTL,
    TICKET_TTL,
    Channel,
    Hello,
    RawSide,
    Refused,
    Side,
    Spare,
    Stream,
    close_reason,
)
from xwhep.server.services import common as c
from xwhep.server.services import tunnels
from xwhep.server.state import ServerState

router = APIRouter(prefix="/api/v1", tags=["relay"])
VERDICT_TTL = 1.0  # seconds an accepted client stream's rights check is reused
log = logging.getLogger("xwhep.relay")


async def _deny(ws: Side, status: int, message: str) -> None:
    """Refuse the handshake with an HTTP error the client can read (or a close code if unsupported)."""
    if isinstance(ws, WebSocket) and "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(FastJSON({"error": message, "field": None}, status_code=status))
    else:  # the close reason is all the client gets then
        await ws.close(code=4000 + status if 400 <= status < 600 else 4000, reason=message[:120])


async def _auth(ws: WebSocket) -> Identity | None:
    """The handshake's bearer token, checked like an HTTP request's; None after refusing."""
    try:
        return await identity(ws)  # type: ignore[arg-type]  # reads only .headers and .app, as WebSocket has
    except ApiError as exc:
        await _deny(ws, exc.status, exc.message)
        return None


def _uid(value: str) -> str | None:
    try:
        return c.ref(value, "uid")
    except ApiError:
        return None


def _still_running(st: ServerState, tasks: list[str | None]) -> Any:
    """A check for the splice: a reason to end the stream once one of ``tasks`` is no longer running.

    Only tasks this process knows as running are watched (with several server processes, another one may have
    started the task; the worker then ends the stream itself when the job ends)."""
    active = st.liveness.active_tasks
    watched = [t for t in tasks if t and t in active]
    if not watched:
        return None

    def check() -> str | None:
        return "the work ended" if any(t not in active for t in watched) else None

    return check


async def _refuse(ws: Side, status: int, message: str) -> None:
    with contextlib.suppress(Exception):
        await ws.close(4000 + status if 400 <= status < 600 else 4000, close_reason(message))


async def _wait_open(ws: Side) -> bool:
    """Accept an initiator and wait (at most SPARE_TTL) for its ``open``; False if it left or misbehaved."""
    if isinstance(ws, RawSide):
        ws.accept_initiator()  # with its stream's key
    else:
        await ws.accept()
    try:
        first = await asyncio.wait_for(ws.receive(), SPARE_TTL)
    except TimeoutError:
        await _refuse(ws, 408, "idle too long: dial again")
        return False
    if first["type"] == "websocket.disconnect":
        return False
    if first.get("text") != "open":
        await _refuse(ws, 400, "expected the text message open")
        return False
    return True


async def _relay(st: ServerState, ws: Side, ch: Channel, offer: dict[str, Any], work: str | None,
                 task: str | None, watch: list[str | None], events: list[dict[str, Any]]) -> None:
    """Ask ``ch`` for a stream; once the target joined, tell the initiator ``ok`` and splice until the end."""
    try:
        stream = await st.relay.connect(ch, offer, work=work, task=task,
                                        key=ws.stream_key if isinstance(ws, RawSide) else None)
    except Refused as exc:
        for e in events:
            e.update(action="tunnel.refuse", detail=f"{e.get('detail')}: {exc.message}")
        await st.db.run(c.events, events)
        await _refuse(ws, exc.status, exc.message)
        return
    try:
        await ws.send_text("ok")
    except Exception:  # the initiator gave up meanwhile
        await _end_unused(stream)
        return
    if isinstance(ws, RawSide):
        ws.enter_stream()
    st.relay.record(events, lambda batch: st.db.run(c.events, batch))
    await st.relay.splice(stream, ws, _still_running(st, watch))


async def _end_unused(stream: Stream) -> None:
    acceptor = stream.acceptor.result()
    with contextlib.suppress(Exception):
        await acceptor.close(1001, "the initiator left")
    stream.ended.set()


async def _keep_spare(st: ServerState, ws: Side, kind: Literal["host", "proxy"], key: str,
                      owner: str) -> None:
    """Keep an accepted spare until a stream takes it (then until the stream ends) or it idles out."""
    spare = Spare(kind, key, owner, ws)
    st.relay.add_spare(spare)
    try:
        await asyncio.wait_for(spare.taken.wait(), SPARE_TTL)
    except TimeoutError:
        st.relay.drop_spare(spare)
    if not spare.done.is_set():
        await spare.done.wait()
    if not spare.used:
        await _refuse(ws, 408, "idle spare expired: dial again")


async def _control_loop(st: ServerState, ch: Channel) -> None:
    """Read a control channel until it closes; the peer may refuse a stream it was asked for."""
    await st.relay.attach(ch)
    try:
        while True:
            msg = await ch.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if not text:
                continue
            try:
                data = json.loads(text)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("op") == "refuse" and isinstance(data.get("stream"), str):
                st.relay.refuse(ch, data["stream"], str(data.get("reason") or "refused"))
    finally:
        st.relay.detach(ch)


async def _host_of(st: ServerState, ws: Side, ident: Identity, uid: str) -> str | None:
    """The host ``uid`` if ``ident`` may act for it (the worker's own credentials, or its owner's); None after
    refusing."""
    host = _uid(uid)
    try:
        if host is None:
            raise ApiError(400, f"uid: malformed uid {uid!r}")
        await hostcache.lookup(st, ident, host)
    except ApiError as exc:
        await _deny(ws, exc.status, exc.message)
        return None
    return host


async def _host_preamble(ws: WebSocket, uid: str) -> tuple[ServerState, Identity, str] | None:
    """Authenticate a worker's WebSocket and check it may act for host ``uid``; None after refusing."""
    st = state(ws)  # type: ignore[arg-type]
    ident = await _auth(ws)
    if ident is None:
        return None
    host = await _host_of(st, ws, ident, uid)
    return None if host is None else (st, ident, host)


@router.websocket("/hosts/{uid}/channel")
async def host_channel(ws: WebSocket, uid: str) -> None:
    """A worker's control channel: the server asks for streams to its jobs' listen ports on it."""
    pre = await _host_preamble(ws, uid)
    if pre is None:
        return
    st, ident, host = pre
    await ws.accept()
    await _control_loop(st, Channel("host", host, ident.uid, ws))


async def _check_work_port(st: ServerState, ident: Identity, work: str, port: int) -> tunnels.Verdict:
    """The rights check of a client stream, reused for a second (a browser opens connections in bursts): a
    change of rights applies to new streams within that second. A refusal is never reused."""
    key = (ident.uid, ident.level, ident.usergroup, work, port)
    hit = st.relay.verdicts.get(key)
    now = time.monotonic()
    if hit is not None and hit[0] > now and st.relay.host_connected(hit[1].host or ""):
        cached: tunnels.Verdict = hit[1]
        return tunnels.Verdict(True, host=cached.host, task=cached.task, work=cached.work, port=cached.port,
                               events=[{k: x for k, x in e.items() if k != "time"} for e in cached.events])
    v: tunnels.Verdict = await st.db.run(tunnels.check_work_port, ident, work, port, st.relay.host_connected)
    if v.ok:
        if len(st.relay.verdicts) > 10_000:
            st.relay.verdicts.clear()
        st.relay.verdicts[key] = (now + VERDICT_TTL, v)
    return v


async def _work_port(st: ServerState, ws: Side, ident: Identity, uid: str, port: int) -> None:
    work = _uid(uid)
    if work is None:
        await _deny(ws, 400, f"uid: malformed uid or URI {uid!r}")
        return
    if not await _wait_open(ws):
        return
    v = await _check_work_port(st, ident, work, port)
    if not v.ok:
        await _refuse(ws, v.status, v.message)
        return
    ch = st.relay.hosts.get(v.host or "")
    if ch is None:
        await _refuse(ws, 503, f"the worker running work {work} just disconnected: try again")
        return
    await _relay(st, ws, ch, {"task": v.task, "work": work, "port": port}, work, v.task, [v.task], v.events)


@router.websocket("/works/{uid}/ports/{port}")
async def work_port(ws: WebSocket, uid: str, port: int) -> None:
    """A client's stream to port ``port`` of work ``uid`` (``xwproxy UID --xwlistenport …``)."""
    ident = await _auth(ws)
    if ident is not None:
        await _work_port(state(ws), ws, ident, uid, port)  # type: ignore[arg-type]


@router.websocket("/proxies")
async def proxy_channel(ws: WebSocket, address: str | None = None, key: str | None = None) -> None:
    """Register a server proxy (``xwproxy --xwlistenport P``): its address is usable by its owner's works."""
    st = state(ws)  # type: ignore[arg-type]
    ident = await _auth(ws)
    if ident is None:
        return
    if ident.is_worker:
        await _deny(ws, 403, f"{ident.login} ({ident.level.name}) may not register server proxies")
        return
    if address is not None:
        if not key or not st.relay.check_proxy_key(ident.uid, address, key):
            await _deny(ws, 403, f"server proxy {address}: wrong key, or it belongs to another user")
            return
    else:
        address = st.relay.new_proxy_address(ident.uid)
    await ws.accept()
    await ws.send_text(json.dumps({"address": address, "key": st.relay.proxy_key(ident.uid, address)}))
    await st.db.run(lambda conn: c.event(conn, ident.uid, "tunnel.proxy", None, detail=f"server proxy {address}"))
    await _control_loop(st, Channel("proxy", address, ident.uid, ws))


async def _forward(st: ServerState, ws: Side, ident: Identity, uid: str, task: str, address: str) -> None:
    host = await _host_of(st, ws, ident, uid)
    if host is None:
        return
    task_uid = _uid(task)
    if task_uid is None:
        await _deny(ws, 400, "malformed host or task uid")
        return
    if not await _wait_open(ws):
        return
    v = await st.db.run(tunnels.check_forward, host, task_uid, address, st.relay.host_connected,
                        st.relay.proxy_owner)
    if not v.ok:
        await _refuse(ws, v.status, v.message)
        return
    if v.proxy is not None:
        ch = st.relay.proxies.get(v.proxy)
        offer: dict[str, Any] = {"address": v.proxy}
    else:
        ch = st.relay.hosts.get(v.host or "")
        offer = {"task": v.task, "work": v.work, "port": v.port}
    if ch is None:
        await _refuse(ws, 503, f"{address} just disconnected: try again")
        return
    await _relay(st, ws, ch, offer, v.work, v.task, [task_uid, v.task], v.events)


@router.websocket("/hosts/{uid}/tasks/{task}/forward")
async def forward(ws: WebSocket, uid: str, task: str, address: str) -> None:
    """A job's stream to one of its forward addresses, opened by the worker running the job."""
    ident = await _auth(ws)
    if ident is not None:
        await _forward(state(ws), ws, ident, uid, task, address)  # type: ignore[arg-type]


@router.websocket("/hosts/{uid}/spare")
async def host_spare(ws: WebSocket, uid: str) -> None:
    """A worker's spare WebSocket: the next stream to one of its jobs' ports is handed to it."""
    pre = await _host_preamble(ws, uid)
    if pre is None:
        return
    st, ident, host = pre
    await ws.accept()
    await _keep_spare(st, ws, "host", host, ident.uid)


async def _proxy_spare(st: ServerState, ws: Side, ident: Identity, address: str) -> None:
    if st.relay.proxy_owner(address) != ident.uid:
        await _deny(ws, 404, f"no server proxy {address} of yours is connected")
        return
    await ws.accept()
    await _keep_spare(st, ws, "proxy", address, ident.uid)


@router.websocket("/proxies/spare")
async def proxy_spare(ws: WebSocket, address: str) -> None:
    """A server proxy's spare WebSocket (its owner only)."""
    ident = await _auth(ws)
    if ident is not None:
        await _proxy_spare(state(ws), ws, ident, address)  # type: ignore[arg-type]


@router.websocket("/relay/{sid}")
async def relay_join(ws: WebSocket, sid: str) -> None:
    """The target of a stream joins it (a worker for a listen port, ``xwproxy`` for a server proxy)."""
    st = state(ws)  # type: ignore[arg-type]
    ident = await _auth(ws)
    if ident is None:
        return
    stream = st.relay.join(sid, ident.uid)
    if stream is None:
        await _deny(ws, 404, "no such stream (it timed out, or was asked of someone else)")
        return
    await ws.accept()
    if stream.acceptor.done():  # the initiator stopped waiting in between
        await ws.close(1001, "the stream was given up")
        return
    stream.acceptor.set_result(ws)
    await stream.ended.wait()


# -- raw connections (the fast data path: see xwhep.core.relaywire) --------------------------------------------------

_RAW_ROUTES = [
    (re.compile(r"/works/([^/]+)/ports/(\d{1,5})"), "work_port"),
    (re.compile(r"/hosts/([^/]+)/tasks/([^/]+)/forward"), "forward"),
    (re.compile(r"/hosts/([^/]+)/spare"), "host_spare"),
    (re.compile(r"/proxies/spare"), "proxy_spare"),
]


async def raw_stream(st: ServerState, side: RawSide, hello: Hello) -> None:
    """A raw connection's hello (opened with its ticket's key) names ``target`` (the path of the WebSocket
    endpoint it stands for): the same checks and the same handling as that endpoint, the ticket standing for the
    bearer token it was issued against. A refused hello of a known ticket is an event of the ticket's user."""
    if hello.ident is None:
        if hello.uid is not None:
            detail = f"raw relay connection refused: {hello.error}"
            uid = hello.uid
            await st.db.run(lambda conn: c.event(conn, uid, "tunnel.refuse", None, detail=detail))
        await _deny(side, 401, hello.error)
        return
    ident, target = hello.ident, hello.target
    why = await revoked(st, ident)
    if why:
        await _deny(side, 401, why)
        return
    parts = urlsplit(target)
    query = dict(parse_qsl(parts.query))
    for pattern, name in _RAW_ROUTES:
        m = pattern.fullmatch(parts.path.removeprefix("/api/v1"))
        if m is None:
            continue
        if name == "work_port":
            await _work_port(st, side, ident, unquote(m[1]), int(m[2]))
        elif name == "forward" and "address" in query:
            await _forward(st, side, ident, unquote(m[1]), unquote(m[2]), query["address"])
        elif name == "host_spare":
            host = await _host_of(st, side, ident, unquote(m[1]))
            if host is not None:
                await side.accept()
                await _keep_spare(st, side, "host", host, ident.uid)
        elif name == "proxy_spare" and "address" in query:
            await _proxy_spare(st, side, ident, query["address"])
        else:
            break
        return
    await _deny(side, 404, f"no raw relay endpoint {parts.path[:60]!r}")


Ident = Annotated[Identity, Depends(identity)]
St = Annotated[ServerState, Depends(state_dep)]


@router.get("/relay", response_model=S.RelayStats)
async def relay_stats(ident: Ident, st: St, work: RefQuery = None) -> FastJSON:
    """Connected control channels, spares and open streams (of one work with ``work``): administrators."""
    if not ident.is_admin:
        raise ApiError(403, f"{ident.login} may not see the relay's state")
    return FastJSON(st.relay.stats(c.ref(work, "work") if work else None))


@router.delete("/relay/hosts/{uid:uid}", response_model=S.Dropped)
async def relay_drop_host(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    """Close a worker's control channel and spares (administrators): it reconnects; streams in flight go on."""
    if not ident.is_admin:
        raise ApiError(403, f"{ident.login} may not drop relay channels")
    host = c.ref(uid, "uid")
    dropped = await st.relay.drop("host", host)
    await st.db.run(lambda conn: c.event(conn, ident.uid, "tunnel.drop", host, detail=f"{dropped} connection(s)"))
    return FastJSON({"dropped": dropped})


@router.post("/relay/tickets", response_model=S.Tickets)
async def relay_tickets(ident: Ident, st: St, n: Annotated[int, Query(ge=1, le=16)] = 4) -> FastJSON:
    """``n`` one-time stream tickets (1–16) for the raw relay port: each opens one raw connection as the caller,
    within a minute, in place of a WebSocket handshake: ``{"id", "key"}``, the key (base64, 32 bytes) sealing
    that connection's hello (it never travels on the raw port). ``port`` is None when the server has no raw port
    (then the WebSocket endpoints are the only way)."""
    if st.relay.raw_port is None:
        return FastJSON({"port": None, "tickets": [], "ttl": TICKET_TTL})
    try:
        tickets = st.relay.issue_tickets(ident, n)
    except Refused as exc:
        raise ApiError(exc.status, exc.message) from None
    return FastJSON({"port": st.relay.raw_port, "tickets": [{"id": t, "key": wire.encode_key(k)} for t, k in tickets],
                     "ttl": TICKET_TTL})
