"""``GET /api/v1/events/stream``: the event log, live, as Server-Sent Events (server/eventbus.py fans them out).

The contract (docs/operations.md, "Live events"): ``text/event-stream``; each event is

    id: <event id>
    event: <action>
    data: <the event as GET /api/v1/events renders it: time, actor, action, object, source, target, detail>

Query: ``object=<uid|URI>``, ``action=<prefix>``, ``group=<uid|URI>`` / ``label=<text>`` (events on works of a
group / with a label). ``Last-Event-ID`` (header, as browsers send it when they reconnect, or the
``last_event_id`` parameter) replays what was missed first (at most ``CATCHUP_MAX`` events: an ``event: gap``
says when more were). A comment line every ``HEARTBEAT`` seconds keeps proxies from closing an idle stream. When
the server ends a stream (a consumer too slow, the server stopping) it sends ``event: end`` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import orjson
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from xwhep.core.rights import Action
from xwhep.server.api.deps import identity, state_dep
from xwhep.server.api.models import QUERY_INT64, RefQuery
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError, bad_request
from xwhep.server.eventbus import EventBus, Filters, Stream
from xwhep.server.services import common as c
from xwhep.server.state import ServerState

router = APIRouter(prefix="/api/v1", tags=["events"])
Ident = Annotated[Identity, Depends(identity)]
St = Annotated[ServerState, Depends(state_dep)]

HEARTBEAT = 15.0


def bus_of(st: ServerState) -> EventBus:
    """The server's event bus (made on first use; the database wakes it after commits)."""
    if st.event_bus is None:
        st.event_bus = EventBus(st)
        st.db.on_commit = st.event_bus.notify
    bus: EventBus = st.event_bus
    return bus


class EventStreamResponse(StreamingResponse):
    """A stream that ends as soon as the client goes away (not at the next write), so that its slot is free at
    once: a browser that reloads opens a new stream while the old one is still counted otherwise."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:
            async def stream() -> None:
                with contextlib.suppress(OSError):  # the client went away mid-write
                    await self.stream_response(send)
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


@router.get("/events/stream", response_class=EventStreamResponse, status_code=200, responses={200: {
    "description": "Server-Sent Events: ``id:`` the event id, ``event:`` its action, ``data:`` the event as GET "
                   "/events renders it; ``: keepalive`` comments; ``event: end`` when the server ends the stream",
    "content": {"text/event-stream": {"schema": {  # one event (each field of the SSE wire format)
        "type": "object", "properties": {"id": {"type": "string"}, "event": {"type": "string"},
                                         "data": {"type": "string"}, "retry": {"type": "integer"}}}}}}})
async def event_stream(request: Request, ident: Ident, st: St, object: RefQuery = None,
                       action: Annotated[str | None, Query(max_length=64)] = None,
                       group: RefQuery = None, label: Annotated[str | None, Query(max_length=255)] = None,
                       last_event_id: Annotated[int | None, Query(**QUERY_INT64)] = None) -> EventStreamResponse:
    """Events as they are committed (Server-Sent Events), only those the caller may see; see the module's doc."""
    header = request.headers.get("last-event-id")
    if header is not None and header.strip():
        try:
            last_event_id = int(header)
        except ValueError:
            raise bad_request(f"Last-Event-ID: {header[:40]!r} is not an event id", "Last-Event-ID") from None
    filters = Filters(object=c.ref(object, "object") if object else None, action=action or None,
                      group=c.ref(group, "group") if group else None, label=label)
    await st.db.run(_check_filters, ident, filters)
    bus = bus_of(st)
    stream = await bus.open(ident, filters)
    return EventStreamResponse(_frames(st, bus, stream, last_event_id), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _check_filters(conn: Any, ident: Identity, f: Filters) -> None:
    """The object and group named must be readable by the caller: 404 otherwise (as for GET /events)."""
    if f.group is not None:
        c.load_checked(conn, ident, "group", f.group, Action.READ)
    if f.object is not None and not ident.is_admin:
        for table in s.TABLES_BY_TYPE.values():
            row = conn.execute(sa.select(table).where(table.c.uid == f.object)).mappings().first()
            if row is not None:
                if c.allowed(conn, ident, Action.READ, row):
                    return
                break
        raise ApiError(404, f"no object {f.object}", "object")


async def _frames(st: ServerState, bus: EventBus, stream: Stream, after: int | None) -> AsyncIterator[bytes]:
    try:
        yield b"retry: 2000\n\n"  # sent at once: the client knows the stream is open
        if after is not None and after < stream.start:
            replayed, gap = await bus.replay(stream, after)
            if gap is not None:  # too much was missed: say which events are not replayed
                yield _frame("gap", {"missed_after": gap[0], "missed_through": gap[1]})
            if replayed:
                yield replayed
        while True:
            if not stream.frames and stream.ended is None:
                try:
                    await asyncio.wait_for(stream.ready.wait(), HEARTBEAT)
                except TimeoutError:
                    if st.scheduler.closing:
                        yield _frame("end", {"reason": "the server is stopping"})
                        return
                    yield b": keep-alive\n\n"
                    continue
            chunk = stream.take()
            if chunk:
                yield chunk
            if stream.ended is not None:
                yield _frame("end", {"reason": stream.ended})
                return
    finally:
        bus.close(stream)


def _frame(event: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), orjson.dumps(data))
