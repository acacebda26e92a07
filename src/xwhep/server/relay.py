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
from typing import Any, Literal

from starlette.websockets import WebSocket

from xwhep.core.tunnels import PROXY_PREFIX

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
    ws: WebSocket
    taken: asyncio.Event = field(default_factory=asyncio.Event)  # claimed for a stream, or dropped
    done: asyncio.Event = field(default_factory=asyncio.Event)  # its handler may return
    used: bool = False  # a stream was handed to it


@dataclass(eq=False)
class Stream:
    """One relayed connection, from the moment the target is asked to its end."""

    sid: str
    channel: Channel
    acceptor: asyncio.Future[WebSocket]
    work: str | None = None
    task: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    bytes_up: int = 0  # initiator → acceptor
    bytes_down: int = 0


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


async def _close(ws: WebSocket, code: int, reason: str) -> None:
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

    async def _claim(self, ch: Channel, s: Stream, offer: dict[str, Any]) -> WebSocket | None:
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

    async def splice(self, s: Stream, initiator: WebSocket,
                     still_valid: Callable[[], str | None] | None = None) -> tuple[int, str]:
        """Relay messages both ways until one side closes (or ``still_valid`` returns a reason to stop);
        close the other side with the same code. Returns the code and reason the stream ended with."""
        acceptor = s.acceptor.result()

        async def pump(src: WebSocket, dst: WebSocket, up: bool) -> tuple[int, str]:
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
                "streams": len(streams), "spares": sum(len(q) for q in self.spares.values())}

    async def close(self) -> None:
        """Server shutdown: end every control channel and spare (their peers reconnect to the next server); write
        the events still waiting."""
        if self._flush is not None:
            with contextlib.suppress(Exception):
                await self._flush
        for ch in [*self.hosts.values(), *self.proxies.values()]:
            await _close(ch.ws, 1012, "server restarting")
        for queue in list(self.spares.values()):
            for spare in list(queue):
                self.drop_spare(spare)
                await _close(spare.ws, 1012, "server restarting")
