"""Shared fixtures. Keep each group in its own section, with the reason it is shared."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pgserver
import pytest
from cluster import ServerProc

# --- PostgreSQL ----------------------------------------------------------------------------------------------------
# One real server per test session (about a second to start); each test that wants a database gets a fresh one.


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def pg_url_base() -> Iterator[str]:
    """``postgresql+psycopg://postgres@127.0.0.1:PORT`` of a throwaway server (no database in the URL).

    Without PostgreSQL installed the tests that use it skip locally but fail in CI, where .ci/run installs it.
    """
    try:
        server = pgserver.start()
    except pgserver.PostgresUnavailable as exc:
        if _in_ci():
            pytest.fail(f"PostgreSQL is required in CI: {exc}", pytrace=False)
        pytest.skip(str(exc))
    try:
        yield server.url_base
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_url_base: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database for this test only (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = pgserver.create_database(pg_url_base, name)
    try:
        yield url
    finally:
        pgserver.drop_database(pg_url_base, name)


# --- Server processes ----------------------------------------------------------------------------------------------
# End-to-end tests run real server processes (tests/cluster.py); these fixtures start them on either database.


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str | None:
    """None for the embedded SQLite default, or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def make_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProc]]:
    """Start servers with given options; all are stopped at the end of the test."""
    started: list[ServerProc] = []

    def make(db: str | None = None, args: list[str] | None = None) -> ServerProc:
        srv = ServerProc(home=tmp_path_factory.mktemp("server"), db=db, args=args or []).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


# --- A real browser ------------------------------------------------------------------------------------------------
# Playwright's sync API runs its event loop in the main thread for as long as it is open: one session-wide browser
# for every test that needs one (the dashboard's, the worker's status page), never a second sync_playwright().


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless chromium for the whole session (each test gets its own context: no shared storage)."""
    from playwright.sync_api import sync_playwright
    from web.webgrid import launch

    with sync_playwright() as pw:
        b = launch(pw)
        yield b
        b.close()


# --- Small file systems -----------------------------------------------------------------------------------------------
# Disk-full and read-only conditions for real: tmpfs mounts of a few MiB (root only; CI runs as root).


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs file systems (``mount -t tmpfs -o OPTIONS``, e.g. ``size=4m``); unmounted at the end."""
    if os.geteuid() != 0:
        if _in_ci():
            pytest.fail("these tests mount tmpfs: CI runs as root", pytrace=False)
        pytest.skip("needs root (mounts a tmpfs)")
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


# --- Nested runs ---------------------------------------------------------------------------------------------------
# tests/test_readme.py runs the README's `bash .ci/run` in a fresh clone with XW_NESTED_SUITE=1: that inner run keeps
# only the fast, pure tests/core, so the suite neither recurses into itself nor runs everything twice.


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("XW_NESTED_SUITE") != "1":
        return
    core = Path(__file__).resolve().parent / "core"
    keep = [item for item in items if core in item.path.resolve().parents]
    dropped = [item for item in items if core not in item.path.resolve().parents]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
