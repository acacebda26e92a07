"""OpenID Connect: device-flow login and bearer JWTs against a real provider on loopback (tests/oidcprovider.py).

One xwhep server trusts two issuers:

* ``p1`` issues RFC 9068 JWT access tokens for the audience ``xwhep``; users are matched by subject and
  registered on first sight (``auto_register = true``);
* ``p2`` issues opaque access tokens, so the client stores the ID token (audience = the client id); users are
  matched by verified e-mail and never registered automatically.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import re
import secrets
import ssl
import stat
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from cluster import ServerProc
from joserfc.jwk import OctKey
from oidcprovider import OidcProvider

from xwhep.client import Client, XwError
from xwhep.client.oidc import OidcLoginError, choose_token, device_login, login_oidc, store_token
from xwhep.server.db import schema
from xwhep.server.db.engine import Database
from xwhep.server.oidc import OidcConfigError, OidcVerifier


@pytest.fixture(scope="module")
def p1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    p = OidcProvider(tmp_path_factory.mktemp("p1")).start()
    p.add_client("xw-cli", access_audience="xwhep")
    for name in ("alice", "dave", "erin"):
        p.add_user(name, f"{name}@p1.example")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def p2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    p = OidcProvider(tmp_path_factory.mktemp("p2")).start()
    p.add_client("xw-id")  # opaque access tokens: the ID token is what reaches xwhep
    p.add_user("bob", "Bob@Example.org")
    p.add_user("carol", "carol@example.org", email_verified=False)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, p1: OidcProvider, p2: OidcProvider) -> Iterator[ServerProc]:
    home = tmp_path_factory.mktemp("oidc-server")
    (home / "server.toml").write_text(f"""
[[oidc]]
issuer = "{p1.issuer}"
audience = "xwhep"
client_id = "xw-cli"
auto_register = true
ca = "{p1.ca}"
jwks_min_refresh = 0

[[oidc]]
issuer = "{p2.issuer}"
audience = "xw-id"
client_id = "xw-id"
user_claim = "email"
auto_register = false
ca = "{p2.ca}"
""")
    s = ServerProc(home=home).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def admin(srv: ServerProc) -> Iterator[Client]:
    with srv.client() as c:
        yield c


def user_conf(srv: ServerProc, provider: OidcProvider, path: Path) -> Path:
    """A fresh person's client config: the server and its CA, the issuer's CA; no credential yet."""
    path.write_text(f'server = "{srv.url}"\nca = "{srv.ca}"\noidc_ca = "{provider.ca}"\n')
    return path


def device_login_in_thread(conf: Path, provider: OidcProvider, username: str) -> dict[str, Any]:
    """``login_oidc`` as ``xw login --oidc`` runs it; the test plays the person at the browser."""
    shown: queue.Queue[str] = queue.Queue()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = login_oidc(conf, issuer=provider.issuer, prompt=shown.put)
        except Exception as exc:  # handed to the test thread
            outcome["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    message = shown.get(timeout=20)
    url = re.search(r"open (https://\S+\?user_code=[A-Z-]+)", message)
    assert url, message
    with httpx.Client(verify=ssl.create_default_context(cafile=str(provider.ca))) as browser:
        page = browser.get(url.group(1))
        assert page.status_code == 200 and "user_code" in page.text
        code = url.group(1).rsplit("=", 1)[1]
        assert browser.post(provider.issuer + "/device/approve",
                            data={"user_code": code, "username": username}).status_code == 200
    t.join(30)
    assert not t.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]  # type: ignore[no-any-return]


def events(admin: Client, action: str) -> list[dict[str, Any]]:
    return [e for e in admin.events(limit=500) if e["action"] == action]


def status_of(srv: ServerProc, token: str) -> int:
    with Client(srv.url, ca=str(srv.ca), token=token) as c:
        try:
            c.me()
        except XwError as exc:
            return exc.status or 0
    return 200


# -- discovery ---------------------------------------------------------------------------------------------------

def test_server_advertises_its_issuers(srv: ServerProc, p1: OidcProvider, p2: OidcProvider) -> None:
    # anonymous: a client asks before it has any credential
    r = httpx.get(srv.url + "/api/v1/auth/oidc", verify=ssl.create_default_context(cafile=str(srv.ca)))
    assert r.status_code == 200
    assert r.json()["issuers"] == [
        {"issuer": p1.issuer, "audience": "xwhep", "client_id": "xw-cli"},
        {"issuer": p2.issuer, "audience": "xw-id", "client_id": "xw-id"},
    ]


# -- the device flow end to end ----------------------------------------------------------------------------------

def test_device_flow_logs_in_and_auto_registers(srv: ServerProc, admin: Client, p1: OidcProvider,
                                                tmp_path: Path) -> None:
    conf = user_conf(srv, p1, tmp_path / "alice.conf")
    result = device_login_in_thread(conf, p1, "alice")
    assert result["token_kind"] == "access_token" and result["client_id"] == "xw-cli"
    stored = tomllib.loads(conf.read_text())
    assert stored["server"] == srv.url and stored["oidc_ca"] == str(p1.ca)  # other keys kept
    assert stored["token"].count(".") == 2
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600

    with Client.from_config(conf) as alice:
        me = alice.me()
        for _ in range(3):
            assert alice.me()["uid"] == me["uid"]
    assert me["login"] == "alice" and me["level"] == "STANDARD_USER"
    assert me["oidc_subject"] == f"{p1.issuer}|{p1.users['alice'].sub}"
    assert me["email"] == "alice@p1.example"
    assert [e["object"] for e in events(admin, "auth.oidc.register")].count(me["uid"]) == 1
    # verified once per token, not on every request
    assert [e["object"] for e in events(admin, "auth.oidc")].count(me["uid"]) == 1

    # the same person again, with a token minted directly: matched by subject, not registered twice
    assert status_of(srv, p1.mint("alice")) == 200
    assert [e["object"] for e in events(admin, "auth.oidc.register")].count(me["uid"]) == 1
    assert [u["login"] for u in admin.users()].count("alice") == 1


def test_device_flow_refused_until_an_admin_creates_the_user(srv: ServerProc, admin: Client, p2: OidcProvider,
                                                             tmp_path: Path) -> None:
    conf = user_conf(srv, p2, tmp_path / "bob.conf")
    result = device_login_in_thread(conf, p2, "bob")
    assert result["token_kind"] == "id_token"  # opaque access token: the ID token (aud = client id) is stored

    with Client.from_config(conf) as bob, pytest.raises(XwError) as refused:
        bob.me()
    assert refused.value.status == 401
    failed = [e["detail"] for e in events(admin, "auth.oidc.failed")]
    assert any(p2.issuer in d and "auto-registration is off" in d for d in failed), failed
    assert "bob" not in [u["login"] for u in admin.users()]

    # the administrator registers the person by e-mail (any case); the stored token now works
    admin.create_user("bob", email="bob@example.org")
    with Client.from_config(conf) as bob:
        me = bob.me()
    assert me["login"] == "bob"
    assert me["oidc_subject"] == f"{p2.issuer}|{p2.users['bob'].sub}"  # linked on first use
    assert me["uid"] in [e["object"] for e in events(admin, "auth.oidc.link")]


# -- bearer JWTs ---------------------------------------------------------------------------------------------------

def test_bearer_jwt_from_the_provider_works(srv: ServerProc, admin: Client, p1: OidcProvider) -> None:
    with Client(srv.url, ca=str(srv.ca), token=p1.mint("dave", aud=["some-api", "xwhep"])) as dave:
        me = dave.me()
    assert me["login"] == "dave" and me["level"] == "STANDARD_USER"
    assert me["uid"] in [e["object"] for e in events(admin, "auth.oidc.register")]


def test_key_rotation_is_followed(srv: ServerProc, p1: OidcProvider) -> None:
    assert status_of(srv, p1.mint("erin")) == 200
    p1.rotate_key()  # a kid the server has not seen: it refetches the JWKS once
    assert status_of(srv, p1.mint("erin")) == 200


REFUSED = {
    # name: (mint arguments, the reason logged in auth.oidc.failed; None: not logged, the issuer is unknown)
    "expired": (dict(expires_in=-120), "token expired"),
    "expired-long-ago": (dict(issued_ago=7200, expires_in=3600), "token expired"),
    "wrong-audience": (dict(aud="another-service"), "token audience is not 'xwhep'"),
    "no-audience": (dict(claims={"aud": None}), "lacks the 'aud' claim"),
    "wrong-issuer": (dict(iss="https://idp.evil.example"), None),
    "not-yet-valid": (dict(nbf_in=600), "not yet valid"),
    "issued-in-the-future": (dict(issued_ago=-600, expires_in=1200), "not yet valid"),
    "alg-none": (dict(alg="none", key=None), "signature algorithm 'none' not accepted"),
    "alg-hs256": (dict(alg="HS256", key=OctKey.import_key(secrets.token_bytes(32))),
                  "signature algorithm 'HS256' not accepted"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_tokens(case: str, srv: ServerProc, admin: Client, p1: OidcProvider) -> None:
    kwargs, reason = REFUSED[case]
    token = p1.mint("alice", **kwargs)  # type: ignore[arg-type]
    before = len(events(admin, "auth.oidc.failed"))
    assert status_of(srv, token) == 401
    failed = events(admin, "auth.oidc.failed")
    if reason is None:
        assert len(failed) == before  # not ours to judge: no event either
    else:
        assert reason in failed[-1]["detail"] and p1.issuer in failed[-1]["detail"], failed[-1]


def test_refused_keys(srv: ServerProc, admin: Client, p1: OidcProvider, p2: OidcProvider) -> None:
    # signed by a key the issuer never published (unknown kid: refetched once, still unknown)
    assert status_of(srv, p1.mint("alice", key=p1.new_key())) == 401
    assert "no key" in events(admin, "auth.oidc.failed")[-1]["detail"]
    # a foreign key that claims the issuer's kid
    forged = p1.mint("alice", key=p1.new_key(), header={"kid": p1.signing_key.kid})
    assert status_of(srv, forged) == 401
    assert "bad signature" in events(admin, "auth.oidc.failed")[-1]["detail"]
    # one configured issuer's key cannot speak for the other
    assert status_of(srv, p1.mint("alice", iss=p2.issuer, aud="xw-id")) == 401
    assert p2.issuer in events(admin, "auth.oidc.failed")[-1]["detail"]


def test_unverified_email_is_not_trusted(srv: ServerProc, admin: Client, p2: OidcProvider) -> None:
    admin.create_user("carol", email="carol@example.org")
    token = p2.mint("carol", aud="xw-id")  # email_verified = false at the issuer
    assert status_of(srv, token) == 401
    assert "no verified e-mail" in events(admin, "auth.oidc.failed")[-1]["detail"]


# -- the device flow's protocol details (client against the provider alone) --------------------------------------

def test_device_flow_honours_interval_and_slow_down(p1: OidcProvider) -> None:
    waits: list[float] = []
    codes: list[str] = []

    def prompt(message: str) -> None:
        codes.append(re.search(r"enter the code (\S+)", message).group(1))  # type: ignore[union-attr]

    def sleep(seconds: float) -> None:
        waits.append(seconds)  # too short on purpose: the provider answers slow_down
        time.sleep(0.01)
        if len(waits) == 4:
            p1.approve(codes[0], "alice")

    answer = device_login(p1.issuer, "xw-cli", ca=str(p1.ca), prompt=prompt, sleep=sleep)
    assert answer["token_type"] == "Bearer" and "id_token" in answer
    # 1 s as asked, then each slow_down adds 5 s for good (an authorization_pending keeps the pace)
    assert waits[0] == 1 and max(waits) > 1, waits
    assert all(b - a in (0, 5) for a, b in itertools.pairwise(waits)), waits


@pytest.mark.parametrize("ending", ["denied", "expired"])
def test_device_flow_stops_when_denied_or_expired(p1: OidcProvider, ending: str) -> None:
    codes: list[str] = []

    def prompt(message: str) -> None:
        codes.append(re.search(r"enter the code (\S+)", message).group(1))  # type: ignore[union-attr]

    def sleep(_: float) -> None:
        time.sleep(0.01)
        if ending == "denied":
            p1.approve(codes[0], "alice", approve=False)
        else:
            p1.expire(codes[0])

    with pytest.raises(OidcLoginError, match=ending):
        device_login(p1.issuer, "xw-cli", ca=str(p1.ca), prompt=prompt, sleep=sleep)


def test_login_needs_a_token_for_the_servers_audience(p1: OidcProvider) -> None:
    response = {"access_token": "opaque-value", "id_token": p1.mint("alice", aud="xw-cli")}
    assert choose_token(response, "xw-cli") == (response["id_token"], "id_token")
    with pytest.raises(OidcLoginError, match="audience 'xwhep'"):
        choose_token(response, "xwhep")


# -- configuration files -------------------------------------------------------------------------------------------

def test_store_token_keeps_the_rest_of_the_config(tmp_path: Path) -> None:
    conf = tmp_path / "client.conf"
    conf.write_text('server = "https://h:4330"\n# mine\nlogin = "alice"\ntoken = "old"\n\n[extra]\ntoken = "not me"\n')
    conf.chmod(0o644)
    store_token(conf, "a.b.c")
    data = tomllib.loads(conf.read_text())
    assert data == {"server": "https://h:4330", "login": "alice", "token": "a.b.c", "extra": {"token": "not me"}}
    assert "# mine" in conf.read_text()
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
    broken = tmp_path / "broken.conf"
    broken.write_text("server = \n")
    with pytest.raises(OidcLoginError, match="not valid TOML"):
        store_token(broken, "a.b.c")
    assert broken.read_text() == "server = \n"


@pytest.mark.parametrize("table, message", [
    ({"issuer": "http://idp.example.org", "audience": "x"}, "https"),
    ({"issuer": "https://idp.example.org"}, "audience"),
    ({"issuer": "https://idp.example.org", "audience": "x", "level": "SUPER_USER"}, "at most STANDARD_USER"),
    ({"issuer": "https://idp.example.org", "audience": "x", "user_claim": "name"}, "user_claim"),
])
def test_bad_issuer_settings_are_refused(table: dict[str, Any], message: str) -> None:
    with pytest.raises(OidcConfigError, match=message):
        OidcVerifier([table])


def test_cached_keys_outlive_an_unreachable_issuer(p1: OidcProvider, tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    db.migrate()
    verifier = OidcVerifier([{"issuer": p1.issuer, "audience": "xwhep", "ca": str(p1.ca), "auto_register": True}])

    async def scenario() -> tuple[Any, Any, Any]:
        first = await verifier.verify(p1.mint("alice"), db)
        issuer = next(iter(verifier.issuers.values()))
        issuer.discovery_at = issuer.jwks_at = 0.0  # everything is stale…
        issuer._ssl = ssl.create_default_context()  # …and the issuer can no longer be reached (its CA is unknown)
        second = await verifier.verify(p1.mint("alice"), db)
        fresh = OidcVerifier([{"issuer": p1.issuer, "audience": "xwhep", "auto_register": True}])
        never = await fresh.verify(p1.mint("alice"), db)  # no keys ever fetched: nothing to fall back on
        return first, second, never

    first, second, never = asyncio.run(scenario())
    assert first is not None and second is not None and second.uid == first.uid
    assert never is None
    failed = db.run_sync(lambda conn: [r.detail for r in conn.execute(
        sa.select(schema.events).where(schema.events.c.action == "auth.oidc.failed"))])
    assert len(failed) == 1 and "cannot fetch the discovery document" in failed[0]
    db.dispose()
