"""The ASGI application: routers, error rendering, request-size guard, background housekeeping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote_to_bytes

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from xwhep import __version__
from xwhep.core.model import UsageLevel, WorkStatus
from xwhep.server import hosts as hostcache
from xwhep.server import logs, revocation, web
from xwhep.server.api import events as event_routes
from xwhep.server.api import metrics as metrics_routes
from xwhep.server.api import models, oidc, openapi, routes, worker
from xwhep.server.api import relay as relay_routes
from xwhep.server.api import stats as stats_routes
from xwhep.server.api import x509 as x509_routes
from xwhep.server.api.deps import FastJSON
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError, storage_full, storage_full_error, unique_violation
from xwhep.server.services import dispatch
from xwhep.server.services.common import event
from xwhep.server.services.works import Resolver, profile_of
from xwhep.server.state import ServerState

log = logging.getLogger("xwhep.server")


class RequestGuard:
    """Refuse, before any route runs, what no route should see: request bodies over ``limit`` bytes (413; data
    uploads are exempt, they stream to disk), and URLs whose percent-escapes are not UTF-8 (400 naming the
    parameter: Starlette would decode them to U+FFFD and the request would silently ask for something else)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        bad = _bad_url_text(scope)
        if bad is not None:
            if scope["type"] == "http":
                await _answer(send, 400, f"{bad}: not valid UTF-8 once percent-decoded", bad)
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http" or scope["path"].endswith("/content"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _answer(send, 413, f"request body over {self.limit} bytes", None)
                return
        seen = 0

        async def counting() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # a chunked body has no content-length to refuse it by
                    # an HTTPException, not an ApiError: FastAPI turns any other failure while it reads the body
                    # into "400 There was an error parsing the body"
                    raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, counting, send)


def _bad_url_text(scope: Scope) -> str | None:
    """The name of the URL part (``path`` or a query parameter) whose percent-escapes are not UTF-8; None if all
    are. Only escapes can be wrong: the raw URL is ASCII."""
    raw = scope.get("raw_path") or b""
    if b"%" in raw:
        try:
            unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return "path"
    query: bytes = scope.get("query_string", b"")
    if b"%" in query:
        for pair in query.split(b"&"):
            key, _, value = pair.partition(b"=")
            try:
                unquote_to_bytes(key.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                return "query"
            try:
                unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                return unquote_to_bytes(key).decode("utf-8", "replace") or "query"
    return None


async def _answer(send: Send, status: int, message: str, field: str | None) -> None:
    body = FastJSON({"error": message, "field": field}).body
    await send({"type": "http.response.start", "status": status,
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
    full = False
    while True:
        await asyncio.sleep(min(cfg.flush_period, reaper_period))
        hosts: dict[str, float] = {}
        tasks: dict[str, float] = {}
        try:
            hosts, st.liveness.hosts = st.liveness.hosts, {}
            tasks, st.liveness.tasks = st.liveness.tasks, {}
            if hosts or tasks:
                await st.db.run(dispatch.flush_alive, hosts, tasks)
            hosts, tasks = {}, {}
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
            if full:
                full = False
                log.warning("housekeeping: storage writable again")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # keep the loop alive; the next round retries
            # alive times not flushed stay in memory for the next round (newer ones win): the reaper must not take
            # a task for silent because the database could not record that it was not
            st.liveness.hosts = {**hosts, **st.liveness.hosts}
            st.liveness.tasks = {**tasks, **st.liveness.tasks}
            why = storage_full(exc)
            if why is None:
                log.exception("housekeeping round failed")
            elif not full:  # one line when it starts, not one a second for as long as it lasts
                full = True
                log.error("housekeeping: storage full (%s): alive times not saved until there is room", why)


def create_app(st: ServerState) -> FastAPI:
    """The FastAPI application around a ready :class:`ServerState`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st.started = time.time()
        st.metrics.attach(st)  # counters of committed events, gauges at scrape time
        st.db.listeners.append(logs.transition_lines)  # one INFO line per work transition
        event_routes.bus_of(st)  # live event streams, woken after commits
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

    app = FastAPI(title="xwhep", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="A secured desktop grid after XtremWeb-HEP: works, data, apps, workers.")
    app.state.xw = st
    openapi.install(app)
    app.include_router(routes.router)
    app.include_router(worker.router)
    app.include_router(oidc.router)
    app.include_router(x509_routes.router)
    app.include_router(relay_routes.router)
    app.include_router(stats_routes.router)
    web.install(app)  # the dashboard (/ui/) and /docs, /redoc from local files
    app.include_router(event_routes.router)
    app.include_router(metrics_routes.router)

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
    async def http_error(request: Request, exc: HTTPException) -> FastJSON:
        headers = dict(exc.headers or {})  # a 401's WWW-Authenticate, …
        if exc.status_code == 405:  # Starlette names the methods of one route; a path has one route per method
            headers["Allow"] = _allowed(app, request.scope)
        return FastJSON({"error": str(exc.detail), "field": None}, status_code=exc.status_code, headers=headers)

    async def storage(request: Request, exc: Exception) -> FastJSON:
        """A write the server's storage could not take: 507 and one log line (not a traceback per request); any
        other failure of these kinds is a bug, for the 500 handler below."""
        why = storage_full(exc)
        if why is None:
            taken = unique_violation(exc)
            if taken is not None:  # two requests raced for one name, or a value another object holds
                return FastJSON({"error": f"{taken}: already taken by another object", "field": taken},
                                status_code=409)
            raise exc
        log.error("storage full: %s %s: %s", request.method, request.url.path, why)
        err = storage_full_error(why)
        return FastJSON({"error": err.message, "field": err.field}, status_code=err.status, headers=err.headers)

    for kind in (OSError, sa.exc.SQLAlchemyError, sqlite3.Error):
        app.add_exception_handler(kind, storage)  # type: ignore[arg-type]

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> FastJSON:
        # Starlette logs the traceback and closes the connection after this answer: a bug stays visible
        return FastJSON({"error": "internal server error", "field": None}, status_code=500)

    app.add_middleware(RequestGuard, limit=st.config.max_json_body)  # type: ignore[arg-type]
    app.add_middleware(logs.AccessLog, state=st)  # type: ignore[arg-type]
    return app


def _allowed(app: FastAPI, scope: Scope) -> str:
    """Every method some operation serves at this request's path (a 405's Allow header), from the OpenAPI
    document: routers nest in FastAPI, and Starlette names only the methods of the first route that matched."""
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        table = [(_path_regex(path, item), {m.upper() for m in item}) for path, item in app.openapi()["paths"].items()]
        app.state.allow_table = table
    methods: set[str] = set()
    for regex, allowed in table:
        if regex.match(scope["path"]):
            methods |= allowed
    return ", ".join(sorted(methods))


def _path_regex(path: str, item: dict[str, Any]) -> re.Pattern[str]:
    """A document path as the router matches it: a parameter with a pattern (a uid) matches only that."""
    patterns = {p["name"]: p.get("schema", {}).get("pattern", "^[^/]+$") for op in item.values()
                for p in op.get("parameters", []) if p.get("in") == "path"}
    out, rest = "^", path
    while "{" in rest:
        head, _, tail = rest.partition("{")
        name, _, rest = tail.partition("}")
        out += re.escape(head) + "(?:" + patterns.get(name, "^[^/]+$").removeprefix("^").removesuffix("$") + ")"
    return re.compile(out + re.escape(rest) + "$")


LEVEL_ADMIN = UsageLevel.SUPER_USER
