"""The database handle: one engine, SQLite (WAL) or PostgreSQL, schema kept by Alembic.

SQLite runs on the event loop thread through a single connection: statements take microseconds and one
writer means no SQLITE_BUSY. PostgreSQL runs in worker threads from a connection pool.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.pool import StaticPool

T = TypeVar("T")

PENDING_EVENTS = "xw_events"
"""Key in ``conn.info`` under which the event writers (services/common.py, db/raw.py) note what a transaction
logged; :class:`Database` hands the list to its ``listeners`` once the transaction committed, drops it otherwise."""
EventRow = tuple[int | None, float, str, str | None, str | None, str | None, str | None, str | None]
"""(id, time, action, object, source, target, detail, actor) of one event written; the id on SQLite only (rows
of one insert are numbered consecutively there; PostgreSQL draws them from a sequence)."""

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("xwhep.server")


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` and pick the psycopg 3 driver for it."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class Database:
    """A SQLAlchemy engine plus the policy for running transactions from async code."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self._conn: sa.Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._group: list[_Call] = []
        self._flushing: set[asyncio.Future[None]] = set()  # PostgreSQL groups in flight (kept referenced)
        # called with the events of each committed transaction (metrics, transition log lines); on PostgreSQL
        # from the worker thread that committed. ``on_commit``: on the event loop after commits made from async
        # code (wakes the live event streams)
        self.listeners: list[Callable[[list[EventRow]], None]] = []
        self.on_commit: Callable[[], None] | None = None
        if self.is_sqlite:
            self.engine = sa.create_engine(self.url, poolclass=StaticPool,
                                           connect_args={"check_same_thread": False})
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        else:
            self.engine = sa.create_engine(self.url, pool_size=16, max_overflow=16, pool_pre_ping=True)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one transaction, from synchronous code."""
        if self.is_sqlite:
            # one long-lived connection: no pool checkout per transaction on the hot paths
            if self._conn is None:
                self._conn = self.engine.connect()
                path = self.engine.url.database
                if path and path != ":memory:":
                    self._checkpointer = _Checkpointer(path)
            try:
                with self._conn.begin():
                    value = _call(self._conn, fn, args)
                    pending = _take_events(self._conn)
            except BaseException:
                self._reset_sqlite()
                raise
        else:
            with self.engine.begin() as conn:
                value = _call(conn, fn, args)
                pending = _take_events(conn)  # before the connection goes back to the pool
        if pending:
            self._committed(pending)
        return value

    def _committed(self, events: list[EventRow]) -> None:
        for listener in self.listeners:
            try:
                listener(events)
            except Exception:  # an observer must never undo or fail a committed transaction
                log.exception("event listener failed")

    def _notify(self) -> None:
        if self.on_commit is not None:
            self.on_commit()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one transaction, from async code."""
        if self.is_sqlite:
            value = self.run_sync(fn, *args)
        else:
            value = await anyio.to_thread.run_sync(self.run_sync, fn, *args)
        self._notify()
        return value

    async def run_grouped(self, fn: Callable[..., T], *args: Any) -> T:
        """Like :meth:`run`, but the calls made during one turn of the event loop share one transaction (group
        commit), each in a savepoint of its own: one failing call rolls back only itself, and callers get their
        results only after the commit.

        SQLite: a commit costs about a millisecond (the write-ahead log), more than the statements of a worker's
        round trip, and a thousand workers' calls arrive in bursts. PostgreSQL: one thread hop and one
        connection checkout per group instead of per call (groups run concurrently, each on its connection)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if not self._group:
            loop.call_soon(self._flush_group)
        self._group.append((fn, args, fut))
        return await fut

    def _reset_sqlite(self) -> None:
        """After a failure, make sure no transaction stays open on the shared connection (a failed COMMIT can
        leave one, and every later BEGIN would then fail)."""
        if self._conn is None:
            return
        try:
            self._conn.info.pop(PENDING_EVENTS, None)  # what the failed transaction noted never happened
            raw = self._conn.connection.dbapi_connection
            if raw is not None and raw.in_transaction:
                raw.rollback()
        except Exception:  # the connection itself is broken: start over with a new one
            self._conn.invalidate()
            self._conn = None

    def _flush_group(self) -> None:
        group, self._group = self._group, []
        if not self.is_sqlite:
            task = asyncio.ensure_future(self._flush_group_threaded(group))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
            return
        try:
            if self._conn is None:
                self.run_sync(lambda conn: None)
            conn = self._conn
            assert conn is not None
            with conn.begin():
                outcomes = _run_group(conn, group)
                pending = _take_events(conn)
        except Exception as exc:  # the commit (or the transaction) failed: nothing of the group landed
            self._reset_sqlite()
            _settle(group, [], exc)
            return
        if pending:
            self._committed(pending)
        _settle(group, outcomes, None)
        self._notify()

    async def _flush_group_threaded(self, group: list[_Call]) -> None:
        def run() -> list[tuple[asyncio.Future[Any], bool, Any]]:
            with self.engine.begin() as conn:
                outcomes = _call(conn, _run_group, (group,))
                pending = _take_events(conn)
            if pending:
                self._committed(pending)
            return outcomes

        try:
            outcomes = await anyio.to_thread.run_sync(run)
        except Exception as exc:
            _settle(group, [], exc)
            return
        _settle(group, outcomes, None)
        self._notify()

    def dispose(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.engine.dispose()


_Call = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


def _call(conn: sa.Connection, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    """``fn(conn, *args)``; the events it noted are dropped if it fails (its transaction will not commit)."""
    try:
        return fn(conn, *args)
    except BaseException:
        conn.info.pop(PENDING_EVENTS, None)
        raise


def _take_events(conn: sa.Connection) -> list[EventRow] | None:
    """The events noted in this transaction (and forget them), taken just before its commit."""
    return conn.info.pop(PENDING_EVENTS, None)  # type: ignore[no-any-return]


def _run_group(conn: sa.Connection, group: list[_Call]) -> list[tuple[asyncio.Future[Any], bool, Any]]:
    """Each call of a group in a savepoint of the caller's transaction; (future, ok, result or exception)."""
    outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
    # savepoints straight through the driver: through SQLAlchemy they cost ~40 µs a call (measured)
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        info = conn.info
        for fn, args, fut in group:
            if fut.cancelled():  # the caller went away before its turn: do nothing for it
                continue
            cur.execute("SAVEPOINT xw_call")
            noted = len(info.get(PENDING_EVENTS) or ())
            try:
                value = fn(conn, *args)
            except Exception as exc:
                if noted < len(info.get(PENDING_EVENTS) or ()):  # its events were rolled back with it
                    del info[PENDING_EVENTS][noted:]
                cur.execute("ROLLBACK TO SAVEPOINT xw_call")
                cur.execute("RELEASE SAVEPOINT xw_call")
                outcomes.append((fut, False, exc))
            else:
                cur.execute("RELEASE SAVEPOINT xw_call")
                outcomes.append((fut, True, value))
    finally:
        cur.close()
    return outcomes


def _settle(group: list[_Call], outcomes: list[tuple[asyncio.Future[Any], bool, Any]],
            failure: BaseException | None) -> None:
    """Hand results to the callers (on the loop thread, after the commit); all fail if the commit did."""
    if failure is not None:
        for _, _, fut in group:
            if not fut.done():
                fut.set_exception(failure)
        return
    for fut, ok, value in outcomes:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_on_begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA cache_size=-65536")
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.execute("PRAGMA wal_autocheckpoint=0")  # the _Checkpointer thread does it, off the event loop
    cur.close()


def _sqlite_on_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class _Checkpointer:
    """Copies the SQLite write-ahead log back into the database from a thread of its own.

    SQLite's automatic checkpoint runs inside the commit that crosses the threshold, on the event loop thread,
    and it syncs the file: a commit every few hundred took milliseconds (measured: 8 % of the server's time under
    the throughput benchmark). A PASSIVE checkpoint on another connection never blocks the writer."""

    def __init__(self, path: str, period: float = 0.5) -> None:
        self.path = path
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xw-sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=10000")
            while not self._stop.wait(self.period):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:  # busy or locked: the next round catches up
                    continue
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # a clean file on shutdown
        except sqlite3.Error:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
