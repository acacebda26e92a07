"""Log set-up shared by the server and the worker: the level, and plain or JSON lines on stderr.

``--log-level`` beats ``$XW_LOG``, which beats WARNING. JSON lines carry ``ts``, ``level``, ``logger``, ``msg``
and ``fields`` (what a call passed as ``extra={"fields": {...}}``).
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

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
    """Send xwhep's log records to stderr, as plain or JSON lines, from ``level`` on (see :func:`level_of`); other
    libraries' from WARNING on, unless the level is DEBUG."""
    name = level_of(level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if json_lines else logging.Formatter(PLAIN))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # other libraries' INFO lines (one per HTTP request for httpx) only when debugging
    root.setLevel(name if name == "DEBUG" else max(logging.WARNING, logging.getLevelNamesMapping()[name]))
    logging.getLogger("xwhep").setLevel(name)
