"""Passwords: never recoverable from the database; brute force slowed by the per-account rate limit."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest
from cluster import ServerProc

from xwhep.client import Client, XwError
from xwhep.server.ratelimit import FailureLimiter


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


def test_limiter_window_slides() -> None:
    lim = FailureLimiter(3, 10.0)
    for t in (0.0, 1.0, 2.0):
        assert lim.retry_after("k", t) is None
        lim.fail("k", t)
    assert lim.retry_after("k", 2.5) == pytest.approx(7.5)
    assert lim.retry_after("k", 10.5) is None  # the first failure aged out
    lim.reset("k")
    assert lim.retry_after("k", 3.0) is None
