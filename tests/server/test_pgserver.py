"""The throwaway PostgreSQL server of the test session is real and hands out separate databases."""

from __future__ import annotations

import pgserver
import psycopg
import pytest

pytestmark = pytest.mark.postgres


def _libpq(url: str) -> str:
    # SQLAlchemy's dialect+driver scheme is not a libpq one
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def test_select_1(pg_url: str) -> None:
    assert pg_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    with psycopg.connect(_libpq(pg_url)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        version = conn.execute("show server_version_num").fetchone()
        assert version is not None
        assert int(version[0]) >= 150000


def test_session_database_exists(pg_url_base: str) -> None:
    with psycopg.connect(_libpq(f"{pg_url_base}/{pgserver.TEST_DB}")) as conn:
        assert conn.execute("select current_database()").fetchone() == (pgserver.TEST_DB,)
        assert conn.execute("show fsync").fetchone() == ("off",)


def test_each_test_gets_a_fresh_database(pg_url: str, pg_url_base: str) -> None:
    with psycopg.connect(_libpq(pg_url)) as conn:
        conn.execute("create table t (x int)")
        conn.commit()
    other = pgserver.create_database(pg_url_base, "xw_other_db")
    try:
        with psycopg.connect(_libpq(other)) as conn:
            assert conn.execute("select count(*) from pg_tables where tablename = 't'").fetchone() == (0,)
    finally:
        pgserver.drop_database(pg_url_base, "xw_other_db")


def test_database_names_are_checked(pg_url_base: str) -> None:
    with pytest.raises(ValueError):
        pgserver.create_database(pg_url_base, 'x"; drop database postgres; --')
