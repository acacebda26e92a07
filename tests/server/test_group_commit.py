"""Group commit (``Database.run_grouped``): the calls of one event-loop turn share one transaction, each in its own
savepoint; a failing call rolls back only itself; results reach callers only after the commit."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from xwhep.server.db import schema as s
from xwhep.server.db.engine import Database
from xwhep.server.services.common import event as write_event


def _db(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'g.db'}")
    db.migrate()
    return db


def _actions(db: Database) -> list[str]:
    return db.run_sync(lambda conn: [r[0] for r in conn.execute(sa.select(s.events.c.action).order_by(s.events.c.id))])


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_one_failure_rolls_back_only_itself(tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> None:
    if kind == "sqlite":
        db = _db(tmp_path)
    else:
        db = Database(request.getfixturevalue("pg_url"))
        db.migrate()
    db.run_sync(lambda conn: None)  # connected: from now on, only the group's transaction commits
    commits: list[int] = []
    event.listen(db.engine, "commit", lambda conn: commits.append(1))

    def ok(conn: Any, name: str) -> str:
        write_event(conn, None, name, None)
        return name

    def bad(conn: Any) -> None:
        write_event(conn, None, "half-written", None)
        raise ValueError("refused")

    async def main() -> list[Any]:
        return await asyncio.gather(db.run_grouped(ok, "first"), db.run_grouped(bad), db.run_grouped(ok, "second"),
                                    return_exceptions=True)

    try:
        out = asyncio.run(main())
        assert len(commits) == 1, "the three calls should have shared one transaction"
        assert out[0] == "first" and out[2] == "second"
        assert isinstance(out[1], ValueError)
        assert _actions(db) == ["first", "second"]  # the failing call left nothing behind
    finally:
        db.dispose()


def test_results_arrive_after_the_commit(tmp_path: Path) -> None:
    db = _db(tmp_path)
    db.run_sync(lambda conn: None)
    seen: list[str] = []
    event.listen(db.engine, "commit", lambda conn: seen.append("commit"))

    def work(conn: Any) -> None:
        write_event(conn, None, "x", None)

    async def main() -> None:
        await db.run_grouped(work)
        seen.append("result")

    try:
        asyncio.run(main())
        assert seen == ["commit", "result"]
    finally:
        db.dispose()


def test_a_failed_commit_fails_every_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _db(tmp_path)

    def work(conn: Any) -> str:
        write_event(conn, None, "lost", None)
        return "ok"

    def broken_commit(conn: Any) -> None:
        raise RuntimeError("disk full")

    async def main() -> list[Any]:
        return await asyncio.gather(db.run_grouped(work), db.run_grouped(work), return_exceptions=True)

    try:
        db.run_sync(lambda conn: None)  # connect first: the listener is for the group's transaction only
        event.listen(db.engine, "commit", broken_commit)
        out = asyncio.run(main())
        event.remove(db.engine, "commit", broken_commit)
        assert all(isinstance(x, RuntimeError) for x in out), out
        assert "lost" not in _actions(db)  # and the connection is usable again
        assert asyncio.run(db.run_grouped(work)) == "ok"
        assert _actions(db).count("lost") == 1
    finally:
        db.dispose()
