"""The Alembic migrations build exactly the schema the code declares (db/schema.py), on both databases, and the
partial indexes of the hot bulk insert are used by the queries that need them."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from xwhep.server.db import schema
from xwhep.server.db.engine import Database


@pytest.fixture(params=["sqlite", "postgres"])
def migrated(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    url = f"sqlite:///{tmp_path / 'x.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    db = Database(url)
    db.migrate()
    request.addfinalizer(db.dispose)
    return db


def test_migrations_match_the_declared_schema(migrated: Database) -> None:
    with migrated.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert diff == [], diff


def test_group_index_is_partial_and_used(migrated: Database) -> None:
    with migrated.engine.connect() as conn:
        indexes = {ix["name"]: ix for ix in sa.inspect(conn).get_indexes("works")}
        for col in ("grp", "session", "replica_of"):
            assert f"ix_works_{col}" in indexes
        if migrated.is_sqlite:
            sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'ix_works_grp'").scalar()
            assert "WHERE grp IS NOT NULL" in str(sql)
            plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT uid FROM works WHERE grp = 'g'"))
        else:
            pred = conn.exec_driver_sql("SELECT pg_get_expr(indpred, indrelid) FROM pg_index "
                                        "WHERE indexrelid = 'ix_works_grp'::regclass").scalar()
            assert "grp IS NOT NULL" in str(pred)
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = " ".join(str(r[0]) for r in conn.exec_driver_sql(
                "EXPLAIN SELECT uid FROM works WHERE grp = 'g'"))
        assert "ix_works_grp" in plan, plan
