"""One error type for the whole server: an HTTP status, a readable message, the field it is about."""

from __future__ import annotations

import errno
import os
import re
import sqlite3


class ApiError(Exception):
    """Raised anywhere in the server; rendered as ``{"error": message, "field": field}`` with ``status``."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers


def bad_request(message: str, field: str | None = None) -> ApiError:
    return ApiError(400, message, field)


def not_found(kind: str, ref: str) -> ApiError:
    return ApiError(404, f"no {kind} {ref}", None)


def conflict(message: str, field: str | None = None) -> ApiError:
    return ApiError(409, message, field)


def forbidden(message: str) -> ApiError:
    return ApiError(403, message)


STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SQLITE_FULL = 13  # sqlite3.SQLITE_FULL (the constant is only exported from Python 3.11.? on)
PG_DISK_FULL = "53100"  # SQLSTATE disk_full


def storage_full(exc: BaseException) -> str | None:
    """Why ``exc`` means the server's storage is full (its file system or quota, SQLite's or PostgreSQL's disk);
    None for any other failure. Follows the chain of causes: the database drivers' errors arrive wrapped in
    SQLAlchemy's."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in STORAGE_FULL_ERRNOS:
            return os.strerror(cur.errno)
        if isinstance(cur, sqlite3.Error) and getattr(cur, "sqlite_errorcode", None) == SQLITE_FULL:
            return "database or disk is full"
        if getattr(cur, "sqlstate", None) == PG_DISK_FULL:
            return "the database's disk is full"
        cur = getattr(cur, "orig", None) or cur.__cause__
    return None


def storage_full_error(reason: str, field: str | None = None) -> ApiError:
    """The answer to a request that could not be stored: 507, the server keeps running, nothing half-written."""
    return ApiError(507, f"server storage full ({reason}): nothing was stored; try again later", field,
                    {"Retry-After": "60"})


_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: \w+\.(\w+)")
PG_UNIQUE = "23505"  # SQLSTATE unique_violation


def unique_violation(exc: BaseException) -> str | None:
    """The column whose uniqueness ``exc`` (a database integrity error) violated; None for any other failure."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return None
    m = _SQLITE_UNIQUE.search(str(orig))
    if isinstance(orig, sqlite3.IntegrityError) and m:
        return m.group(1)
    if getattr(orig, "sqlstate", None) == PG_UNIQUE:
        diag = getattr(orig, "diag", None)
        column = getattr(diag, "column_name", None)
        constraint = str(getattr(diag, "constraint_name", "") or "")
        return str(column or constraint.removesuffix("_key").split("_", 1)[-1] or "value")
    return None
