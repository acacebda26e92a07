"""Connection limits uvicorn does not set: the size of a request head, the time to send it, the TLS handshake.

uvicorn's httptools protocol buffers a request head without bound (a 200 MB header was accepted from an
unauthenticated client) and arms its only timer, keep-alive, after a response: a connection that opens and sends
half a head, or nothing, stays open for good. The TLS handshake is bounded by the event loop's
``ssl_handshake_timeout`` of ``create_server``, which uvicorn leaves at its default (60 s).

Both are enforced here, below the application: :func:`http_protocol` is the protocol class given to uvicorn,
:func:`loop_factory` the event loop the server runs on. Errors keep the API's JSON form.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("xwhep.server")


def _error(status: int, message: str) -> bytes:
    body = orjson.dumps({"error": message, "field": None})
    return (STATUS_LINE[status] + b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body) + body)


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head: at most ``max_head`` bytes (431 past that), complete
    within ``head_timeout`` seconds of the connection opening or of the head's first byte (408 and closed after).

    The size is counted per read while a head is incomplete and checked after the parser saw the read, so a head
    and body arriving in one read are never mistaken for a large head; the parser holds at most ``max_head`` plus
    one read of a head before the connection is refused."""

    max_head = 64 * 1024
    head_timeout = 20.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._in_head = True
        self._head_since = self.loop.time()
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head and not self.transport.is_closing():
            self._refuse(431, f"request head over {self.max_head} bytes")

    # One timer per connection, not one per request (the workers' hot calls come back to back on one
    # connection): a request only notes when its head began; the timer, when it fires, re-arms itself for what is
    # left of the current head's time, or lets go while no head is being read.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._head_since = self.loop.time()
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, msg)  # uvicorn's own answer to a malformed request is text/plain

    def _refuse(self, status: int, message: str) -> None:
        self._in_head = False
        self._stop_head_timer()
        self.transport.write(_error(status, message))
        self.transport.close()

    def _stop_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return  # no head being read: the next one arms the timer again
        left = self._head_since + self.head_timeout - self.loop.time()
        if left > 0 or (self.cycle is not None and not self.cycle.response_complete):
            # a head begun later than the timer was armed for; or a pipelined head waiting (reading paused)
            # while the previous request runs, which is not the client's delay
            self._head_timer = self.loop.call_later(max(left, 0.05) if left > 0 else self.head_timeout,
                                                    self._head_late)
            return
        self._refuse(408, f"request head not received within {self.head_timeout:g} s")


def http_protocol(max_head: int, head_timeout: float) -> type[BoundedHttpProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these bounds."""
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), {"max_head": max_head, "head_timeout": head_timeout})


def loop_factory(ssl_handshake_timeout: float) -> Callable[[], asyncio.AbstractEventLoop]:
    """An event loop factory (uvloop where installed) whose servers close a TLS connection whose handshake (or
    closing handshake) is not done within ``ssl_handshake_timeout`` seconds. uvicorn calls ``create_server``
    without these arguments; the loop supplies them."""
    try:
        import uvloop

        base: type[Any] = uvloop.Loop
    except ImportError:
        base = asyncio.SelectorEventLoop

    async def create_server(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", ssl_handshake_timeout)
            # a closing TLS connection reads (and drops) what the client still sends until it answers the close
            # or this time passes: a client refused with 431 may keep sending; it is cut off within the bound
            kwargs.setdefault("ssl_shutdown_timeout", ssl_handshake_timeout)
        return await base.create_server(self, *args, **kwargs)

    cls: Callable[[], asyncio.AbstractEventLoop] = type("BoundedLoop", (base,), {"create_server": create_server})
    return cls
