"""Driver-level SQL for the hot paths (claim, report), inside the caller's SQLAlchemy transaction.

SQLAlchemy Core costs tens of microseconds per statement (construction, cache key, parameter processing):
under the throughput benchmark it was about a third of the server's time. The few statements a worker's round
trip runs are written once here, in the subset of SQL both SQLite and PostgreSQL speak, and go straight to the
DB-API cursor of the connection the transaction already holds.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import compress, repeat
from typing import Any

import orjson
from sqlalchemy.engine import Connection

from xwhep.server.db.engine import PENDING_EVENTS, EventRow

_NAMED = re.compile(r"(?<!:):([a-z_][a-z0-9_]*)")
_IN = re.compile(r"IN_LIST\(:([a-z_][a-z0-9_]*)\)")


class Sql:
    """One statement with ``:name`` parameters; ``IN_LIST(:name)`` stands for membership in a list parameter,
    ``FOR_UPDATE`` for row locks (PostgreSQL; SQLite has one writer anyway). ``postgres``: the statement as
    PostgreSQL spells it, where the two dialects differ (same parameters)."""

    def __init__(self, text: str, postgres: str | None = None) -> None:
        # SQLite: the list travels as one JSON array (one statement text for every list length), and parameters
        # are bound by position: sqlite3 looks each named one up by a freshly made string (a 35-column insert
        # bound by name cost ~9 µs more per row, measured)
        sqlite = _IN.sub(r"IN (SELECT value FROM json_each(:\1))", text).replace(" FOR_UPDATE", "")
        names = _NAMED.findall(sqlite)
        self.sqlite = _NAMED.sub("?", sqlite)
        self.positional: Callable[[Mapping[str, Any]], tuple[Any, ...]] = (
            operator.itemgetter(*names) if len(names) > 1 else
            (lambda p, n=names[0]: (p[n],)) if names else (lambda p: ()))  # type: ignore[misc]
        # PostgreSQL (psycopg): the list travels as an array
        self.postgres = _NAMED.sub(r"%(\1)s", _IN.sub(r"= ANY(:\1)", postgres or text)).replace("FOR_UPDATE",
                                                                                                 "FOR UPDATE")
        self.lists = _IN.findall(text)

    def text(self, conn: Connection) -> str:
        return self.sqlite if conn.dialect.name == "sqlite" else self.postgres

    def params(self, conn: Connection, params: Mapping[str, Any]) -> Mapping[str, Any] | tuple[Any, ...]:
        sqlite = conn.dialect.name == "sqlite"
        if self.lists:
            out = dict(params)
            for name in self.lists:
                values = list(out[name])  # any iterable of scalars (a set, a dict's keys)
                out[name] = orjson.dumps(values).decode() if sqlite else values
            params = out
        return self.positional(params) if sqlite else params


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
        if conn.dialect.name != "sqlite":
            cur.executemany(sql.postgres, batch)
        elif sql.lists:
            cur.executemany(sql.sqlite, [sql.params(conn, p) for p in batch])
        else:
            cur.executemany(sql.sqlite, map(sql.positional, batch))
    finally:
        cur.close()


def json_value(value: Any) -> Any:
    """A JSON column as read by the driver: text on SQLite, already decoded on PostgreSQL."""
    if isinstance(value, (str, bytes)):
        return orjson.loads(value)
    return value


class Insert:
    """An INSERT of rows into ``table`` that binds, on SQLite, only the columns a row sets.

    Python 3.11's sqlite3 adapts a bound ``None`` through its failure path (an exception made and cleared per
    value): binding 35 parameters of which 20 are ``None`` cost ~20 µs a row against ~5 µs for 35 integers,
    measured. A column left out gets its default (NULL), so each run of rows with the same unset columns is one
    ``executemany`` of a statement naming only the others. PostgreSQL gets the full statement.
    """

    def __init__(self, table: str, columns: Sequence[str]) -> None:
        self.table = table
        self.columns = tuple(columns)
        self.values: Callable[[Mapping[str, Any]], tuple[Any, ...]] = operator.itemgetter(*self.columns)
        self.postgres = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"
        self._sqlite: dict[tuple[bool, ...], str] = {}

    def _text(self, mask: tuple[bool, ...]) -> str:
        text = self._sqlite.get(mask)
        if text is None:
            names = list(compress(self.columns, mask))
            text = self._sqlite[mask] = (f"INSERT INTO {self.table} ({', '.join(names)}) "
                                         f"VALUES ({', '.join(['?'] * len(names))})")
        return text

    def rows(self, conn: Connection, rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert dict rows (every column a key); returns how many."""
        return self.tuples(conn, map(self.values, rows))

    def tuples(self, conn: Connection, rows: Iterable[tuple[Any, ...]]) -> int:
        """Insert rows given as tuples in column order; returns how many."""
        cur = _cursor(conn)
        try:
            if conn.dialect.name != "sqlite":
                batch = list(rows)
                if batch:
                    cur.executemany(self.postgres, batch)
                return len(batch)
            n = 0
            runs: list[tuple[tuple[bool, ...], list[tuple[Any, ...]]]] = []
            full = (True,) * len(self.columns)
            for values in rows:
                if None in values:
                    mask = tuple(map(operator.is_not, values, repeat(None)))
                    values = tuple(compress(values, mask))
                else:
                    mask = full
                if not runs or runs[-1][0] != mask:
                    runs.append((mask, []))
                runs[-1][1].append(values)
                n += 1
            for mask, params in runs:
                cur.executemany(self._text(mask), params)
            return n
        finally:
            cur.close()


def last_rowid(conn: Connection) -> int:
    """SQLite: the rowid of the connection's last insert."""
    cur = _cursor(conn)
    try:
        cur.execute("SELECT last_insert_rowid()")
        return int(cur.fetchone()[0])
    finally:
        cur.close()


EVENT = Insert("events", ("time", "actor", "action", "object", "source", "target", "detail"))


def events(conn: Connection, t: float, batch: Iterable[Mapping[str, Any]]) -> None:
    """Write events (actor, action, object and optionally source, target, detail) in one executemany."""
    rows = [(t, e["actor"], e["action"], e["object"], e.get("source"), e.get("target"), e.get("detail"))
            for e in batch]
    if not rows:
        return
    EVENT.tuples(conn, rows)
    first = last_rowid(conn) - len(rows) + 1 if conn.dialect.name == "sqlite" else None
    note_events(conn, [(None if first is None else first + i, r[0], r[2], r[3], r[4], r[5], r[6], r[1])
                       for i, r in enumerate(rows)])


def note_events(conn: Connection, rows: list[EventRow]) -> None:
    """Note events written in the caller's transaction, (action, object, source, target, detail, actor) each:
    the database hands them to its listeners (metrics, transition log lines) once the transaction committed."""
    pending = conn.info.get(PENDING_EVENTS)
    if pending is None:
        conn.info[PENDING_EVENTS] = rows
    else:
        pending.extend(rows)
