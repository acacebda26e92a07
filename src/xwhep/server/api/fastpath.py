"""The workers' hot calls (``/hosts/{uid}/sync`` and ``/hosts/{uid}/alive``) served below FastAPI.

Route matching, dependency solving and the middleware stack cost more server time than the database work of
a sync call (measured: about a third of the throughput benchmark). The same two calls are still declared as
FastAPI routes (the OpenAPI schema, and any request this layer passes on); both paths run the same functions
of :mod:`xwhep.server.api.worker`, the same validation models, the same authentication and the same error
bodies. Everything else goes to the application untouched.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xwhep.server.api import worker
from xwhep.server.api.deps import authenticate, json_bytes
from xwhep.server.api.models import AliveIn, SyncIn, json_errors, validation_error
from xwhep.server.auth import Identity
from xwhep.server.errors import ApiError, storage_full, storage_full_error
from xwhep.server.logs import ACCESS, access_line
from xwhep.server.services.common import event
from xwhep.server.state import ServerState

log = logging.getLogger("xwhep.server")

Handler = Callable[[ServerState, Identity, str, Any], Awaitable[dict[str, Any]]]
_ROUTES: dict[str, tuple[type[BaseModel], Handler]] = {
    "sync": (SyncIn, worker.sync_reply),
    "alive": (AliveIn, worker.alive_reply),
}
_PATH = re.compile(r"^/api/v1/hosts/([^/]+)/(sync|alive)$")
_TEMPLATES = {call: f"POST /api/v1/hosts/{{uid}}/{call}" for call in _ROUTES}  # the routes in the metrics
_JSON = [(b"content-type", b"application/json")]


class FastPath:
    """ASGI wrapper: serves the hot worker calls itself, hands everything else to ``app``."""

    def __init__(self, app: ASGIApp, st: ServerState) -> None:
        self.app = app
        self.st = st

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            m = _PATH.match(scope["path"])
            if m is not None:
                t0 = time.perf_counter()
                done = await self._serve(scope, receive, send, m.group(1), m.group(2))
                if done is not None:  # accounted here: the access log middleware never sees these calls
                    seconds = time.perf_counter() - t0
                    self.st.metrics.request(_TEMPLATES[m.group(2)], done[0], seconds)
                    if ACCESS.isEnabledFor(logging.DEBUG):  # one line per call only when asked for
                        access_line(logging.DEBUG, scope, done[0], seconds, done[1].login if done[1] else None)
                return
        await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, uid: str, call: str
                     ) -> tuple[int, Identity | None] | None:
        """Answer the call; its status and caller (None when the full stack answered it)."""
        st = self.st
        ident: Identity | None = None
        try:
            auth = ""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    auth = value.decode("latin-1")
                elif name == b"x-xw-on-behalf-of":  # a mandated call: the full stack decides who is calling
                    await self.app(scope, receive, send)
                    return None
            ident = await authenticate(st, auth)  # before reading the body: strangers get nothing buffered
            body = await _body(receive, st.config.max_json_body)
            model, handler = _ROUTES[call]
            try:
                parsed = model.model_validate_json(body)
            except ValidationError as exc:
                await _reply(send, 400, validation_error(json_errors(model, body, exc)))
                return 400, ident
            await _reply(send, 200, await handler(st, ident, uid, parsed))
            return 200, ident
        except ApiError as exc:
            if exc.status == 403 and ident is not None:  # audited as the application's handler does
                await st.db.run(event, ident.uid, "access.denied", None, None, None,
                                f"POST {scope['path']}: {exc.message}"[:2000])
            await _reply(send, exc.status, {"error": exc.message, "field": exc.field}, exc.headers)
            return exc.status, ident
        except Exception as exc:
            why = storage_full(exc)
            if why is None:
                log.exception("POST %s failed", scope["path"])
                await _reply(send, 500, {"error": "internal server error", "field": None})
                return 500, ident
            log.error("storage full: POST %s: %s", scope["path"], why)  # one line, not a traceback per worker
            err = storage_full_error(why)
            await _reply(send, err.status, {"error": err.message, "field": err.field}, err.headers)
            return err.status, ident


async def _body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "the client went away before the body was complete", "body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _reply(send: Send, status: int, content: Any, headers: dict[str, str] | None = None) -> None:
    data = json_bytes(content)
    if _one_write(send, status, data, headers):
        return
    head = [*_JSON, (b"content-length", str(len(data)).encode())]
    if headers:
        head += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})


try:  # uvicorn's httptools protocol (uvicorn[standard]), the server xwhep runs on
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle
except ImportError:  # pragma: no cover - another HTTP implementation: the two ASGI messages, as usual
    RequestResponseCycle = None


def _one_write(send: Send, status: int, data: bytes, headers: dict[str, str] | None) -> bool:
    """Write the whole response (status line, headers, body) with one ``transport.write``; False if not possible.

    uvicorn writes the head and the body of a response separately: two TLS records and two ``send`` system calls
    for a few hundred bytes, a quarter of the server's time for an empty sync call (measured). Here the
    response is written at once, and uvicorn's cycle is left in the state its own ``send`` leaves it (started,
    complete, the next pipelined request released). Only for uvicorn's httptools cycle, only before anything was
    sent, and every attribute is read before anything changes: a uvicorn whose internals differ falls back.
    """
    cycle = getattr(send, "__self__", None)
    if RequestResponseCycle is None or type(cycle) is not RequestResponseCycle or headers:
        return False
    try:
        transport, flow, keep_alive = cycle.transport, cycle.flow, cycle.keep_alive
        default_headers, on_response, message_event = cycle.default_headers, cycle.on_response, cycle.message_event
        if cycle.response_started or cycle.disconnected or flow.write_paused or cycle.scope["method"] == "HEAD":
            return False
        line = STATUS_LINE[status]
    except (AttributeError, KeyError):
        return False
    parts = [line]
    for name, value in default_headers:  # date and server, as uvicorn sends them
        parts += [name, b": ", value, b"\r\n"]
    parts.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(data))
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts += [b"\r\n", data]
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.response_complete = True
    transport.write(b"".join(parts))
    message_event.set()
    if not keep_alive:
        transport.close()
    on_response()
    return True
