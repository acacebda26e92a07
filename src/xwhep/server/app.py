"""The ASGI application: routers, error rendering, request-size guard, background housekeeping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from xwhep import __version__
from xwhep.core.model import UsageLevel, WorkStatus
from xwhep.server import hosts as hostcache
from xwhep.server import logs, revocation
from xwhep.server.api import events as event_routes
from xwhep.server.api import metrics as metrics_routes
from xwhep.server.api import models, oidc, routes, worker
from xwhep.server.api import relay as relay_routes
from xwhep.server.api import x509 as x509_routes
from xwhep.server.api.deps import FastJSON
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError
from xwhep.server.services import dispatch
from xwhep.server.services.common import event
from xwhep.server.services.works import Resolver, profile_of
from xwhep.server.state import ServerState

log = logging.getLogger("xwhep.server")


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, except data uploads (they stream to disk)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].endswith("/content"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and int(value or 0) > self.limit:
                await _too_large(self.limit, send)
                return
        seen = 0

        async def counting() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, counting, send)


async def _too_large(limit: int, send: Send) -> None:
    body = FastJSON({"error": f"request body over {limit} bytes", "field": None}).body
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def load_index(conn: Any, since: float | None = None
               ) -> tuple[list[tuple[Any, ...]], dict[str, int], dict[str, tuple[str, str]]]:
    """Rebuild the in-memory state from the database: pending works, running counts, active tasks.

    With ``since``, only works that became PENDING from then on (what other server processes queued).
    """
    apps = {a["uid"]: dict(a) for a in conn.execute(sa.select(s.apps)).mappings()}
    res = Resolver(conn, None)  # type: ignore[arg-type]
    pending = []
    q = sa.select(s.works).where(s.works.c.status == WorkStatus.PENDING)
    if since is not None:
        q = q.where(s.works.c.pending_since >= since)
    for w in conn.execute(q.order_by(s.works.c.id)).mappings():
        rset = w["replica_of"] or (w["uid"] if w["replicas"] > 1 else None)
        pending.append((w["uid"], w["id"], profile_of(w, apps[w["app"]], res.owner_group(w["owner"])),
                        w["rank"], rset))
    running = dict(conn.execute(sa.select(s.works.c.owner, sa.func.count()).where(
        s.works.c.status.in_([WorkStatus.RUNNING, WorkStatus.DATAREQUEST])).group_by(s.works.c.owner)).all())
    active = {} if since is not None else dict(
        (t, (w, h)) for t, w, h in conn.execute(sa.select(s.tasks.c.uid, s.tasks.c.work, s.tasks.c.host)
                                              .where(s.tasks.c.status == "RUNNING")))
    return pending, running, active


async def rebuild(st: ServerState, since: float | None = None) -> None:
    pending, running, active = await st.db.run(load_index, since)
    for args in pending:
        st.scheduler.add(*args)
    st.scheduler.running.clear()
    st.scheduler.running.update(running)
    st.liveness.active_tasks.update(active)
    st.scheduler.notify()


async def housekeeping(st: ServerState) -> None:
    """Flush batched alive times; reap silent tasks; resync the pending index when needed."""
    cfg = st.config
    reaper_period = cfg.reaper_period or max(0.2, cfg.alive_timeout / 4)
    next_reap = time.monotonic() + reaper_period
    while True:
        await asyncio.sleep(min(cfg.flush_period, reaper_period))
        try:
            hosts, st.liveness.hosts = st.liveness.hosts, {}
            tasks, st.liveness.tasks = st.liveness.tasks, {}
            if hosts or tasks:
                await st.db.run(dispatch.flush_alive, hosts, tasks)
            if time.monotonic() >= next_reap:
                next_reap = time.monotonic() + reaper_period
                n, eff = await st.db.run(dispatch.reap, time.time() - cfg.alive_timeout)
                eff.apply(st)
                if n:
                    log.info("reaper: %d silent task(s) lost", n)
            if st.resync_needed:
                st.resync_needed = False
                await rebuild(st)
            elif not st.db.is_sqlite:  # other server processes may share the database
                since = time.time() - 10 * cfg.flush_period
                await rebuild(st, since=since)
                for uid in await st.db.run(revocation.changed_since, since):
                    st.revocations.forget(uid)
                    hostcache.forget(st, uid)
        except asyncio.CancelledError:
            raise
        except Exception:  # keep the loop alive; the next round retries
            log.exception("housekeeping round failed")


def create_app(st: ServerState) -> FastAPI:
    """The FastAPI application around a ready :class:`ServerState`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st.started = time.time()
        await rebuild(st)
        task = asyncio.create_task(housekeeping(st))
        try:
            yield
        finally:
            await st.relay.close()  # workers and server proxies reconnect to the next server
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            hosts, tasks = st.liveness.hosts, st.liveness.tasks
            if hosts or tasks:
                await st.db.run(dispatch.flush_alive, hosts, tasks)

    app = FastAPI(title="xwhep", version=__version__, lifespan=lifespan,
                  description="A secured desktop grid after XtremWeb-HEP: works, data, apps, workers.")
    app.state.xw = st
    app.include_router(routes.router)
    app.include_router(worker.router)
    app.include_router(oidc.router)
    app.include_router(x509_routes.router)
    app.include_router(relay_routes.router)
    app.include_router(event_routes.router)
    app.include_router(metrics_routes.router)
    st.metrics.attach(st)  # counters of committed events, gauges at scrape time
    st.db.listeners.append(logs.transition_lines)  # one INFO line per work transition
    event_routes.bus_of(st)  # live event streams, woken after commits

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> FastJSON:
        ident = getattr(request.state, "ident", None)
        if exc.status == 403 and ident is not None:  # an authenticated caller refused: worth auditing
            await st.db.run(event, ident.uid, "access.denied", None, None, None,
                            f"{request.method} {request.url.path}: {exc.message}"[:2000])
        return FastJSON({"error": exc.message, "field": exc.field}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> FastJSON:
        return FastJSON(models.validation_error(exc.errors()), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> FastJSON:
        return FastJSON({"error": str(exc.detail), "field": None}, status_code=exc.status_code)

    app.add_middleware(BodyLimit, limit=st.config.max_json_body)  # type: ignore[arg-type]
    app.add_middleware(logs.AccessLog, metrics=st.metrics)  # type: ignore[arg-type]
    return app


LEVEL_ADMIN = UsageLevel.SUPER_USER
