"""Driver-level SQL for the hot paths (claim, report), inside the caller's SQLAlchemy transaction.

SQLAlchemy Core costs tens of microseconds per statement (construction, cache key, parameter processing):
under the throughput benchmark it was about a third of the server's time. The few statements a worker's round
trip runs are written once here, in the subset of SQL both SQLite and PostgreSQL speak, and go straight to the
DB-API cursor of the connection the transaction already holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy.engine import Connection

_NAMED = re.compile(r"(?<!:):([a-z_][a-z0-9_]*)")
_IN = re.compile(r"IN_LIST\(:([a-z_][a-z0-9_]*)\)")


class Sql:
    """One statement with ``:name`` parameters; ``IN_LIST(:name)`` stands for membership in a list parameter,
    ``FOR_UPDATE`` for row locks (PostgreSQL; SQLite has one writer anyway)."""

    def __init__(self, text: str) -> None:
        # SQLite: the list travels as one JSON array (one statement text for every list length)
        self.sqlite = _IN.sub(r"IN (SELECT value FROM json_each(:\1))", text).replace(" FOR_UPDATE", "")
        # PostgreSQL (psycopg): the list travels as an array
        self.postgres = _NAMED.sub(r"%(\1)s", _IN.sub(r"= ANY(:\1)", text)).replace("FOR_UPDATE", "FOR UPDATE")
        self.lists = _IN.findall(text)

    def text(self, conn: Connection) -> str:
        return self.sqlite if conn.dialect.name == "sqlite" else self.postgres

    def params(self, conn: Connection, params: Mapping[str, Any]) -> Mapping[str, Any]:
        if not self.lists:
            return params
        out = dict(params)
        sqlite = conn.dialect.name == "sqlite"
        for name in self.lists:
            values = list(out[name])  # any iterable of scalars (a set, a dict's keys)
            out[name] = orjson.dumps(values).decode() if sqlite else values
        return out


def _cursor(conn: Connection) -> Any:
    return conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]


def rows(conn: Connection, sql: Sql, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The result rows as dicts."""
    cur = _cursor(conn)
    try:
        cur.execute(sql.text(conn), sql.params(conn, params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        cur.close()


def tuples(conn: Connection, sql: Sql, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """The result rows as tuples."""
    cur = _cursor(conn)
    try:
        cur.execute(sql.text(conn), sql.params(conn, params))
        return list(cur.fetchall())
    finally:
        cur.close()


def executemany(conn: Connection, sql: Sql, batch: Sequence[Mapping[str, Any]]) -> None:
    """Run one statement for each parameter set."""
    if not batch:
        return
    cur = _cursor(conn)
    try:
        cur.executemany(sql.text(conn), batch)
    finally:
        cur.close()


def json_value(value: Any) -> Any:
    """A JSON column as read by the driver: text on SQLite, already decoded on PostgreSQL."""
    if isinstance(value, (str, bytes)):
        return orjson.loads(value)
    return value


EVENT = Sql("INSERT INTO events (time, actor, action, object, source, target, detail) "
            "VALUES (:time, :actor, :action, :object, :source, :target, :detail)")


def events(conn: Connection, t: float, batch: Iterable[Mapping[str, Any]]) -> None:
    """Write events (actor, action, object and optionally source, target, detail) in one executemany."""
    executemany(conn, EVENT, [{"time": t, "source": None, "target": None, "detail": None, **e} for e in batch])
