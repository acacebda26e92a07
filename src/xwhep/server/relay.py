"""The relay hub: control channels of workers and server proxies, stream rendezvous, and splicing.

Nobody but the server accepts connections. A worker (or a client's server proxy) keeps a *control channel*, a
WebSocket it opened itself. A stream is asked for by an *initiator* (``xwproxy`` on a client, or a worker on
behalf of a job reaching a forward address), who opens a WebSocket to the server; the server sends
``{"op": "open", "stream": SID, …}`` on the target's control channel; the target opens its own WebSocket to
``/relay/SID`` (the *acceptor*); the server then splices the two WebSockets.

One WebSocket per stream (not one multiplexed channel) because each then has its own TCP flow control: a slow
reader stalls only its own stream, and the server needs no credit protocol. The splice holds at most one message
per direction in flight and awaits every send (uvicorn stops reading a WebSocket until its queued message is
taken), so a slow reader makes the fast writer wait instead of making the server's memory grow.

Messages on a stream: binary = data; the text message ``eof`` = half-close (no more data from that side);
closing the WebSocket ends the stream (code 1000, or 4xxx with a reason on failure). The hub forwards both kinds
as they are and only ends the stream when either side closes.

Connect latency: a TLS handshake costs several milliseconds in Python, two per stream (initiator and target)
without care. So both ends may dial *ahead*: an initiator WebSocket is accepted once authenticated and asks for
its stream later with the text ``open`` (answered ``ok`` once the target joined, or closed with 4000+HTTP status
and the reason); a target keeps *spare* WebSockets (``/hosts/{uid}/spare``, ``/proxies/spare``) that the hub
hands a stream to with ``{"op": "open", …}`` (followed at once by the stream's data; a target that cannot serve
it closes the spare with 4000 + status and the reason).
Without a spare the hub falls back to the control channel and a fresh ``/relay/SID`` WebSocket. Idle spares
and idle initiators are closed after :data:`SPARE_TTL` (their peers dial new ones).

The fast data path: initiators and spares may be *raw connections* (:class:`RawSide`, format in
:mod:`xwhep.core.relaywire`) on a port of the hub's own (:meth:`Hub.serve_raw`), opened with a one-time stream
ticket (:meth:`Hub.issue_tickets`, asked for with the bearer token) and served by the same endpoint code as the
WebSockets. Two raw connections are spliced transport to transport (:meth:`Hub._pipe`), with no Python object
per message. A listener of its own rather than uvicorn's connection taken over after a handshake: it depends on
no private part of uvicorn, and a server reachable on one port only still works (clients fall back to the
WebSockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from starlette.websockets import WebSocket

from xwhep.core import relaywire as wire
from xwhep.core.tunnels import PROXY_PREFIX
from xwhep.server.auth import Identity

log = logging.getLogger("xwhep.relay")

OPEN_TIMEOUT = 10.0  # seconds a target has to join a stream it was asked for
SPARE_TTL = 300.0  # seconds an idle spare (or an initiator that has not asked yet) is kept
MAX_SPARES = 8  # idle spares kept per worker or server proxy
EVENT_DELAY = 0.05  # seconds the events of opened streams wait, to be written together
CLOSE_WAIT = 2.0  # seconds a close frame may wait behind a stalled stream's data
WATCH_PERIOD = 2.0  # seconds between two checks that a stream's work still runs
MAX_STREAMS = 1024  # concurrent streams per control channel
CLOSE_WORK_ENDED = 4410
CLOSE_REPLACED = 4409
TICKET_TTL = 60.0  # seconds a stream ticket may wait before its raw connection presents it
MAX_TICKETS = 100_000  # outstanding stream tickets (server-wide)
MAX_USER_TICKETS = 10_000  # outstanding stream tickets of one user (beyond: WebSockets); hosts may share one
RAW_HEADER_TIMEOUT = 10.0  # seconds a raw connection has to present its ticket
RAW_INBOX = 4 << 20  # bytes a raw connection may have waiting before the server stops reading it
RAW_WRITE_HIGH = 1 << 20  # bytes queued towards a raw connection before its source stops being read
RAW_READ = 256 * 1024 + 256  # read buffer of a raw connection (the TLS layer decrypts up to 256 KiB at once)


class Refused(Exception):
    """A stream cannot be set up; ``status`` is the HTTP status the initiator is answered with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(eq=False)
class Channel:
    """A control channel: a WebSocket a worker (``host``) or a client's server proxy (``proxy``) keeps open."""

    kind: Literal["host", "proxy"]
    key: str  # host uid or proxy address
    owner: str  # the user uid allowed to join this channel's streams
    ws: WebSocket
    opened: float = field(default_factory=time.time)
    streams: int = 0  # active streams (for the per-channel cap)

    async def send(self, msg: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(msg))


@dataclass(eq=False)
class Spare:
    """An idle WebSocket a target dialed ahead; the hub gives it the next stream for that target."""

    kind: Literal["host", "proxy"]
    key: str
    owner: str
    ws: Side
    taken: asyncio.Event = field(default_factory=asyncio.Event)  # claimed for a stream, or dropped
    done: asyncio.Event = field(default_factory=asyncio.Event)  # its handler may return
    used: bool = False  # a stream was handed to it


@dataclass(eq=False)
class Stream:
    """One relayed connection, from the moment the target is asked to its end."""

    sid: str
    channel: Channel
    acceptor: asyncio.Future[Side]
    work: str | None = None
    task: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    bytes_up: int = 0  # initiator → acceptor
    bytes_down: int = 0
    raw: bool = False  # spliced raw connection to raw connection (the fast path)


def _relay_code(code: int) -> int:
    """The close code to pass on to the other side (1005/1006 are reserved: they may not be sent)."""
    if code in (1000, 1005):
        return 1000
    if code in (1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999:
        return code
    return 1011


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame carries (123 bytes of UTF-8)."""
    data = text.encode()[:120]
    return data.decode(errors="ignore")


async def _close(ws: Side, code: int, reason: str) -> None:
    # The side may already be gone or closing: nothing to do then. A side that stopped reading (a stalled stream)
    # blocks the close frame behind its queued data: give up waiting; the connection goes when the handler ends.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(code, close_reason(reason)), CLOSE_WAIT)


class Hub:
    """Registry of control channels and pending streams; splices streams. Lives on the server's event loop."""

    def __init__(self, secret: bytes, open_timeout: float = OPEN_TIMEOUT, max_streams: int = MAX_STREAMS) -> None:
        self._secret = hashlib.sha256(b"xwhep relay proxies\0" + secret).digest()
        self.open_timeout = open_timeout
        self.max_streams = max_streams
        self.hosts: dict[str, Channel] = {}
        self.proxies: dict[str, Channel] = {}
        self.pending: dict[str, Stream] = {}
        self.active: dict[str, Stream] = {}
        self.spares: dict[tuple[str, str], deque[Spare]] = {}
        self._events: list[dict[str, Any]] = []
        self.verdicts: dict[tuple[Any, ...], tuple[float, Any]] = {}  # recent accepted rights checks (api/relay)
        self._flush: asyncio.Task[None] | None = None
        self.tickets: dict[str, tuple[float, Identity]] = {}  # stream ticket → (expiry, identity)
        self.used_tickets: dict[str, float] = {}  # redeemed tickets (→ expiry), to say "already used"
        self._purged = 0.0
        self._ticket_counts: dict[str, int] = {}  # outstanding tickets per user uid
        self.raw_port: int | None = None  # the raw relay port, once listening
        self._raw_server: asyncio.AbstractServer | None = None

    # -- channels ----------------------------------------------------------------------------------------------------
    def _registry(self, ch: Channel) -> dict[str, Channel]:
        return self.hosts if ch.kind == "host" else self.proxies

    async def attach(self, ch: Channel) -> None:
        """Register ``ch``; an older channel under the same key is closed (its peer reconnected)."""
        reg = self._registry(ch)
        old = reg.get(ch.key)
        reg[ch.key] = ch
        if old is not None and old is not ch:
            await _close(old.ws, CLOSE_REPLACED, "replaced by a newer control channel")

    def detach(self, ch: Channel) -> None:
        reg = self._registry(ch)
        if reg.get(ch.key) is ch:
            del reg[ch.key]
        for s in list(self.pending.values()):  # nobody will answer these any more
            if s.channel is ch and not s.acceptor.done():
                s.acceptor.set_exception(Refused(503, f"the {ch.kind} control channel closed"))

    async def drop(self, kind: Literal["host", "proxy"], key: str) -> int:
        """Close the control channel and the spares of one target (it reconnects); how many were closed."""
        n = 0
        ch = (self.hosts if kind == "host" else self.proxies).get(key)
        if ch is not None:
            self.detach(ch)
            await _close(ch.ws, 1012, "dropped by an administrator")
            n += 1
        for spare in list(self.spares.get((kind, key), ())):
            self.drop_spare(spare)
            await _close(spare.ws, 1012, "dropped by an administrator")
            n += 1
        return n

    def host_connected(self, host: str) -> bool:
        return host in self.hosts

    def proxy_owner(self, address: str) -> str | None:
        ch = self.proxies.get(address)
        return ch.owner if ch else None

    # -- server proxy addresses --------------------------------------------------------------------------------------
    @staticmethod
    def new_proxy_address() -> str:
        return PROXY_PREFIX + secrets.token_urlsafe(12)

    def proxy_key(self, owner: str, address: str) -> str:
        """The secret that lets ``owner`` take ``address`` again after a reconnection (or a server restart):
        derived from the server's secret, so nothing needs to be stored."""
        return hmac.new(self._secret, f"{owner}\0{address}".encode(), hashlib.sha256).hexdigest()[:32]

    def check_proxy_key(self, owner: str, address: str, key: str) -> bool:
        return hmac.compare_digest(self.proxy_key(owner, address), key)

    # -- spares ------------------------------------------------------------------------------------------------------
    def add_spare(self, spare: Spare) -> None:
        """Keep ``spare`` for the next stream of its target. Idle spares are not read (a read would have to be
        cancelled, which costs time, when a stream takes one), so one whose peer left is only noticed when it is
        taken; the oldest is dropped when too many are kept."""
        queue = self.spares.setdefault((spare.kind, spare.key), deque())
        while len(queue) >= MAX_SPARES:
            self.drop_spare(queue[0])
        queue.append(spare)

    def drop_spare(self, spare: Spare) -> None:
        queue = self.spares.get((spare.kind, spare.key))
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(spare)
            if not queue:
                del self.spares[(spare.kind, spare.key)]
        spare.taken.set()
        spare.done.set()

    async def _claim(self, ch: Channel, s: Stream, offer: dict[str, Any]) -> Side | None:
        """Hand ``s`` to a spare of ``ch``'s target: its WebSocket, or None without a usable spare.

        The spare is not waited for: the stream's first bytes follow the ``open`` on the same WebSocket, and a
        target that cannot serve it closes it with a reason (4000 + status), which ends the stream."""
        queue = self.spares.get((ch.kind, ch.key))
        while queue:
            spare = queue.popleft()
            if not queue:
                self.spares.pop((ch.kind, ch.key), None)
            if spare.owner != ch.owner:  # the channel changed hands: spares of the former owner are useless
                self.drop_spare(spare)
                await _close(spare.ws, 1000, "stale spare")
                continue
            spare.taken.set()
            try:
                await spare.ws.send_text(json.dumps({"op": "open", "stream": s.sid, **offer}))
            except Exception:  # gone meanwhile: try the next one
                spare.done.set()
                continue
            spare.used = True
            s.ended = spare.done  # the spare's handler returns when the stream ends
            return spare.ws
        return None

    # -- streams -----------------------------------------------------------------------------------------------------
    async def connect(self, ch: Channel, offer: dict[str, Any], work: str | None = None,
                      task: str | None = None) -> Stream:
        """Ask ``ch``'s peer to open a stream and wait until it joined (its WebSocket is ``stream.acceptor``):
        through a spare if it keeps one, else through the control channel."""
        if ch.streams + sum(1 for s in self.pending.values() if s.channel is ch) >= self.max_streams:
            raise Refused(503, f"too many streams through this {ch.kind} (at most {self.max_streams})")
        sid = secrets.token_urlsafe(18)
        loop = asyncio.get_running_loop()
        s = Stream(sid, ch, loop.create_future(), work=work, task=task)
        acceptor = await self._claim(ch, s, offer)
        if acceptor is not None:
            s.acceptor.set_result(acceptor)
            return s
        self.pending[sid] = s
        try:
            try:
                await ch.send({"op": "open", "stream": sid, **offer})
            except Exception:
                raise Refused(503, f"the {ch.kind} control channel is closing") from None
            try:
                await asyncio.wait_for(s.acceptor, self.open_timeout)
            except TimeoutError:
                raise Refused(504, f"the {'worker' if ch.kind == 'host' else 'server proxy'} did not answer "
                                   f"within {self.open_timeout:g} s") from None
        finally:
            self.pending.pop(sid, None)
        return s

    def join(self, sid: str, owner: str) -> Stream | None:
        """The pending stream ``sid`` if ``owner`` may accept it (the owner of the channel it was asked on)."""
        s = self.pending.get(sid)
        if s is None or s.channel.owner != owner or s.acceptor.done():
            return None
        return s

    def refuse(self, ch: Channel, sid: str, reason: str) -> None:
        """The target of a pending stream said no (e.g. nothing listens on that port)."""
        s = self.pending.get(sid)
        if s is not None and s.channel is ch and not s.acceptor.done():
            s.acceptor.set_exception(Refused(502, reason[:300] or "refused"))

    async def splice(self, s: Stream, initiator: Side,
                     still_valid: Callable[[], str | None] | None = None) -> tuple[int, str]:
        """Relay messages both ways until one side closes (or ``still_valid`` returns a reason to stop);
        close the other side with the same code. Returns the code and reason the stream ended with.

        Two raw connections are joined transport to transport (:meth:`_pipe`); otherwise message by message."""
        acceptor = s.acceptor.result()
        if isinstance(initiator, RawSide) and isinstance(acceptor, RawSide):
            return await self._pipe(s, initiator, acceptor, still_valid)

        async def pump(src: Side, dst: Side, up: bool) -> tuple[int, str]:
            receive, send = src.receive, dst.send
            n = 0
            try:
                while True:
                    msg = await receive()
                    if msg["type"] == "websocket.disconnect":
                        return int(msg.get("code") or 1000), str(msg.get("reason") or "")
                    data = msg.get("bytes")
                    if data is not None:
                        n += len(data)
                    msg["type"] = "websocket.send"
                    await send(msg)
            finally:
                if up:
                    s.bytes_up += n
                else:
                    s.bytes_down += n

        async def watch() -> tuple[int, str]:
            assert still_valid is not None
            while True:
                await asyncio.sleep(WATCH_PERIOD)
                reason = still_valid()
                if reason:
                    return CLOSE_WORK_ENDED, reason

        up = asyncio.create_task(pump(initiator, acceptor, True))
        down = asyncio.create_task(pump(acceptor, initiator, False))
        tasks = {up, down}
        watcher = asyncio.create_task(watch()) if still_valid is not None else None
        if watcher is not None:
            tasks.add(watcher)
        self.active[s.sid] = s
        s.channel.streams += 1
        code, reason = 1011, "relay failure"
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = done.pop()
            exc = first.exception()
            if exc is None:
                code, reason = first.result()
                if code == 1006:
                    reason = reason or "the other end was lost"
            else:  # sending failed: the receiving side is gone
                code, reason = 1011, "the other end was lost"
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            code = _relay_code(code)
            await asyncio.gather(_close(initiator, code, reason), _close(acceptor, code, reason))
            self.active.pop(s.sid, None)
            s.channel.streams -= 1
            s.ended.set()
        return code, reason

    async def _pipe(self, s: Stream, a: RawSide, b: RawSide,
                    still_valid: Callable[[], str | None] | None) -> tuple[int, str]:
        """Splice two raw connections: each one's bytes are written to the other as they come (no message
        objects), the frame boundaries only followed; a full write buffer stops the reading of its source, so
        a stalled stream holds a bounded amount of memory here."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[tuple[int, str]] = loop.create_future()
        link(a, b, ended)
        s.raw = True
        self.active[s.sid] = s
        s.channel.streams += 1
        code, reason = 1011, "relay failure"
        try:
            if still_valid is None:
                code, reason = await ended
            else:
                while True:
                    try:
                        code, reason = await asyncio.wait_for(asyncio.shield(ended), WATCH_PERIOD)
                        break
                    except TimeoutError:
                        why = still_valid()
                        if why:
                            code, reason = CLOSE_WORK_ENDED, why
                            for src, dst in ((a, b), (b, a)):
                                if src.framer.at_boundary:  # else the close would land inside a frame
                                    dst.write(wire.close_frame(code, why))
                            break
        finally:
            s.bytes_up += a.count
            s.bytes_down += b.count
            a.peer = b.peer = None
            a.shut()
            b.shut()
            self.active.pop(s.sid, None)
            s.channel.streams -= 1
            s.ended.set()
        return code, reason

    # -- stream tickets (raw connections) ----------------------------------------------------------------------------
    def issue_tickets(self, ident: Identity, n: int) -> list[str]:
        """``n`` one-time tickets that open raw connections as ``ident`` (asked for with its bearer token)."""
        now = time.monotonic()
        if now - self._purged > 1.0:
            self._purged = now
            kept = {}
            for t, v in self.tickets.items():
                if v[0] > now - TICKET_TTL:
                    kept[t] = v
                else:
                    self._count_tickets(v[1].uid, -1)
            self.tickets = kept
            self.used_tickets = {t: exp for t, exp in self.used_tickets.items() if exp > now - TICKET_TTL}
        if len(self.tickets) + n > MAX_TICKETS:
            raise Refused(503, "too many stream tickets outstanding: use the WebSocket endpoints")
        if self._ticket_counts.get(ident.uid, 0) + n > MAX_USER_TICKETS:  # one user cannot use them all up
            raise Refused(429, f"too many stream tickets outstanding for {ident.login}: use them first")
        out = [secrets.token_urlsafe(24) for _ in range(n)]
        for t in out:
            self.tickets[t] = (now + TICKET_TTL, ident)
        self._count_tickets(ident.uid, n)
        return out

    def _count_tickets(self, uid: str, delta: int) -> None:
        left = self._ticket_counts.get(uid, 0) + delta
        if left > 0:
            self._ticket_counts[uid] = left
        else:
            self._ticket_counts.pop(uid, None)

    def redeem(self, ticket: str) -> Identity | str:
        """The identity of a ticket, once; else why it is refused."""
        hit = self.tickets.pop(ticket, None)
        now = time.monotonic()
        if hit is None:
            if ticket in self.used_tickets:
                return "this stream ticket was already used"
            return "unknown stream ticket"
        self.used_tickets[ticket] = hit[0]
        self._count_tickets(hit[1].uid, -1)
        if hit[0] < now:
            return "this stream ticket expired"
        return hit[1]

    async def serve_raw(self, sock: Any, ssl_context: Any,
                        dispatch: Callable[[RawSide, str, str], Awaitable[None]]) -> None:
        """Accept raw connections on ``sock`` (TLS with ``ssl_context`` unless None)."""
        loop = asyncio.get_running_loop()
        self._raw_server = await loop.create_server(lambda: RawSide(dispatch), sock=sock, ssl=ssl_context,
                                                    ssl_handshake_timeout=RAW_HEADER_TIMEOUT if ssl_context
                                                    else None)
        self.raw_port = int(sock.getsockname()[1])

    # -- events ------------------------------------------------------------------------------------------------------
    def record(self, events: list[dict[str, Any]], write: Callable[[list[dict[str, Any]]], Awaitable[Any]]) -> None:
        """Write the events of opened streams soon, many in one transaction: a burst of connections costs one
        write, and none of it delays a stream's first bytes."""
        self._events.extend(events)
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._flush_events(write))

    async def _flush_events(self, write: Callable[[list[dict[str, Any]]], Awaitable[Any]]) -> None:
        await asyncio.sleep(EVENT_DELAY)
        batch, self._events = self._events, []
        try:
            await write(batch)
        except Exception:  # the database is unreachable: say so, keep relaying
            log.exception("could not record %d tunnel event(s)", len(batch))

    def stats(self, work: str | None = None) -> dict[str, int]:
        """Counts of channels, spares and streams (only those to or from ``work`` with a work)."""
        streams = [s for s in self.active.values() if work is None or s.work == work]
        return {"hosts": len(self.hosts), "proxies": len(self.proxies), "pending": len(self.pending),
                "streams": len(streams), "raw_streams": sum(1 for s in streams if s.raw),
                "spares": sum(len(q) for q in self.spares.values()), "raw_port": self.raw_port or 0}

    async def close(self) -> None:
        """Server shutdown: end every control channel and spare (their peers reconnect to the next server); write
        the events still waiting."""
        if self._raw_server is not None:
            self._raw_server.close()
        if self._flush is not None:
            with contextlib.suppress(Exception):
                await self._flush
        for ch in [*self.hosts.values(), *self.proxies.values()]:
            await _close(ch.ws, 1012, "server restarting")
        for queue in list(self.spares.values()):
            for spare in list(queue):
                self.drop_spare(spare)
                await _close(spare.ws, 1012, "server restarting")


# -- raw connections ---------------------------------------------------------------------------------------------------

def _skip(_: memoryview) -> None:
    return None


def _message_frame(msg: dict[str, Any]) -> bytes:
    text = msg.get("text")
    if text is not None:
        return wire.frame(wire.TEXT, text.encode())
    return wire.frame(wire.BIN, msg.get("bytes") or b"")


class RawSide(asyncio.BufferedProtocol):
    """A raw connection (:mod:`xwhep.core.relaywire`) on the server, with the part of Starlette's WebSocket the
    relay endpoints use (``accept``, ``receive``, ``send``, ``send_text``, ``close``), so they serve both.

    A buffered protocol: TLS decrypts straight into one buffer per connection, which the splice hands to the
    other connection's TLS (which encrypts it before ``write`` returns): no allocation per read."""

    def __init__(self, dispatch: Callable[[RawSide, str, str], Awaitable[None]]) -> None:
        self.dispatch = dispatch
        self.scope: dict[str, Any] = {"type": "xwrelay"}  # no denial-response extension: refusals are closes
        self.transport: asyncio.Transport | None = None
        self.line = b""
        self.started = False
        self.framer = wire.Framer()
        self.inbox: deque[dict[str, Any]] = deque()
        self.inbox_bytes = 0
        self.reading_paused = False
        self.closed: tuple[int, str] | None = None  # received a close frame, or the connection was lost
        self.lost = False
        self.shut_down = False
        self.peer: RawSide | None = None  # set while spliced with another raw connection
        self.ended: asyncio.Future[tuple[int, str]] | None = None
        self.count = 0
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._buf = bytearray(RAW_READ)
        self._view = memoryview(self._buf)
        self._plain_peer = False  # the peer's transport may keep a view of the buffer (no TLS): copy then

    # -- asyncio callbacks -------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=RAW_WRITE_HIGH)
        self._timer = asyncio.get_running_loop().call_later(RAW_HEADER_TIMEOUT, self._no_header)

    def _no_header(self) -> None:
        if not self.started and self.transport is not None:
            self.transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        peer = self.peer
        if peer is not None:  # the hot path: pass the bytes on, follow the frames
            peer.write(bytes(data) if self._plain_peer else data)
            self.count += len(data)
            try:
                controls = self.framer.feed(data)
            except wire.WireError:
                self._lost_in_pipe()
                return
            for kind, payload in controls:
                if kind == wire.CLOSE and self.ended is not None and not self.ended.done():
                    self.ended.set_result(wire.parse_close(payload))
            return
        if not self.started:
            self.line += bytes(data)
            end = self.line.find(b"\n")
            if end < 0:
                if len(self.line) > wire.MAX_LINE and self.transport is not None:
                    self.transport.abort()
                return
            line, data = self.line[:end], self.line[end + 1:]
            self.line = b""
            self.started = True
            if self._timer is not None:
                self._timer.cancel()
            parts = line.decode(errors="replace").split(" ")
            if len(parts) != 3 or parts[0] != wire.MAGIC.decode():
                self.write(wire.close_frame(4400, "expected XWRELAY1 TICKET PATH"))
                self.shut()
                return
            self._task = asyncio.ensure_future(self._run(parts[1], parts[2]))
            if not data:
                return
        try:
            frames = self.framer.feed(data)
        except wire.WireError as exc:
            self.closed = (1002, str(exc))
            self.write(wire.close_frame(1002, str(exc)))
            self.shut()
            self._wake()
            return
        for kind, payload in frames:
            if kind == wire.CLOSE:
                self.closed = wire.parse_close(payload)
            elif self.closed is None:
                if kind == wire.TEXT:
                    self.inbox.append({"type": "websocket.receive", "text": payload.decode(errors="replace")})
                else:
                    self.inbox.append({"type": "websocket.receive", "bytes": payload})
                self.inbox_bytes += len(payload)
        if self.inbox_bytes > RAW_INBOX and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.closed is None:
            self.closed = (1006, "")
        if self._timer is not None:
            self._timer.cancel()
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionError("the connection was lost"))
        if self.peer is not None:
            self._lost_in_pipe()

    def _lost_in_pipe(self) -> None:
        peer = self.peer
        if peer is None or self.ended is None or self.ended.done():
            return
        if self.framer.at_boundary:
            peer.write(wire.close_frame(1011, "the other end was lost"))
        elif peer.transport is not None:  # a close inside a frame would be garbage: cut the connection
            peer.transport.abort()
        self.ended.set_result((1006, "the other end was lost"))

    def pause_writing(self) -> None:
        self._paused = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    # -- the endpoint's side ---------------------------------------------------------------------------------------
    async def _run(self, ticket: str, target: str) -> None:
        try:
            await self.dispatch(self, ticket, target)
        except Exception:
            log.exception("raw relay connection for %s failed", target[:80])
            self.write(wire.close_frame(1011, "relay failure"))
        finally:
            if self.peer is None:
                self.shut()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.lost and not self.transport.is_closing():
            self.transport.write(data)

    def shut(self) -> None:
        """Close once what was written went out (or abort after CLOSE_WAIT: a stalled peer never takes it)."""
        if self.shut_down or self.transport is None:
            return
        self.shut_down = True
        self.transport.close()
        transport = self.transport
        asyncio.get_running_loop().call_later(CLOSE_WAIT, lambda: None if self.lost else transport.abort())

    async def accept(self) -> None:
        self.write(wire.frame(wire.TEXT, wire.ACCEPTED.encode()))

    async def receive(self) -> dict[str, Any]:
        while not self.inbox:
            if self.closed is not None:
                code, reason = self.closed
                return {"type": "websocket.disconnect", "code": code, "reason": reason}
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        msg = self.inbox.popleft()
        self.inbox_bytes -= len(msg.get("bytes") or msg.get("text") or "")
        if self.reading_paused and self.inbox_bytes < RAW_INBOX // 2 and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        return msg

    async def send(self, msg: dict[str, Any]) -> None:
        if self.lost or self.shut_down:
            raise ConnectionError("the raw connection is closed")
        if msg.get("type") == "websocket.close":
            await self.close(int(msg.get("code") or 1000), str(msg.get("reason") or ""))
            return
        self.write(_message_frame(msg))
        if self._paused:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    async def send_text(self, text: str) -> None:
        await self.send({"type": "websocket.send", "text": text})

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        if not self.shut_down:
            self.write(wire.close_frame(code, reason or ""))
            self.shut()


def link(a: RawSide, b: RawSide, ended: asyncio.Future[tuple[int, str]]) -> None:
    """Join two raw connections: first what each received but nobody read, then everything as it comes."""
    for src, dst in ((a, b), (b, a)):
        for msg in src.inbox:
            dst.write(_message_frame(msg))
        src.inbox.clear()
        src.inbox_bytes = 0
        dst.write(src.framer.pending())
        src.framer.on_data = _skip
        if src.framer.kind == wire.BIN:
            src.framer.cur = None  # the rest of this frame is passed on as it comes, not collected
        src.ended = ended
    for src, dst in ((a, b), (b, a)):
        if src.closed is not None and not ended.done():  # it ended before the splice began: pass that on
            code, reason = src.closed
            if code != 1006:
                dst.write(wire.close_frame(code, reason))
            ended.set_result((code, reason or "the other end was lost"))
    a.peer, b.peer = b, a
    for src, dst in ((a, b), (b, a)):
        src._plain_peer = dst.transport is None or dst.transport.get_extra_info("sslcontext") is None
        if src.reading_paused and src.transport is not None:
            src.reading_paused = False
            src.transport.resume_reading()
        if dst._paused and src.transport is not None:
            src.transport.pause_reading()


Side = WebSocket | RawSide
