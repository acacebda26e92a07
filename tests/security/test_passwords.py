"""Passwords: never recoverable from the database; brute force slowed by the per-account rate limit."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest
from cluster import ServerProc

from xwhep.client import Client, XwError
from xwhep.server.ratelimit import Backoff


def test_database_holds_only_argon2id_hashes(make_server: Callable[..., ServerProc]) -> None:
    srv = make_server()
    admin = srv.client()
    admin.create_user("alice", "correct horse battery", "STANDARD_USER")
    passwords = {srv.conf("admin")["password"], srv.conf("worker")["password"], "correct horse battery"}
    db = sqlite3.connect(srv.home / "xwhep.db")
    rows = db.execute("select login, password_hash from users").fetchall()
    assert {r[0] for r in rows} >= {"admin", "worker", "alice"}
    for _, h in rows:
        assert h.startswith("$argon2id$")
        assert not any(p in h for p in passwords)
    raw = (srv.home / "xwhep.db").read_bytes() + (srv.home / "xwhep.db-wal").read_bytes()
    assert not any(p.encode() in raw for p in passwords), "a clear password reached the database files"


def test_failed_logins_are_throttled(make_server: Callable[..., ServerProc]) -> None:
    srv = make_server()
    admin = srv.client()
    admin.create_user("bob", "the right password", "STANDARD_USER")
    wrong = Client(srv.url, ca=str(srv.ca), login="bob", password="guess")
    for _ in range(5):
        with pytest.raises(XwError) as err:
            wrong.login()
        assert err.value.status == 401
    with pytest.raises(XwError) as err:
        Client(srv.url, ca=str(srv.ca), login="bob", password="the right password").login()
    assert err.value.status == 429 and "too many failed logins" in err.value.message
    kinds = [e["action"] for e in admin.events(limit=50)]
    assert kinds.count("auth.login.failed") >= 5 and "auth.login.throttled" in kinds
    # another account from the same address is not locked by bob's failures (below the address limit)
    admin2 = srv.client()
    assert admin2.me()["login"] == "admin"


def test_backoff_doubles_and_forgets() -> None:
    lim = Backoff(3, cap=10.0, forget=100.0)
    assert [lim.fail("k", t) for t in (0.0, 1.0)] == [0.0, 0.0]  # the first failures are free
    assert lim.retry_after("k", 1.5) is None
    assert lim.fail("k", 2.0) == 1.0  # the third waits 1 s, then 2, 4, 8, and never more than the cap
    assert lim.retry_after("k", 2.5) == pytest.approx(0.5)
    assert [lim.fail("k", 3.0 + i) for i in range(5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert lim.retry_after("other", 3.0) is None  # keys are independent
    assert lim.retry_after("k", 7.0 + 150.0) is None  # forgotten after a quiet while
    assert lim.fail("k", 160.0) == 0.0
    lim.fail("k", 161.0)
    assert lim.fail("k", 162.0) == 1.0
    lim.reset("k")
    assert lim.retry_after("k", 162.5) is None


def test_backoff_memory_is_bounded() -> None:
    lim = Backoff(1, max_keys=100)
    for i in range(1000):
        lim.fail(f"k{i}", float(i))
    assert len(lim._keys) <= 100
    assert lim.retry_after("k999", 999.5) is not None  # the latest are kept
