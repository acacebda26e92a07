"""Logging for the server and the worker: the level, plain or JSON lines, the access log, work transitions.

Loggers worth knowing (docs/operations.md): ``xwhep.access`` (one line per API request; the workers' hot calls
``sync``/``alive`` at DEBUG only), ``xwhep.works`` (one INFO line per work transition, written once the
transaction that made it committed), ``xwhep.server``, ``xwhep.worker`` and ``xwhep.worker.jobs`` (job start and
end). ``--log-level`` beats ``$XW_LOG``, which beats WARNING.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xwhep.server.db.engine import EventRow

ACCESS = logging.getLogger("xwhep.access")
WORKS = logging.getLogger("xwhep.works")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
PLAIN = "%(asctime)s %(levelname)s %(name)s %(message)s"


class LogSetupError(ValueError):
    """A log level that does not exist."""


class JsonLines(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601, UTC, ms), ``level``, ``logger``, ``msg`` and ``fields`` (what
    the call passed as ``extra={"fields": {...}}``), plus ``exc`` with the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
            "fields": getattr(record, "fields", None) or {},
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def level_of(level: str | None) -> str:
    """The level to use: ``level`` if given, else ``$XW_LOG``, else WARNING (a clear error for a bad name)."""
    name = (level or os.environ.get("XW_LOG") or "WARNING").strip().upper()
    if name not in LEVELS:
        source = "--log-level" if level else "XW_LOG"
        raise LogSetupError(f"{source}: {name.lower()!r} is not one of {', '.join(x.lower() for x in LEVELS)}")
    return name


def setup(level: str | None = None, json_lines: bool = False) -> None:
    """Send every xwhep log record to stderr, as plain or JSON lines, from ``level`` on (see :func:`level_of`)."""
    name = level_of(level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if json_lines else logging.Formatter(PLAIN))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name)


# -- the server's lines -------------------------------------------------------------------------------------------

def transition_lines(rows: list[EventRow]) -> None:
    """One INFO line per work transition among the events of a committed transaction (a Database listener)."""
    if not WORKS.isEnabledFor(logging.INFO):
        return
    for action, obj, source, target, detail, actor in rows:
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

    def __init__(self, app: ASGIApp, metrics: Any) -> None:
        self.app = app
        self.metrics = metrics

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
            route = scope.get("route")
            self.metrics.request(getattr(route, "path", None) or "unmatched", status, seconds)
            if ACCESS.isEnabledFor(logging.INFO):
                ident = (scope.get("state") or {}).get("ident")
                access_line(logging.INFO, scope, status, seconds, getattr(ident, "login", None))
