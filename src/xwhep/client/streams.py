"""Relay streams seen from a client or a worker: a WebSocket to the server, spliced with a local socket.

Used by ``xwproxy`` (:mod:`xwhep.client.proxy`) and by the worker's tunnels (:mod:`xwhep.worker.tunnel`). The
wire format is the relay's (:mod:`xwhep.server.relay`): binary messages carry the bytes, the text message
``eof`` says "no more data from this side" (TCP half-close), closing the WebSocket ends the stream (1000 when
both sides said eof; 4xxx with a reason on failure).

Both ends dial ahead to keep TLS handshakes off a new connection's path: an initiator keeps one WebSocket ready
per destination (:class:`Ahead`) and sends ``open`` when a connection arrives; a target keeps spare WebSockets
(:class:`Spares`) that the server hands new streams to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlencode, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.protocol import State

from xwhep import __version__
from xwhep.client.sdk import Client, XwError

CHUNK = 1024 * 1024 - 1024  # bytes per message: few per-message costs, just under the server's 1 MiB frame limit
EOF = "eof"
CLOSE_LOCAL_ERROR = 4001  # the local socket failed (reset, refused)
CLOSE_GOING_AWAY = 1001
CLOSE_REFUSED = 4502  # the target's local side refused (nothing listens on that port)
FRESH = 240.0  # seconds a WebSocket dialed ahead is used (the server drops idle ones after 300)
CLOSE_WAIT = 2.0  # seconds a close may take before the connection is aborted
# A used WebSocket dialed ahead is replaced after this delay, not at once: its TLS handshake costs milliseconds of
# CPU on both ends, which would otherwise compete with the first bytes of the stream that just used it.
REFILL_DELAY = 0.01


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

    async def open(self, path: str, params: dict[str, str] | None = None, open_timeout: float = 30.0,
                   ping_interval: float | None = 20.0) -> ClientConnection:
        """A WebSocket to ``/api/v1{path}``; :class:`StreamError` with the server's reason when refused."""
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


async def request(ws: ClientConnection) -> None:
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
        self.ready: list[ClientConnection] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watches: set[asyncio.Task[None]] = set()
        self._dialed: dict[ClientConnection, float] = {}

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
                    ws = await self.dialer.open(self.path, self.params)
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

    async def _watch(self, ws: ClientConnection) -> None:
        await ws.wait_closed()
        self._wake.set()

    async def stream(self, wait: bool = True) -> ClientConnection:
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
            ws = await self.dialer.open(self.path, self.params)
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


Handler = Callable[[ClientConnection, dict[str, Any]], Coroutine[Any, Any, None]]


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
                ws = await self.dialer.open(self.path, self.params)
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


async def close_ws(ws: ClientConnection, code: int = 1000, reason: str = "") -> None:
    """Close, but never wait long: a peer that stopped reading (a stalled stream) would block the close frame
    behind the data queued before it; then the connection is aborted."""
    try:
        await asyncio.wait_for(ws.close(code, reason), CLOSE_WAIT)
    except (TimeoutError, OSError, ConnectionClosed):
        with contextlib.suppress(Exception):
            ws.transport.abort()


async def splice(ws: ClientConnection, sock: socket.socket, verdict: str | None = None) -> StreamError | None:
    """Relay between the WebSocket and the local socket until both directions ended, then close both.

    A failure on one side is passed to the other: the local socket is reset when the stream ends abnormally; the
    WebSocket is closed with 4001 when the local socket fails. Cancelling ends the stream at once (1001). With
    ``verdict``, the local side's first byte is ``K`` (connected; not relayed) or anything else (the stream is
    closed with 4502 and the text ``verdict``). Returns None after a clean end, else what went wrong. The socket
    is closed in the end (by this function: it owns it from now on)."""
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


async def refuse_local(ws: ClientConnection, reason: str) -> None:
    """End a stream whose local side could not be reached."""
    await close_ws(ws, CLOSE_LOCAL_ERROR, reason[:120])
