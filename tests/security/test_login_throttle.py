"""Login throttling without a lockout (issue 13: five bad passwords locked any account, the administrator's
included, for 60 s; twenty locked a whole address). Failures slow down the (account, address) pair, doubling the
wait each time, and an address past a higher threshold; the account's owner logs in from elsewhere at once.

The client's source address is chosen per connection: 127.0.0.1 for the attacker, 127.0.0.2 and 127.0.0.3 for
others (the whole 127/8 is loopback on Linux; the server listens on 127.0.0.1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from cluster import ServerProc


def _from(address: str, srv: ServerProc) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=address, verify=str(srv.ca))
    return httpx.Client(base_url=f"{srv.url}/api/v1", transport=transport, timeout=30.0)


@pytest.fixture
def server(make_server: Callable[..., ServerProc]) -> Iterator[ServerProc]:
    yield make_server()


def test_failed_logins_never_lock_the_account_out(server: ServerProc) -> None:
    password = server.conf("admin")["password"]
    statuses, waits = [], []
    with _from("127.0.0.1", server) as attacker, _from("127.0.0.2", server) as owner:
        for _ in range(50):
            r = attacker.post("/auth/login", json={"login": "admin", "password": "guess"})
            statuses.append(r.status_code)
            if r.status_code == 429:
                waits.append(int(r.headers["Retry-After"]))
                assert r.json()["field"] == "password"
        assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}, statuses
        # the fifth failure imposes 1 s; each try before a wait is over doubles it, up to the cap (60 s)
        assert waits[:5] == [2, 4, 8, 16, 32] and waits[5:] == [60] * 40, waits
        # the right password from the attacker's address waits too
        r = attacker.post("/auth/login", json={"login": "admin", "password": password})
        assert r.status_code == 429
        # the administrator, from another address, logs in at once
        r = owner.post("/auth/login", json={"login": "admin", "password": password})
        assert r.status_code == 200, r.text
        assert r.json()["level"] == "SUPER_USER"


def test_one_address_cannot_spray_many_accounts(server: ServerProc) -> None:
    with _from("127.0.0.3", server) as sprayer, _from("127.0.0.2", server) as other:
        statuses = [sprayer.post("/auth/login", json={"login": f"user{i}", "password": "guess"}).status_code
                    for i in range(25)]
        # one try per account, but the address as a whole is slowed after 20 failures
        assert statuses[:20] == [401] * 20 and statuses[20:] == [429] * 5, statuses
        assert other.post("/auth/login", json={"login": "user1", "password": "guess"}).status_code == 401
        assert other.post("/auth/login", json={"login": "admin", "password": server.conf("admin")["password"]}
                          ).status_code == 200
