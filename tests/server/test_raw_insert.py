"""``raw.Insert`` leaves unset (None) columns out on SQLite: rows must still land in order, whole, with NULLs where
they were None, and a bag's submission order (``works._submission_order``) must match the ids the rows got."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from xwhep.core.uri import new_uid
from xwhep.server.db import raw
from xwhep.server.db import schema as s
from xwhep.server.db.engine import Database
from xwhep.server.services.works import _INSERT_WORK, _WORK_COLUMNS, _submission_order


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'i.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    database = Database(url)
    database.migrate()
    try:
        yield database
    finally:
        database.dispose()


def _work(i: int, label: str | None, stdin: str | None) -> dict[str, object]:
    row: dict[str, object] = dict.fromkeys(_WORK_COLUMNS)
    row.update(uid=new_uid(), owner=new_uid(), access_rights=0x755, created=1.0, modified=1.0, status="PENDING",
               app=new_uid(), args=str(i), env="{}", min_memory=0, min_cpuspeed=0, min_disk=0, max_retries=3,
               retries=0, replicas=1, label=label, stdin=stdin)
    return row


def test_rows_with_different_unset_columns_keep_their_order_and_nulls(db: Database) -> None:
    # runs of different None patterns, interleaved: a,a,b,c,c,a (the statement changes between runs)
    shapes = [("x", None), ("x", None), (None, None), (None, "s"), (None, "s"), ("y", None)]
    rows = [_work(i, label, None if stdin is None else new_uid()) for i, (label, stdin) in enumerate(shapes)]

    def insert(conn: sa.Connection) -> dict[str, int]:
        assert _INSERT_WORK.rows(conn, rows) == len(rows)
        return _submission_order(conn, rows)

    order = db.run_sync(insert)
    got = db.run_sync(lambda conn: [dict(r) for r in conn.execute(
        sa.select(s.works.c.id, s.works.c.uid, s.works.c.label, s.works.c.stdin, s.works.c.args,
                  s.works.c.wallclock, s.works.c.trials).order_by(s.works.c.id)).mappings()])
    assert [g["uid"] for g in got] == [r["uid"] for r in rows], "rows must be inserted in the order given"
    assert [g["label"] for g in got] == [r["label"] for r in rows]
    assert [g["stdin"] for g in got] == [r["stdin"] for r in rows]
    assert [g["args"] for g in got] == [str(i) for i in range(len(rows))]
    assert all(g["wallclock"] is None for g in got)  # left out: NULL, as when bound as None
    assert all(g["trials"] == 0 for g in got)  # a column not in the list gets its server default
    assert order == {g["uid"]: g["id"] for g in got}


def test_submission_order_after_earlier_rows_and_gaps(db: Database) -> None:
    first = [_work(i, None, None) for i in range(3)]
    db.run_sync(lambda conn: _INSERT_WORK.rows(conn, first))
    # a gap in the ids (a deleted last row) must not shift the numbers of the next bag
    db.run_sync(lambda conn: conn.execute(sa.delete(s.works).where(s.works.c.uid == first[-1]["uid"])))
    bag = [_work(i, "b", None) for i in range(5)]

    def insert(conn: sa.Connection) -> dict[str, int]:
        _INSERT_WORK.rows(conn, bag)
        return _submission_order(conn, bag)

    order = db.run_sync(insert)
    ids = dict(db.run_sync(lambda conn: conn.execute(sa.select(s.works.c.uid, s.works.c.id)).all()))
    assert order == {r["uid"]: ids[r["uid"]] for r in bag}
    assert sorted(order.values()) == [order[r["uid"]] for r in bag], "FIFO order is the order of the bag"


def test_events_with_and_without_optional_fields(db: Database) -> None:
    obj = new_uid()
    db.run_sync(lambda conn: raw.events(conn, 5.0, [
        {"actor": None, "action": "a.full", "object": obj, "source": "PENDING", "target": "RUNNING", "detail": "d"},
        {"actor": None, "action": "a.bare", "object": obj},
        {"actor": obj, "action": "a.target", "object": None, "target": "PENDING"},
    ]))
    got = db.run_sync(lambda conn: [tuple(r) for r in conn.execute(
        sa.select(s.events.c.actor, s.events.c.action, s.events.c.object, s.events.c.source, s.events.c.target,
                  s.events.c.detail, s.events.c.time).order_by(s.events.c.id))])
    assert got == [(None, "a.full", obj, "PENDING", "RUNNING", "d", 5.0), (None, "a.bare", obj, None, None, None, 5.0),
                   (obj, "a.target", None, None, "PENDING", None, 5.0)]
