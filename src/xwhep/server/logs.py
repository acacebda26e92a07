"""Logging for the server and the worker: the level, plain or JSON lines, the access log, work transitions.

Loggers worth knowing (docs/operations.md): ``xwhep.access`` (one line per API request; the workers' hot calls
``sync``/``alive`` at DEBUG only), ``xwhep.works`` (one INFO line per work transition, written once the
transaction that made it committed), ``xwhep.server``, ``xwhep.worker`` and ``xwhep.worker.jobs`` (job start and
end). ``--log-level`` beats ``$XW_LOG``, which beats WARNING.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xwhep.logsetup import LogSetupError, level_of, setup
from xwhep.server.db.engine import EventRow

__all__ = ["ACCESS", "WORKS", "AccessLog", "LogSetupError", "access_line", "level_of", "setup", "transition_lines"]

ACCESS = logging.getLogger("xwhep.access")
WORKS = logging.getLogger("xwhep.works")


# -- the server's lines -------------------------------------------------------------------------------------------

def transition_lines(rows: list[EventRow]) -> None:
    """One INFO line per work transition among the events of a committed transaction (a Database listener)."""
    if not WORKS.isEnabledFor(logging.INFO):
        return
    for _id, _t, action, obj, source, target, detail, actor in rows:
        if action == "work.transition":
            WORKS.info("work %s %s -> %s%s", obj, source, target, f" ({detail})" if detail else "",
                       extra={"fields": {"work": obj, "from": source, "to": target, "detail": detail,
                                         "actor": actor}})
        elif action == "work.submit":
            WORKS.info("work %s submitted -> %s", obj, target,
                       extra={"fields": {"work": obj, "to": target, "actor": actor}})


def access_line(level: int, scope: Mapping[str, Any], status: int, seconds: float, login: str | None) -> None:
    """One access log line (the caller checked that ``level`` is enabled)."""
    client = scope.get("client")
    address = client[0] if client else "-"
    path = scope.get("path", "")
    ACCESS.log(level, "%s %s %d %.1f ms %s %s", scope.get("method", "-"), path, status, seconds * 1000,
               login or "-", address,
               extra={"fields": {"method": scope.get("method"), "path": path, "status": status,
                                 "ms": round(seconds * 1000, 3), "user": login, "address": address}})


class AccessLog:
    """ASGI middleware: one access log line (INFO) and the request metrics per HTTP request it sees (everything
    but the workers' hot calls, which :mod:`~xwhep.server.api.fastpath` serves and accounts for itself)."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state  # its metrics are read per request: the app is built before the server state is used

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.state.metrics.request(f"{scope['method']} {route}", status, seconds)
            if ACCESS.isEnabledFor(logging.INFO):
                ident = (scope.get("state") or {}).get("ident")
                access_line(logging.INFO, scope, status, seconds, getattr(ident, "login", None))
