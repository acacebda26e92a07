"""Relay streams seen from a client or a worker: a WebSocket to the server, spliced with a local socket.

Used by ``xwproxy`` (:mod:`xwhep.client.proxy`) and by the worker's tunnels (:mod:`xwhep.worker.tunnel`). The
wire format is the relay's (:mod:`xwhep.server.relay`): binary messages carry the bytes, the text message
``eof`` says "no more data from this side" (TCP half-close), closing the WebSocket ends the stream (1000 when
both sides said eof; 4xxx with a reason on failure).

Both ends dial ahead to keep connection set-up off a new connection's path: an initiator keeps one connection
ready per destination (:class:`Ahead`) and sends ``open`` when a connection arrives; a target keeps spare
connections (:class:`Spares`) that the server hands new streams to.

Those connections dialed ahead are *raw* ones (:class:`RawStream`, :mod:`xwhep.core.relaywire`) when the server
has a reachable raw relay port: plain TCP with sealed records (AES-GCM, keys from the stream tickets fetched over
HTTPS and from the server's sealed answers), same messages, and :func:`splice` joins them with the local socket
transport to transport. Otherwise (no raw port, or not reachable from here) they are WebSockets (TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Union, cast
from urllib.parse import urlencode, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Close
from websockets.protocol import State

from xwhep import __version__
from xwhep.client.sdk import Client, XwError
from xwhep.core import relaywire as wire

CHUNK = 1024 * 1024 - 1024  # bytes per message: few per-message costs, just under the server's 1 MiB frame limit
EOF = "eof"
CLOSE_LOCAL_ERROR = 4001  # the local socket failed (reset, refused)
CLOSE_GOING_AWAY = 1001
CLOSE_REFUSED = 4502  # the target's local side refused (nothing listens on that port)
FRESH = 240.0  # seconds a WebSocket dialed ahead is used (the server drops idle ones after 300)
CLOSE_WAIT = 2.0  # seconds a close may take before the connection is aborted
# A used connection dialed ahead is replaced after this delay, not at once: its set-up (a TLS handshake for a
# WebSocket; a TCP connect and a sealed hello for a raw one) would otherwise compete with the first bytes of the
# stream that just used it.
REFILL_DELAY = 0.01
RAW_WRITE_HIGH = 1 << 20  # bytes queued towards one side before the other side stops being read
RAW_INBOX = 4 << 20  # bytes of a raw stream received before its splice began, before reading stops
RAW_RETRY = 60.0  # seconds the raw port is not tried again after it could not be reached
TICKET_BATCH = 4  # stream tickets fetched at once (each process dialing ahead holds a few unused)
RAW_READ = 256 * 1024  # bytes read at once from a raw connection or a spliced local socket
# Buffers start small and grow to RAW_READ once reads fill them: a new stream's path allocates (and the kernel
# zeroes) no quarter-MiB buffers; a bulk transfer gets big reads after its first few.
RAW_FIRST = 16 * 1024
RAW_CONNECT_TIMEOUT = 5.0  # seconds to reach the raw port (a firewall may drop what it does not allow)


class StreamError(Exception):
    """A stream could not be opened; ``status`` is the server's HTTP answer (None: the server was not reached)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def ws_base(server: str) -> str:
    """``https://h:p`` → ``wss://h:p/api/v1`` (``http`` → ``ws``)."""
    parts = urlsplit(server)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/api/v1"


def _denial_message(body: bytes | None, status: int) -> str:
    try:
        data = json.loads(body or b"")
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])
    except ValueError:
        pass
    return f"refused by the server (HTTP {status})"


class Dialer:
    """Opens relay WebSockets to one server with an SDK client's credentials (its bearer token, renewed the same
    way as for HTTP requests)."""

    def __init__(self, client: Client, ca: str | None = None) -> None:
        self.client = client
        self.base = ws_base(client.server)
        self.ssl: ssl.SSLContext | None = None
        if self.base.startswith("wss://"):
            self.ssl = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
        self.host = urlsplit(client.server).hostname or "127.0.0.1"
        self.tickets: list[tuple[float, str, bytes]] = []  # (expiry, ticket, its key) for raw connections
        self.raw_port: int | None = None
        self.raw_off_until = 0.0  # monotonic time before which the raw port is not tried
        self._ticket_lock: asyncio.Lock | None = None

    async def _ticket(self, force: bool = False) -> tuple[str, bytes] | None:
        """A stream ticket and its key (fetched a few at a time over HTTPS); None when the server has no raw
        port."""
        now = time.monotonic()
        self.tickets = [t for t in self.tickets if t[0] > now + 5]
        if self.tickets and not force:
            return self.tickets.pop()[1:]
        if self._ticket_lock is None:
            self._ticket_lock = asyncio.Lock()
        async with self._ticket_lock:
            if self.tickets and not force:
                return self.tickets.pop()[1:]

            def fetch() -> dict[str, Any]:
                r = self.client.http.post(self.client.base + "/relay/tickets", params={"n": TICKET_BATCH},
                                          headers=self.client._auth_header())
                if r.status_code == 404:  # an older server: WebSockets only
                    return {"port": None, "tickets": []}
                r.raise_for_status()
                return dict(r.json())

            try:
                got = await asyncio.to_thread(fetch)
            except Exception:
                self.raw_off_until = time.monotonic() + RAW_RETRY
                return None
            self.raw_port = got.get("port")
            if not self.raw_port:
                self.raw_off_until = time.monotonic() + RAW_RETRY
                return None
            expiry = time.monotonic() + float(got.get("ttl") or 60)
            try:
                self.tickets = [(expiry, str(t["id"]), wire.decode_key(str(t["key"]))) for t in got.get("tickets", [])]
            except (TypeError, KeyError, wire.WireError):  # an older server (tickets without keys): WebSockets
                self.tickets = []
                self.raw_off_until = time.monotonic() + RAW_RETRY
            return self.tickets.pop()[1:] if self.tickets else None

    async def open_raw(self, path: str, params: dict[str, str] | None = None) -> RawStream | None:
        """A raw connection to the server's raw relay port standing for the WebSocket endpoint ``path``; None
        when there is no usable raw port (the caller then opens a WebSocket); :class:`StreamError` when the
        server refused it."""
        if time.monotonic() < self.raw_off_until:
            return None
        target = "/api/v1" + path + (f"?{urlencode(params)}" if params else "")
        for attempt in (1, 2):
            ticket = await self._ticket(force=attempt == 2)
            if ticket is None or self.raw_port is None:
                return None
            loop = asyncio.get_running_loop()
            try:
                _, stream = await asyncio.wait_for(loop.create_connection(RawStream, self.host, self.raw_port),
                                                   RAW_CONNECT_TIMEOUT)
            except (OSError, TimeoutError):  # not reachable (a firewall, a proxy): WebSockets
                self.raw_off_until = time.monotonic() + RAW_RETRY
                return None
            stream.hello(ticket[0], ticket[1], target)
            try:
                first = await asyncio.wait_for(stream.recv(), 30)
            except TimeoutError:
                stream.abort()
                raise StreamError("the relay did not answer") from None
            except ConnectionClosed as exc:
                err = closed_error(exc)
                if err.status == 401 and attempt == 1:  # the ticket went stale: new ones, once
                    continue
                raise err from None
            if first != wire.ACCEPTED:
                stream.abort()
                raise StreamError(f"unexpected answer from the relay: {str(first)[:60]!r}")
            return stream
        return None

    async def open(self, path: str, params: dict[str, str] | None = None, open_timeout: float = 30.0,
                   ping_interval: float | None = 20.0, raw: bool = False) -> Conn:
        """A WebSocket to ``/api/v1{path}`` — or with ``raw``, a raw connection for it when the server has a
        reachable raw port; :class:`StreamError` with the server's reason when refused."""
        if raw:
            stream = await self.open_raw(path, params)
            if stream is not None:
                return stream
        url = self.base + path + (f"?{urlencode(params)}" if params else "")
        for attempt in (1, 2):
            # the token is renewed (a blocking HTTP login) only when it expired: keep that off the event loop
            try:
                headers = await asyncio.to_thread(self.client._auth_header)
            except XwError as exc:
                raise StreamError(exc.message, exc.status) from None
            try:
                kw: dict[str, Any] = {"ssl": self.ssl} if self.ssl is not None else {}
                return await connect(url, additional_headers=headers, compression=None, open_timeout=open_timeout,
                                     ping_interval=ping_interval, ping_timeout=20, close_timeout=5,
                                     max_size=1 << 20, max_queue=4, write_limit=CHUNK,
                                     user_agent_header=f"xwhep/{__version__}", **kw)
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status == 401 and attempt == 1:  # expired, or the server restarted with a new secret
                    try:
                        await asyncio.to_thread(self.client.login)
                    except XwError:
                        pass
                    else:
                        continue
                raise StreamError(_denial_message(bytes(exc.response.body or b""), status), status) from None
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
                raise StreamError(f"cannot reach {self.client.server}: {exc or type(exc).__name__}") from None
        raise StreamError("unauthorized")  # not reached: the second attempt returns or raises


def closed_error(exc: ConnectionClosed) -> StreamError:
    """The relay's refusal carried by a close frame (code 4000 + HTTP status, and the reason)."""
    rcvd = exc.rcvd
    if rcvd is None:
        return StreamError("the server closed the connection")
    status = rcvd.code - 4000 if 4000 <= rcvd.code < 5000 else None
    return StreamError(rcvd.reason or f"the stream was closed (code {rcvd.code})", status)


async def request(ws: Conn) -> None:
    """Ask for the stream on an initiator WebSocket; returns once the target joined, else :class:`StreamError`."""
    try:
        await ws.send("open")
        answer = await ws.recv()
    except ConnectionClosed as exc:
        raise closed_error(exc) from None
    if answer != "ok":
        await ws.close(1002, "unexpected answer")
        raise StreamError(f"unexpected answer from the relay: {str(answer)[:60]!r}")


class Ahead:
    """Initiator WebSockets to one destination dialed ahead (``n`` kept ready), so a new connection only sends
    ``open``. An idle one is closed by the server after a few minutes; a new one is dialed then."""

    def __init__(self, dialer: Dialer, path: str, params: dict[str, str] | None = None, n: int = 2) -> None:
        self.dialer, self.path, self.params, self.n = dialer, path, params, n
        self.ready: list[Conn] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watches: set[asyncio.Task[None]] = set()
        self._dialed: dict[Conn, float] = {}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        delay = 0.2
        while True:
            self.ready = [ws for ws in self.ready if ws.state is State.OPEN]
            if len(self.ready) < self.n:
                await asyncio.sleep(REFILL_DELAY)
                try:
                    ws = await self.dialer.open(self.path, self.params, raw=True)
                except StreamError:  # the next connection dials itself and reports the error
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                delay = 0.2
                self.ready.append(ws)
                self._dialed[ws] = asyncio.get_running_loop().time()
                watch = asyncio.create_task(self._watch(ws))
                self._watches.add(watch)
                watch.add_done_callback(self._watches.discard)
                continue
            self._wake.clear()
            await self._wake.wait()

    async def _watch(self, ws: Conn) -> None:
        await ws.wait_closed()
        self._wake.set()

    async def stream(self, wait: bool = True) -> Conn:
        """A WebSocket with its stream asked for: set up (:func:`request` done; :class:`StreamError` if refused),
        or with ``wait=False`` only asked, so the caller's first bytes travel at once behind the ``open`` (a
        refusal then ends the stream: :func:`splice` returns it)."""
        ws = None
        now = asyncio.get_running_loop().time()
        while self.ready:
            candidate = self.ready.pop(0)
            if candidate.state is State.OPEN and now - self._dialed.pop(candidate, now) < FRESH:
                ws = candidate
                break
            closing = asyncio.ensure_future(candidate.close())  # about to idle out on the server: not worth it
            self._watches.add(closing)
            closing.add_done_callback(self._watches.discard)
        self._wake.set()
        if ws is None:
            ws = await self.dialer.open(self.path, self.params, raw=True)
        if wait:
            await request(ws)
        else:
            try:
                await ws.send("open")
            except ConnectionClosed as exc:
                raise closed_error(exc) from None
        return ws

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for ws in self.ready:
            await close_ws(ws)


Handler = Callable[["Conn", dict[str, Any]], Coroutine[Any, Any, None]]


class Spares:
    """``n`` spare WebSockets kept dialed to ``path`` for a target; each stream the server hands to one (``{"op":
    "open", …}``, the stream's data follows) is served by ``handle(ws, message)``, which splices, or closes the
    spare with 4000 + status and a reason. A used or lost spare is replaced shortly after."""

    def __init__(self, dialer: Dialer, path: str, handle: Handler, params: dict[str, str] | None = None,
                 n: int = 2) -> None:
        self.dialer, self.path, self.handle, self.params, self.n = dialer, path, handle, params, n
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self._loops:
            self._loops = [asyncio.create_task(self._keep()) for _ in range(self.n)]

    async def _keep(self) -> None:
        delay = 0.2
        while True:
            try:
                ws = await self.dialer.open(self.path, self.params, raw=True)
            except StreamError:  # the control channel still works meanwhile (slower: one more handshake)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 30.0)
                continue
            try:
                first = await ws.recv()
                msg = json.loads(first)
            except asyncio.CancelledError:  # not needed any more: say so, or the server would hand it a stream
                await close_ws(ws, 1001, "not needed any more")
                raise
            except (ConnectionClosed, ValueError):
                await ws.close()
                await asyncio.sleep(0.05 if ws.close_code == 4408 else delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 30.0)
                continue
            delay = 0.2
            if isinstance(msg, dict) and msg.get("op") == "open":
                t = asyncio.create_task(self.handle(ws, msg))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
                await asyncio.sleep(REFILL_DELAY)
            else:
                await ws.close(1002, "unexpected message")

    async def close(self) -> None:
        for t in [*self._loops, *self._tasks]:
            t.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        self._loops = []


class _LocalRefused(Exception):
    pass


async def _up(ws: ClientConnection, sock: socket.socket, verdict: str | None) -> None:
    loop = asyncio.get_running_loop()
    if verdict is not None:  # the local side says first whether it could connect
        first = await loop.sock_recv(sock, 1)
        if first != b"K":
            raise _LocalRefused(verdict)
    # One buffer, reused: websockets copies it into the frame before send() returns.
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    eof = False
    while not eof:
        n = await loop.sock_recv_into(sock, buf)
        if not n:
            break
        # Take whatever else is already there: bigger messages, fewer per-message costs on every hop.
        while n < CHUNK:
            try:
                k = sock.recv_into(view[n:], CHUNK - n, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            if not k:
                eof = True
                break
            n += k
        await ws.send(view[:n])
    await ws.send(EOF)


async def _down(ws: ClientConnection, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while True:
        msg = await ws.recv()
        if isinstance(msg, str):
            if msg == EOF:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                return
            continue
        await loop.sock_sendall(sock, msg)


def _abort(sock: socket.socket) -> None:
    """Close with a reset (the application sees the stream fail, not end)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def local_socket(sock: socket.socket) -> socket.socket:
    """Prepare an accepted or connected local socket for :func:`splice` (non-blocking; no Nagle delay)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def close_ws(ws: Conn, code: int = 1000, reason: str = "") -> None:
    """Close, but never wait long: a peer that stopped reading (a stalled stream) would block the close frame
    behind the data queued before it; then the connection is aborted."""
    try:
        await asyncio.wait_for(ws.close(code, reason), CLOSE_WAIT)
    except (TimeoutError, OSError, ConnectionClosed):
        with contextlib.suppress(Exception):
            ws.transport.abort()


async def splice(ws: Conn, sock: socket.socket, verdict: str | None = None) -> StreamError | None:
    """Relay between the WebSocket and the local socket until both directions ended, then close both.

    A failure on one side is passed to the other: the local socket is reset when the stream ends abnormally; the
    WebSocket is closed with 4001 when the local socket fails. Cancelling ends the stream at once (1001). With
    ``verdict``, the local side's first byte is ``K`` (connected; not relayed) or anything else (the stream is
    closed with 4502 and the text ``verdict``). Returns None after a clean end, else what went wrong. The socket
    is closed in the end (by this function: it owns it from now on)."""
    if isinstance(ws, RawStream):
        return await ws.splice(sock, verdict)
    up = asyncio.create_task(_up(ws, sock, verdict))
    down = asyncio.create_task(_down(ws, sock))
    reset = True
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t.exception() for t in done if t.exception() is not None]
        if not failed:  # both sides said eof: a clean end
            reset = False
            await close_ws(ws)
            return None
        err = failed[0]
        if isinstance(err, ConnectionClosed):  # the other end (or the relay) ended the stream
            rcvd = err.rcvd
            if rcvd is not None and rcvd.code == 1000:
                reset = False
                return None
            return closed_error(err)
        if isinstance(err, _LocalRefused):
            await close_ws(ws, CLOSE_REFUSED, str(err)[:120])
            return StreamError(str(err), 502)
        # the local socket failed
        await close_ws(ws, CLOSE_LOCAL_ERROR, f"{type(err).__name__}: {err}"[:120])
        return StreamError(f"local connection failed: {err}")
    except asyncio.CancelledError:
        await close_ws(ws, CLOSE_GOING_AWAY, "the stream was ended")
        raise
    finally:
        for t in (up, down):  # first: their pending socket operations must go before the socket does
            t.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        if reset:
            _abort(sock)
        else:
            sock.close()


async def refuse_local(ws: Conn, reason: str) -> None:
    """End a stream whose local side could not be reached."""
    await close_ws(ws, CLOSE_LOCAL_ERROR, reason[:120])


# -- raw connections (the fast data path: xwhep.core.relaywire) ------------------------------------------------------

CLOSE_BROKEN = 1002  # a record failed authentication (or broke the format): the stream is aborted
LOST = "the relay connection was lost (no sealed end of stream)"


class RawStream(asyncio.BufferedProtocol):
    """A raw relay connection (sealed records, :mod:`xwhep.core.relaywire`), with the part of a websockets
    ``ClientConnection`` the relay code uses (``send``, ``recv``, ``close``, ``state``, ``close_code``…);
    :meth:`splice` joins it with a local socket transport to transport, without a Python object per message.

    Records are read whole into one buffer (a read asks for the rest of the current record and the next header)
    and opened into another, whose data frames go to the local socket as they are. A record that fails
    authentication, a clear record after a sealed one, or a broken format ends the stream (close code 1002 and
    why); a TCP close without a sealed close is reported as lost (1006), never as a clean end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.framer = wire.Framer()
        self.inbox: deque[str | bytes] = deque()
        self.inbox_bytes = 0
        self.rcvd: Close | None = None
        self.sent: Close | None = None
        self.lost = False
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self.local: _Local | None = None
        self.tx: wire.Sealer | None = None  # what this side seals (ticket key, then the stream's)
        self.rx: wire.Opener | None = None
        self.sealed_seen = False  # a sealed record came: clear records are not believed any more
        self._tx_next: wire.Sealer | None = None  # an initiator's stream keys, taken after "open" / "ok"
        self._rx_next: wire.Opener | None = None
        self._spare = False  # accepted without a key: a spare, the stream key comes with the offer
        self._inbox_full = False  # reading paused: too much received before a splice or a recv took it
        self._rbuf = bytearray(RAW_FIRST)  # records as received
        self._rview = memoryview(self._rbuf)
        self._start = 0  # the current record's first byte in _rbuf
        self._fill = 0  # bytes in _rbuf
        self._pbuf = bytearray(RAW_FIRST)  # an opened record
        self._pview = memoryview(self._pbuf)

    # -- websockets-like ---------------------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return State.OPEN if not self.lost and self.rcvd is None and self.sent is None else State.CLOSED

    @property
    def close_code(self) -> int | None:
        c = self.rcvd or self.sent
        return c.code if c else (1006 if self.lost else None)

    @property
    def close_reason(self) -> str | None:
        c = self.rcvd or self.sent
        return c.reason if c else None

    def _closed(self) -> ConnectionClosed:
        return ConnectionClosed(self.rcvd, self.sent)

    def hello(self, ticket: str, key: bytes, target: str) -> None:
        """Present ``ticket`` for the endpoint ``target``: the first line and the hello sealed with its key."""
        first, self.tx, self.rx = wire.hello(ticket, key, target)
        self.transport.write(first)

    def _write(self, plain: bytes, final: bool = False) -> None:
        assert self.tx is not None
        self.transport.write(self.tx.seal(plain, final))

    async def send(self, message: str | bytes | bytearray | memoryview) -> None:
        if self.state is not State.OPEN:
            raise self._closed()
        if isinstance(message, str):
            self._write(wire.frame(wire.TEXT, message.encode()))
            if message == "open" and self._tx_next is not None:  # the last record under the ticket key
                self.tx, self._tx_next = self._tx_next, None
        else:
            view = memoryview(message)
            for i in range(0, max(len(view), 1), wire.MAX_FRAME):
                self._write(wire.frame(wire.BIN, view[i:i + wire.MAX_FRAME]))
        if self._paused:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    async def recv(self) -> str | bytes:
        while not self.inbox:
            if self.rcvd is not None or self.lost:
                raise self._closed()
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        msg = self.inbox.popleft()
        self.inbox_bytes -= len(msg)
        if self._inbox_full and self.inbox_bytes < RAW_INBOX // 2 and self.local is None and not self.lost:
            self._inbox_full = False
            self.transport.resume_reading()
        return msg

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.sent is None and not self.lost:
            self.sent = Close(code, reason)
            if self.rcvd is None and self.tx is not None:
                self._write(wire.close_frame(code, reason), final=True)
            self.transport.close()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._lost)

    def abort(self) -> None:
        self.transport.abort()

    # -- asyncio callbacks -------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=RAW_WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        start, fill = self._start, self._fill
        have = fill - start
        size = len(self._rbuf)
        if have >= wire.HEADER.size:  # the rest of this record and the next header
            length = min(wire.HEADER.unpack_from(self._rbuf, start)[1], wire.MAX_RECORD)
            want = 2 * wire.HEADER.size + length - have
        else:  # whatever room there is
            if start and size - fill < 2 * wire.HEADER.size:
                self._rbuf[:have] = self._rbuf[start:fill]
                self._start, self._fill = start, fill = 0, have
            want = size - fill
        if fill + want > size:
            if start:  # move the incomplete record to the front
                self._rbuf[:have] = self._rbuf[start:fill]
                self._start, self._fill = start, fill = 0, have
            if fill + want > size:  # a bigger record than so far
                buf = bytearray(fill + want)
                buf[:fill] = self._rbuf[:fill]
                self._rbuf, self._rview = buf, memoryview(buf)
        return self._rview[fill:fill + want]

    def buffer_updated(self, nbytes: int) -> None:
        fill = self._fill + nbytes
        self._fill = fill
        start = self._start
        buf, view = self._rbuf, self._rview
        size = wire.HEADER.size
        while fill - start >= size:
            kind, length = wire.HEADER.unpack_from(buf, start)
            end = start + size + length
            try:
                wire.check_header(kind, length)
            except wire.WireError as exc:
                self._fail(f"the relay broke the record format: {exc}")
                return
            if end > fill:
                break
            self._record(kind, view[start:start + size], view[start + size:end])
            if self.lost or (self.rcvd is not None and self.rcvd.code == CLOSE_BROKEN):
                return
            start = end
        if start == fill:
            start = self._fill = 0
        self._start = start

    def _record(self, kind: bytes, header: memoryview, body: memoryview) -> None:
        if kind == wire.CLEAR:  # a refusal before any key: believed only before the first sealed record
            if self.sealed_seen:
                self._fail("a clear record from the relay after sealed ones (tampered with?)")
            elif self.rcvd is None:
                self._got_close(Close(*wire.parse_close(bytes(body))))
            return
        rx = self.rx
        if rx is None:
            self._fail("a sealed record before the hello")
            return
        size = len(body) - wire.TAG
        if size > len(self._pbuf):
            self._pbuf = bytearray(size)
            self._pview = memoryview(self._pbuf)
        try:
            n = rx.open_into(header, body, self._pview)
        except wire.WireError:
            self._fail("a relay record failed authentication (tampered with, replayed or reflected?)")
            return
        self.sealed_seen = True
        if self.rcvd is not None:
            return
        local = self.local
        try:
            frames = self.framer.feed(self._pview[:n])
            if not self.framer.at_boundary:
                raise wire.WireError("a record ends inside a frame")
        except wire.WireError as exc:
            self._fail(f"the relay broke the frame format: {exc}")
            return
        for fkind, payload in frames:
            if fkind == wire.CLOSE:
                if self.rcvd is None:
                    self._got_close(Close(*wire.parse_close(payload)))
            elif self.rcvd is not None:
                pass
            elif fkind == wire.TEXT:
                text = self._text(payload.decode(errors="replace"))
                if local is None:
                    if text is not None:
                        self.inbox.append(text)
                        self.inbox_bytes += len(text)
                elif text == EOF:
                    local.relay_eof()
            elif local is not None:
                pass  # (data frames went to the local socket as the framer found them)
            else:
                self.inbox.append(payload)
                self.inbox_bytes += len(payload)
        if local is not None:
            if local.transport.get_write_buffer_size():  # it keeps views of _pbuf until they are sent
                self._pbuf = bytearray(len(self._pbuf))
                self._pview = memoryview(self._pbuf)
        elif self.inbox_bytes > RAW_INBOX and not self._inbox_full:
            self._inbox_full = True
            self.transport.pause_reading()
        self._wake()

    def _text(self, text: str) -> str | None:
        """A control message: the key changes happen here, between two records (even with a splice going on:
        ``xwproxy`` splices before the ``ok``). The message to pass on, None on failure."""
        if text.startswith(wire.ACCEPTED):
            given = text[len(wire.ACCEPTED) + 1:]
            if given:  # an initiator: its stream's key, used after its "open" (sending) and the "ok" (receiving)
                try:
                    i2a, a2i = wire.stream_keys(wire.decode_key(given))
                except wire.WireError:
                    self._fail("a malformed stream key")
                    return None
                self._tx_next, self._rx_next = wire.Sealer(i2a), wire.Opener(a2i)
            else:
                self._spare = True
            text = wire.ACCEPTED
        elif text == "ok" and self._rx_next is not None:
            self.rx, self._rx_next = self._rx_next, None
        elif self._spare and text.startswith("{"):
            try:
                msg = json.loads(text)
                key = wire.decode_key(str(msg.pop("key")))
            except (ValueError, KeyError, TypeError, AttributeError, wire.WireError):
                self._fail("an offer without a stream key")
                return None
            i2a, a2i = wire.stream_keys(key)
            self.rx, self.tx = wire.Opener(i2a), wire.Sealer(a2i)
            self._spare = False
            text = json.dumps(msg)
        return text

    def _got_close(self, close: Close) -> None:
        self.rcvd = close
        if self.local is not None:
            self.local.relay_closed()
        self._wake()

    def _fail(self, why: str) -> None:
        """End the stream at once: the relay connection cannot be trusted any more."""
        if self.rcvd is None or self.rcvd.code != CLOSE_BROKEN:
            self.rcvd = Close(CLOSE_BROKEN, why[:120])
        if self.local is not None:
            self.local.relay_closed()
        self._wake()
        self.transport.abort()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.rcvd is None and self.sent is None:
            self.rcvd = Close(1006, LOST)
        if not self._lost.done():
            self._lost.set_result(None)
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self.local is not None:
            self.local.relay_closed()

    def pause_writing(self) -> None:
        self._paused = True
        if self.local is not None and self.local.transport is not None:
            self.local.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self.local is not None and self.local.transport is not None:
            self.local.transport.resume_reading()

    # -- splice ------------------------------------------------------------------------------------------------------
    async def splice(self, sock: socket.socket, verdict: str | None = None) -> StreamError | None:
        """:func:`splice` for a raw connection."""
        loop = asyncio.get_running_loop()
        local = _Local(self, verdict, loop.create_future())
        try:
            await loop.connect_accepted_socket(lambda: local, sock)
        except OSError as exc:
            sock.close()
            await close_ws(self, CLOSE_LOCAL_ERROR, f"{type(exc).__name__}: {exc}"[:120])
            return StreamError(f"local connection failed: {exc}")
        try:
            kind, detail = await local.done
        except asyncio.CancelledError:
            self.local = None
            local.reset()
            await close_ws(self, CLOSE_GOING_AWAY, "the stream was ended")
            raise
        self.local = None
        c = self.rcvd
        if kind == "clean" or (kind == "closed" and c is not None and c.code == 1000):
            local.transport.close()
            await close_ws(self)
            return None
        local.reset()
        if kind == "closed":
            if c is None:
                return StreamError(LOST)
            return StreamError(c.reason or f"the stream was closed (code {c.code})",
                               c.code - 4000 if 4000 <= c.code < 5000 else None)
        if kind == "refused":
            await close_ws(self, CLOSE_REFUSED, detail[:120])
            return StreamError(detail, 502)
        await close_ws(self, CLOSE_LOCAL_ERROR, detail[:120])
        return StreamError(f"local connection failed: {detail}")


class _Local(asyncio.BufferedProtocol):
    """The local side of a raw splice: each read sealed into one record up to the relay, the relay's data
    frames down as they are opened.

    A read lands behind room for its frame header, and is sealed from there into a record buffer (header, frame,
    tag) written at once. The record buffer is replaced when the relay's transport keeps a view of it (it
    could not send it all at once)."""

    def __init__(self, relay: RawStream, verdict: str | None, done: asyncio.Future[tuple[str, str]]) -> None:
        self.relay = relay
        self.verdict = verdict
        self.done = done
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.up_eof = False
        self.down_eof = False
        self._size = RAW_FIRST  # bytes of a read (grows to RAW_READ)
        self._new_buffers()

    def _new_buffers(self) -> None:
        self._pbuf = bytearray(wire.HEADER.size + self._size)
        self._pview = memoryview(self._pbuf)
        self._payload = self._pview[wire.HEADER.size:]
        self._new_out()

    def _new_out(self) -> None:
        self._out = bytearray(2 * wire.HEADER.size + self._size + wire.TAG)
        self._oview = memoryview(self._out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._payload

    def buffer_updated(self, nbytes: int) -> None:
        relay = self.relay
        if self.verdict is not None or relay.state is not State.OPEN or relay.tx is None:
            self.data_received(self._payload[:nbytes])
            return
        wire.HEADER.pack_into(self._pbuf, 0, wire.BIN, nbytes)
        k = relay.tx.seal_into(self._oview, self._pview[:wire.HEADER.size + nbytes])
        target = relay.transport
        target.write(self._oview[:k])
        if nbytes == self._size < RAW_READ:  # reads fill the buffer: bigger ones
            self._size = min(4 * self._size, RAW_READ)
            self._new_buffers()
        elif target.get_write_buffer_size():
            self._new_out()  # the transport keeps a view of the record until it is sent

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=RAW_WRITE_HIGH)
        relay = self.relay
        relay.local = self
        while relay.inbox:  # what came before the splice began (whole messages: records end on frames)
            msg = relay.inbox.popleft()
            if isinstance(msg, bytes):
                transport.write(msg)
            elif msg == "eof":
                self.relay_eof()
        relay.framer.on_data = transport.write
        relay.inbox_bytes = 0
        relay._inbox_full = False
        relay.transport.resume_reading()
        if relay._paused:
            transport.pause_reading()
        if relay.rcvd is not None or relay.lost:
            self.relay_closed()

    def _end(self, kind: str, detail: str = "") -> None:
        if not self.done.done():
            self.done.set_result((kind, detail))

    def data_received(self, data: memoryview) -> None:
        if self.verdict is not None:  # the local side says first whether it could connect
            if bytes(data[:1]) != b"K":
                self._end("refused", self.verdict)
                return
            self.verdict = None
            data = data[1:]
            if not data:
                return
        relay = self.relay
        if relay.state is State.OPEN and relay.tx is not None:
            relay._write(wire.frame(wire.BIN, data))

    def eof_received(self) -> bool:
        if self.verdict is not None:
            self._end("refused", self.verdict)
            return True
        self.up_eof = True
        relay = self.relay
        if relay.state is State.OPEN and relay.tx is not None:
            relay._write(wire.frame(wire.TEXT, b"eof"))
        if self.down_eof:
            self._end("clean")
        return True  # half-close: keep writing what the relay sends

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._end("local", f"{type(exc).__name__}: {exc}")
        elif not (self.up_eof and self.down_eof):
            self._end("local", "the local connection closed")

    def pause_writing(self) -> None:
        self.relay.transport.pause_reading()

    def resume_writing(self) -> None:
        self.relay.transport.resume_reading()

    def relay_eof(self) -> None:
        self.down_eof = True
        with contextlib.suppress(OSError, RuntimeError):
            self.transport.write_eof()
        if self.up_eof:
            self._end("clean")

    def relay_closed(self) -> None:
        self._end("closed")

    def reset(self) -> None:
        """Close with a reset (the application sees the stream fail, not end)."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


Conn = Union[ClientConnection, RawStream]  # noqa: UP007  # a runtime alias, used in annotations
