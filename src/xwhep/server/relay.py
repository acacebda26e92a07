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
:mod:`xwhep.core.relaywire`) on a port of the hub's own (:meth:`Hub.serve_raw`): plain TCP carrying sealed
records, opened with a one-time stream ticket and its key (:meth:`Hub.issue_tickets`, asked for with the bearer
token over HTTPS; :meth:`Hub.hello` opens the connection's sealed hello) and served by the same endpoint code as
the WebSockets. Two raw connections are spliced transport to transport (:meth:`Hub._pipe`): the records pass as
they are, never decrypted (the server draws each stream's key and hands it to both ends in their sealed
messages, so it can still seal a close of its own at a record boundary). A listener of its own rather than
uvicorn's connection taken over after a handshake: it depends on no private part of uvicorn, and a server
reachable on one port only still works (clients fall back to the WebSockets).
"""

from __future__ import annotations

import asyncio
import base64
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
_BOUND_PROXY_LENGTH = 28  # characters after 'xwproxy:' of an owner-bound address (12 random + 16 MAC)
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
RAW_READ = 256 * 1024 + 256  # read buffer of a spliced raw connection (a sealed record of 256 KiB and a header)
RAW_FIRST = 16 * 1024  # the first one (it grows once reads fill it: nothing big to allocate on a stream's path)


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
    key: bytes | None = None  # the stream key (a raw initiator's, or drawn for a raw spare)


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
        self.tickets: dict[str, tuple[float, Identity, bytes]] = {}  # stream ticket → (expiry, identity, key)
        self.used_tickets: dict[str, tuple[float, str]] = {}  # redeemed tickets (→ expiry, user), "already used"
        self._purged = 0.0
        self._reported: set[str] = set()  # tickets whose refused hello is already an event (one each)
        self._ticket_counts: dict[str, int] = {}  # outstanding tickets per user uid
        self.raw_port: int | None = None  # the raw relay port, once listening
        self.streams_ended = 0  # streams relayed and their bytes, counted when they end (server/metrics.py)
        self.bytes_up_ended = 0
        self.bytes_down_ended = 0
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
    def new_proxy_address(self, owner: str) -> str:
        """A fresh address, bound to ``owner``: a random part and a MAC of it and the owner under the server's
        secret, so that a submission naming it can be checked (:meth:`proxy_refusal`) with nothing stored, even
        while the proxy is not connected."""
        nonce = secrets.token_urlsafe(9)  # 12 characters
        return PROXY_PREFIX + nonce + self._proxy_mac(owner, nonce)

    def _proxy_mac(self, owner: str, nonce: str) -> str:
        digest = hmac.new(self._secret, f"proxy-owner\0{owner}\0{nonce}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode()[:16]

    def proxy_refusal(self, address: str, owner: str) -> str | None:
        """Why ``owner``'s works may not name server proxy ``address`` (None: they may). A connected proxy is its
        registrant's; a disconnected one, by the owner its address is bound to. An address of the older,
        unbound form that is not connected now is checked when the job connects."""
        connected = self.proxy_owner(address)
        if connected is not None:
            return None if connected == owner else f"server proxy {address} belongs to another user"
        token = address.removeprefix(PROXY_PREFIX)
        if len(token) == _BOUND_PROXY_LENGTH and not hmac.compare_digest(self._proxy_mac(owner, token[:12]),
                                                                          token[12:]):
            return f"server proxy {address} belongs to another user"
        return None

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
                msg = {"op": "open", "stream": s.sid, **offer}
                if isinstance(spare.ws, RawSide):  # the stream key goes with the offer, sealed with the ticket key
                    if s.key is None:
                        s.key = secrets.token_bytes(wire.KEY_SIZE)
                    spare.ws.offer(json.dumps({**msg, "key": wire.encode_key(s.key)}), s.key)
                else:
                    await spare.ws.send_text(json.dumps(msg))
            except Exception:  # gone meanwhile: try the next one
                spare.done.set()
                continue
            spare.used = True
            s.ended = spare.done  # the spare's handler returns when the stream ends
            return spare.ws
        return None

    # -- streams -----------------------------------------------------------------------------------------------------
    async def connect(self, ch: Channel, offer: dict[str, Any], work: str | None = None,
                      task: str | None = None, key: bytes | None = None) -> Stream:
        """Ask ``ch``'s peer to open a stream and wait until it joined (its WebSocket is ``stream.acceptor``):
        through a spare if it keeps one, else through the control channel."""
        if ch.streams + sum(1 for s in self.pending.values() if s.channel is ch) >= self.max_streams:
            raise Refused(503, f"too many streams through this {ch.kind} (at most {self.max_streams})")
        sid = secrets.token_urlsafe(18)
        loop = asyncio.get_running_loop()
        s = Stream(sid, ch, loop.create_future(), work=work, task=task, key=key)
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
        for side in (initiator, acceptor):
            if isinstance(side, RawSide):
                side.unhold()

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
            self._count(s)
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
                                if src.at_record_boundary:  # else the close would land inside a record
                                    dst._seal_close(code, why)
                            break
        finally:
            s.bytes_up += a.count
            s.bytes_down += b.count
            a.unlink()
            b.unlink()
            a.shut()
            b.shut()
            self.active.pop(s.sid, None)
            s.channel.streams -= 1
            self._count(s)
            s.ended.set()
        return code, reason

    def _count(self, s: Stream) -> None:
        self.streams_ended += 1
        self.bytes_up_ended += s.bytes_up
        self.bytes_down_ended += s.bytes_down

    # -- stream tickets (raw connections) ----------------------------------------------------------------------------
    def issue_tickets(self, ident: Identity, n: int) -> list[tuple[str, bytes]]:
        """``n`` one-time tickets that open raw connections as ``ident`` (asked for with its bearer token), each
        with its key (it seals the connection's hello; never sent on the raw port)."""
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
            self.used_tickets = {t: v for t, v in self.used_tickets.items() if v[0] > now - TICKET_TTL}
            self._reported = {t for t in self._reported if t in self.tickets or t in self.used_tickets}
        if len(self.tickets) + n > MAX_TICKETS:
            raise Refused(503, "too many stream tickets outstanding: use the WebSocket endpoints")
        if self._ticket_counts.get(ident.uid, 0) + n > MAX_USER_TICKETS:  # one user cannot use them all up
            raise Refused(429, f"too many stream tickets outstanding for {ident.login}: use them first")
        out = [(secrets.token_urlsafe(24), secrets.token_bytes(wire.KEY_SIZE)) for _ in range(n)]
        for t, key in out:
            self.tickets[t] = (now + TICKET_TTL, ident, key)
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
        self.used_tickets[ticket] = (hit[0], hit[1].uid)
        self._count_tickets(hit[1].uid, -1)
        if hit[0] < now:
            return "this stream ticket expired"
        return hit[1]

    def hello(self, ticket: str, header: bytes, body: bytes) -> Hello:
        """Open the sealed hello of a raw connection that presented ``ticket``: the ticket is spent only once its
        hello opened (someone who saw the ticket go by cannot spend it), and only once."""
        hit = self.tickets.get(ticket)
        if hit is None:
            used = self.used_tickets.get(ticket)
            if used is not None:
                return Hello(None, error="this stream ticket was already used", uid=self._report(ticket, used[1]))
            return Hello(None, error="unknown stream ticket")
        up_key, down_key = wire.ticket_keys(hit[2], ticket)
        up = wire.Opener(up_key)
        try:
            target = up.open(header, body, extra=ticket.encode()).decode()
        except (wire.WireError, UnicodeDecodeError):
            return Hello(None, error="the hello failed authentication (not sealed with this ticket's key)",
                         uid=self._report(ticket, hit[1].uid))
        got = self.redeem(ticket)
        if isinstance(got, str):
            return Hello(None, target, error=got, uid=hit[1].uid)
        return Hello(got, target, up=up, down=wire.Sealer(down_key))

    def _report(self, ticket: str, uid: str) -> str | None:
        """``uid`` if the refusal of a hello with ``ticket`` is to be an event (the first one: whoever replays or
        forges hellos by the thousand does not write as many events)."""
        if ticket in self._reported:
            return None
        self._reported.add(ticket)
        return uid

    async def serve_raw(self, sock: Any, dispatch: Callable[[RawSide, Hello], Awaitable[None]]) -> None:
        """Accept raw connections on ``sock`` (plain TCP: sealed records, see :mod:`xwhep.core.relaywire`)."""
        loop = asyncio.get_running_loop()
        self._raw_server = await loop.create_server(lambda: RawSide(self, dispatch), sock=sock)
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

_LINE, _MSG, _HOLD, _PIPE, _DEAD = range(5)  # RawSide.mode


@dataclass
class Hello:
    """What a raw connection's hello said: the ticket's identity and the endpoint it stands for, or why not
    (``uid``: the ticket's user, when known, for the event of a refused hello)."""

    ident: Identity | None
    target: str = ""
    error: str = ""
    uid: str | None = None
    up: wire.Opener | None = None  # the party's records to the server
    down: wire.Sealer | None = None  # the server's records to the party


def _message_frame(msg: dict[str, Any]) -> bytes:
    text = msg.get("text")
    if text is not None:
        return wire.frame(wire.TEXT, text.encode())
    return wire.frame(wire.BIN, msg.get("bytes") or b"")


def _close_of(plain: bytes) -> tuple[int, str]:
    """The close frame in the plaintext of a final record."""
    try:
        for kind, payload in wire.Framer().feed(plain):
            if kind == wire.CLOSE:
                return wire.parse_close(payload)
    except wire.WireError:
        pass
    return 1002, "a final record without a close"


class RawSide(asyncio.BufferedProtocol):
    """A raw connection (:mod:`xwhep.core.relaywire`) on the server, with the part of Starlette's WebSocket the
    relay endpoints use (``accept``, ``receive``, ``send``, ``send_text``, ``close``), so they serve both.

    Modes: the first line and the hello (``_LINE``); records under the ticket keys, opened as messages
    (``_MSG``); the stream's records held unopened once the party switched to the stream key (``_HOLD``: an
    initiator after ``open``, a spare after its offer) until the splice decides: passed on as they are to another
    raw connection (``_PIPE``: nothing decrypted), or opened as messages for a WebSocket peer (``_MSG`` again, with
    the stream key)."""

    def __init__(self, hub: Hub, dispatch: Callable[[RawSide, Hello], Awaitable[None]]) -> None:
        self.hub = hub
        self.dispatch = dispatch
        self.scope: dict[str, Any] = {"type": "xwrelay"}  # no denial-response extension: refusals are closes
        self.transport: asyncio.Transport | None = None
        self.mode = _LINE
        self.pending = bytearray()  # received, not processed yet (the hello, an incomplete record, held records)
        self.ticket = ""
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
        self.tx: wire.Sealer | None = None  # what the server seals towards this party (ticket key, then stream's)
        self.rx: wire.Opener | None = None  # what the server opens of this party's
        self.stream_key: bytes | None = None  # an initiator's stream key (drawn when it is accepted)
        self._tx_stream: bytes | None = None  # an initiator's keys of the stream: towards it, from it
        self._rx_stream: bytes | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._buf = bytearray(RAW_FIRST)
        self._view = memoryview(self._buf)
        # following the records passed on (_PIPE)
        self._hdr = b""  # header bytes of the next record so far
        self._left = 0  # bytes of the current record still to come
        self._final: bytearray | None = None  # the final record being passed on (its close is opened)
        self._final_hdr = b""
        self._final_n = 0

    # -- asyncio callbacks -------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=RAW_WRITE_HIGH)
        self._timer = asyncio.get_running_loop().call_later(RAW_HEADER_TIMEOUT, self._no_header)

    def _no_header(self) -> None:
        if self.mode == _LINE and self.transport is not None:
            self.transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._view[:nbytes])
        peer = self.peer
        if nbytes == len(self._buf) < RAW_READ:  # reads fill it: a bigger one
            self._buf = bytearray(min(4 * len(self._buf), RAW_READ))
            self._view = memoryview(self._buf)
        elif peer is not None and peer.transport is not None and peer.transport.get_write_buffer_size():
            self._buf = bytearray(len(self._buf))  # the peer's transport keeps a view of it until it is sent
            self._view = memoryview(self._buf)

    def data_received(self, data: bytes | memoryview) -> None:
        mode = self.mode
        if mode == _PIPE:  # the hot path: pass the records on, follow their headers
            peer = self.peer
            if peer is not None:
                peer.write(data)
                self.count += len(data)
                self._follow(data)
            return
        if mode == _DEAD:
            return
        self.pending += data
        if mode == _LINE:
            self._hello()
        elif mode == _MSG:
            self._records()
        if (len(self.pending) + self.inbox_bytes > RAW_INBOX and not self.reading_paused
                and self.transport is not None):
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def _hello(self) -> None:
        buf = self.pending
        if not self.ticket:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > wire.MAX_LINE and self.transport is not None:
                    self.transport.abort()
                return
            parts = bytes(buf[:end]).decode(errors="replace").split(" ")
            del buf[:end + 1]
            if len(parts) != 2 or parts[0] != wire.MAGIC.decode() or not parts[1]:
                self._refuse_clear(4400, "expected XWRELAY2 TICKET and a sealed hello")
                return
            self.ticket = parts[1]
        if len(buf) < wire.HEADER.size:
            return
        kind, length = wire.HEADER.unpack_from(buf, 0)
        if kind != wire.SEALED or not wire.TAG <= length <= wire.MAX_CONTROL + wire.TAG:
            self._refuse_clear(4400, "expected a sealed hello")
            return
        if len(buf) < wire.HEADER.size + length:
            return
        header, body = bytes(buf[:wire.HEADER.size]), bytes(buf[wire.HEADER.size:wire.HEADER.size + length])
        del buf[:wire.HEADER.size + length]
        if self._timer is not None:
            self._timer.cancel()
        hello = self.hub.hello(self.ticket, header, body)
        if hello.ident is not None:
            self.rx, self.tx = hello.up, hello.down
            self.mode = _MSG
        else:
            self.mode = _DEAD
            buf.clear()
        self._task = asyncio.ensure_future(self._run(hello))
        if buf and self.mode == _MSG:
            self._records()

    def _refuse_clear(self, code: int, reason: str) -> None:
        self.mode = _DEAD
        self.pending.clear()
        if self._timer is not None:
            self._timer.cancel()
        self.write(wire.clear_close(code, reason))
        self.shut()

    def _records(self) -> None:
        """Open the complete records received (``_MSG``), as messages for ``receive``."""
        buf = self.pending
        while self.mode == _MSG and len(buf) >= wire.HEADER.size:
            kind, length = wire.HEADER.unpack_from(buf, 0)
            end = wire.HEADER.size + length
            try:
                wire.check_header(kind, length)
                if kind == wire.CLEAR:
                    raise wire.WireError("a clear record after the hello")
                if len(buf) < end:
                    return
                assert self.rx is not None
                plain = self.rx.open(bytes(buf[:wire.HEADER.size]), buf[wire.HEADER.size:end])
                del buf[:end]
                frames = self.framer.feed(plain)
                if not self.framer.at_boundary:
                    raise wire.WireError("a record ends inside a frame")
            except wire.WireError as exc:
                self._broken(str(exc))
                return
            for kind, payload in frames:
                if kind == wire.CLOSE:
                    if self.closed is None:
                        self.closed = wire.parse_close(payload)
                elif self.closed is None:
                    if kind == wire.TEXT:
                        text = payload.decode(errors="replace")
                        self.inbox.append({"type": "websocket.receive", "text": text})
                        if text == "open" and self._rx_stream is not None and self.stream_key is not None:
                            # an initiator's last record under its ticket key: the stream's records follow
                            self.rx = wire.Opener(self._rx_stream)
                            self._rx_stream = None
                            self.mode = _HOLD
                    else:
                        self.inbox.append({"type": "websocket.receive", "bytes": payload})
                    self.inbox_bytes += len(payload)

    def _broken(self, why: str) -> None:
        """The party broke the format (or a record failed authentication): end the connection with why."""
        self.closed = (1002, why)
        if self.peer is None:
            self.mode = _DEAD
            self.pending.clear()
            self._seal_close(1002, why)
            self.shut()
        self._wake()

    def _follow(self, data: bytes | memoryview) -> None:
        """Follow the record headers of what was passed on (``_PIPE``): count the records (their nonces), see a
        final one (its close ends the stream)."""
        view = memoryview(data)
        n = len(view)
        i = 0
        while i < n:
            left = self._left
            if left:
                k = min(left, n - i)
                if self._final is not None:
                    self._final += view[i:i + k]
                i += k
                self._left = left - k
                if not self._left and self._final is not None:
                    self._end_final()
                continue
            take = wire.HEADER.size - len(self._hdr)
            self._hdr += bytes(view[i:i + take])
            i += take
            if len(self._hdr) < wire.HEADER.size:
                return
            header, self._hdr = self._hdr, b""
            kind, length = wire.HEADER.unpack(header)
            peer = self.peer
            try:
                wire.check_header(kind, length)
                if kind == wire.CLEAR:
                    raise wire.WireError("a clear record")
            except wire.WireError:
                if peer is not None and peer.transport is not None:
                    peer.transport.abort()  # what was passed on is garbage: cut the peer's connection
                if self.ended is not None and not self.ended.done():
                    self.ended.set_result((1002, "the other end broke the record format"))
                return
            assert peer is not None and peer.tx is not None
            nonce = peer.tx.n
            peer.tx.n = nonce + 1  # the nonce of this record, in the direction towards the peer
            self._left = length
            if kind == wire.FINAL and length <= wire.MAX_CONTROL:
                self._final, self._final_hdr, self._final_n = bytearray(), header, nonce
            if not length and self._final is not None:
                self._end_final()

    def _end_final(self) -> None:
        body, self._final = self._final, None
        peer = self.peer
        if body is None or peer is None or peer.tx is None:
            return
        try:
            got = _close_of(wire.unseal(peer.tx.aead, self._final_n, self._final_hdr, body))
        except wire.WireError:
            got = (1002, "a record failed authentication")
        if self.ended is not None and not self.ended.done():
            self.ended.set_result(got)

    @property
    def at_record_boundary(self) -> bool:
        return not self._left and not self._hdr

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
        if self.at_record_boundary:  # the other end learns it in a sealed close
            peer._seal_close(1011, "the other end was lost")
        elif peer.transport is not None:  # a close inside a record would be garbage: cut the connection
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
    async def _run(self, hello: Hello) -> None:
        try:
            await self.dispatch(self, hello)
        except Exception:
            log.exception("raw relay connection for %s failed", hello.target[:80])
            self._seal_close(1011, "relay failure")
        finally:
            if self.peer is None:
                self.shut()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.lost and not self.transport.is_closing():
            self.transport.write(data)

    def _seal(self, plain: bytes, final: bool = False) -> None:
        if self.tx is not None:
            self.write(self.tx.seal(plain, final))

    def _seal_close(self, code: int, reason: str) -> None:
        """A close record towards this party: sealed (the current key), or clear before the hello was opened."""
        if self.tx is not None:
            self._seal(wire.close_frame(code, reason), final=True)
        else:
            self.write(wire.clear_close(code, reason))

    def shut(self) -> None:
        """Close once what was written went out (or abort after CLOSE_WAIT: a stalled peer never takes it)."""
        if self.shut_down or self.transport is None:
            return
        self.shut_down = True
        self.transport.close()
        transport = self.transport
        asyncio.get_running_loop().call_later(CLOSE_WAIT, lambda: None if self.lost else transport.abort())

    async def accept(self) -> None:
        """Accept a spare (or any party that gets no stream key)."""
        self._seal(wire.frame(wire.TEXT, wire.ACCEPTED.encode()))

    def accept_initiator(self) -> None:
        """Accept an initiator: draw its stream's key and give it with ``accepted``. Its ``open`` will be its
        last record under the ticket key, the server's ``ok`` the last one towards it."""
        key = secrets.token_bytes(wire.KEY_SIZE)
        self.stream_key = key
        self._rx_stream, self._tx_stream = wire.stream_keys(key)  # initiator → acceptor, acceptor → initiator
        self._seal(wire.frame(wire.TEXT, f"{wire.ACCEPTED} {wire.encode_key(key)}".encode()))

    def enter_stream(self) -> None:
        """After the ``ok`` to an initiator: what the server writes to it from now on is the stream's."""
        if self._tx_stream is not None:
            self.tx = wire.Sealer(self._tx_stream)
            self._tx_stream = None

    def offer(self, text: str, key: bytes) -> None:
        """Hand a stream to this spare: the offer (with the stream key) under its ticket key, then the stream's
        records both ways."""
        if self.lost or self.shut_down or self.closed is not None or self.mode != _MSG:
            raise ConnectionError("the spare is gone")
        self._seal(wire.frame(wire.TEXT, text.encode()))
        i2a, a2i = wire.stream_keys(key)
        self.tx = wire.Sealer(i2a)
        self.rx = wire.Opener(a2i)
        self.mode = _HOLD

    def unhold(self) -> None:
        """Spliced with a WebSocket: open the stream's records here (they were held), as messages."""
        if self.mode == _HOLD:
            self.mode = _MSG
            self._records()
            if self.reading_paused and self.transport is not None and len(self.pending) < RAW_INBOX // 2:
                self.reading_paused = False
                self.transport.resume_reading()

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
        self._seal(_message_frame(msg))
        if self._paused:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    async def send_text(self, text: str) -> None:
        await self.send({"type": "websocket.send", "text": text})

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        if not self.shut_down:
            self._seal_close(code, reason or "")
            self.shut()

    def unlink(self) -> None:
        self.peer = None
        self.mode = _DEAD


def link(a: RawSide, b: RawSide, ended: asyncio.Future[tuple[int, str]]) -> None:
    """Join two raw connections: first the stream's records each one received before (held), then everything
    as it comes — passed on as they are, never opened (only a final record's close, for the reason)."""
    for src in (a, b):
        src.ended = ended
        src.inbox.clear()
        src.inbox_bytes = 0
    a.peer, b.peer = b, a
    for src, dst in ((a, b), (b, a)):
        if ended.done():
            break
        if src.closed is not None and src.closed[0] != 1006:  # it closed before the stream began: pass that on
            dst._seal_close(*src.closed)
            ended.set_result(src.closed)
            break
        held = bytes(src.pending)
        src.pending.clear()
        src.mode = _PIPE
        if held:
            dst.write(held)
            src.count += len(held)
            src._follow(held)
        if src.lost:
            src._lost_in_pipe()
    for src, dst in ((a, b), (b, a)):
        if src.reading_paused and src.transport is not None:
            src.reading_paused = False
            src.transport.resume_reading()
        if dst._paused and src.transport is not None:
            src.transport.pause_reading()


Side = WebSocket | RawSide
