"""Mandates: a MANDATED_USER acts on behalf of a user who mandated it, recorded as such; nobody else can.

Real server processes (both databases for the life cycle), the SDK, and the installed ``xw`` script.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import ServerProc

from xwhep.client import Client, XwError

BIN = Path(sys.executable).parent


def _client(srv: ServerProc, login: str, password: str, on_behalf_of: str | None = None) -> Client:
    return Client(srv.url, ca=str(srv.ca), login=login, password=password, on_behalf_of=on_behalf_of)


def _refused(call: Callable[[], object], status: int) -> str:
    with pytest.raises(XwError) as err:
        call()
    assert err.value.status == status, err.value
    return err.value.message


def _users(admin: Client) -> None:
    admin.create_user("alice", "alice's password", "STANDARD_USER")
    admin.create_user("mallory", "mallory's password", "STANDARD_USER")
    admin.create_user("portal", "portal's password", "MANDATED_USER")
    admin.create_user("eve", "eve's password1", "MANDATED_USER")


def test_mandate_life_cycle(make_server: Callable[..., ServerProc], db_url: str | None) -> None:
    srv = make_server(db_url)
    admin = srv.client()
    _users(admin)
    alice = _client(srv, "alice", "alice's password")
    mandate = alice.grant_mandate("portal")
    assert mandate["mandator_login"] == "alice" and mandate["mandatary_login"] == "portal"
    assert mandate["expires"] is None

    # the portal, acting for alice, is alice: what it creates is hers and private to her
    as_alice = _client(srv, "portal", "portal's password", on_behalf_of="alice")
    assert as_alice.me()["login"] == "alice"
    data = as_alice.create_data("notes.txt", access_rights="0x700")
    assert data["owner"] == alice.me()["uid"]
    assert data["uid"] in {d["uid"] for d in alice.datas()}
    portal = _client(srv, "portal", "portal's password")
    assert portal.me()["login"] == "portal"
    _refused(lambda: portal.get(data["uid"]), 404)  # on its own, the portal sees nothing of alice's
    _refused(lambda: _client(srv, "mallory", "mallory's password").get(data["uid"]), 404)

    # every use is recorded, naming both
    portal_uid = portal.me()["uid"]
    uses = [e for e in admin.events(alice.me()["uid"], limit=100) if e["action"] == "mandate.use"]
    assert uses and all(e["actor"] == portal_uid for e in uses)
    assert any("POST /api/v1/datas" in (e["detail"] or "") for e in uses)

    # a mandate gives no hold on credentials or on mandates
    msg = _refused(lambda: as_alice.grant_mandate("eve"), 403)
    assert "mandated request" in msg
    _refused(lambda: as_alice._send("POST", f"/users/{alice.me()['uid']}/password",
                                    json={"password": "taken over!"}), 403)
    assert alice.me()["login"] == "alice"  # alice's password still works

    # revoked: refused at the very next request
    alice.revoke_mandate(mandate["uid"])
    msg = _refused(as_alice.me, 403)
    assert "no mandate" in msg
    assert alice.mandates() == []
    denied = [e for e in admin.events(limit=200) if e["action"] == "access.denied" and e["actor"] == portal_uid]
    assert denied and "no mandate" in denied[-1]["detail"]


def test_who_may_act_for_whom(make_server: Callable[..., ServerProc]) -> None:
    srv = make_server()
    admin = srv.client()
    _users(admin)
    alice = _client(srv, "alice", "alice's password")
    alice.grant_mandate("portal")
    # another mandated user, the same one for someone else, an unknown user: one answer, no existence leak
    for login, password, behalf in (("eve", "eve's password1", "alice"), ("portal", "portal's password", "mallory"),
                                    ("portal", "portal's password", "nobody-at-all")):
        msg = _refused(_client(srv, login, password, on_behalf_of=behalf).me, 403)
        assert f"{behalf} gave {login} no mandate" in msg
    # only MANDATED_USER acts for others, even with a mandate-shaped header
    msg = _refused(_client(srv, "mallory", "mallory's password", on_behalf_of="alice").me, 403)
    assert "only a MANDATED_USER" in msg
    # the header by uid and by URI work as the login does
    alice_uid = alice.me()["uid"]
    for ref in (alice_uid, alice.uri(alice_uid)):
        assert _client(srv, "portal", "portal's password", on_behalf_of=ref).me()["uid"] == alice_uid
    # an empty header is a 400 naming it
    portal = _client(srv, "portal", "portal's password")
    with pytest.raises(XwError) as err:
        portal._send("GET", "/me", headers={"X-Xw-On-Behalf-Of": ""})
    assert err.value.status == 400 and err.value.field == "X-Xw-On-Behalf-Of"
    # the worker's hot path hands a mandated call to the full stack: still refused for a non-worker
    _refused(lambda: _client(srv, "portal", "portal's password", on_behalf_of="alice")._send(
        "POST", f"/hosts/{alice_uid}/sync", json={}), 404)


def test_grant_rules(make_server: Callable[..., ServerProc]) -> None:
    srv = make_server()
    admin = srv.client()
    _users(admin)
    alice = _client(srv, "alice", "alice's password")
    msg = _refused(lambda: alice.grant_mandate("mallory"), 404)  # as for an unknown user: no existence oracle
    assert msg.startswith("mandatary: no MANDATED_USER 'mallory'"), msg
    with pytest.raises(XwError) as err:
        alice.grant_mandate("portal", expires_in=0)
    assert err.value.status == 400 and err.value.field == "expires_in"
    _refused(lambda: alice.grant_mandate("portal", mandator="mallory"), 403)
    worker = Client.from_config(srv.worker_conf)
    _refused(lambda: worker.grant_mandate("portal"), 403)
    # an administrator gives one for a user; granting again renews it instead of adding a second
    m1 = admin.grant_mandate("portal", mandator="mallory", expires_in=3600)
    m2 = admin.grant_mandate("portal", mandator="mallory")
    assert m1["uid"] == m2["uid"] and m1["expires"] is not None and m2["expires"] is None
    mallory = _client(srv, "mallory", "mallory's password")
    assert [m["uid"] for m in mallory.mandates()] == [m1["uid"]]
    assert alice.mandates() == []  # not hers to see
    _refused(lambda: alice.revoke_mandate(m1["uid"]), 404)
    # the mandatary may give its mandate up
    portal = _client(srv, "portal", "portal's password")
    portal.revoke_mandate(m1["uid"])
    assert mallory.mandates() == []


def test_expired_and_deleted(make_server: Callable[..., ServerProc]) -> None:
    srv = make_server()
    admin = srv.client()
    _users(admin)
    alice = _client(srv, "alice", "alice's password")
    m = alice.grant_mandate("portal", expires_in=3600)
    as_alice = _client(srv, "portal", "portal's password", on_behalf_of="alice")
    assert as_alice.me()["login"] == "alice"
    # move the expiry into the past in the database itself (the server keeps no copy of mandates)
    with sqlite3.connect(srv.home / "xwhep.db") as db:
        db.execute("UPDATE mandates SET expires = ? WHERE uid = ?", (time.time() - 1, m["uid"]))
    assert "expired" in _refused(as_alice.me, 403)
    alice.grant_mandate("portal")  # renewed without an end
    assert as_alice.me()["login"] == "alice"
    admin.delete_user(alice.me()["uid"])
    _refused(as_alice.me, 403)
    assert _client(srv, "portal", "portal's password").mandates() == []


def test_cli_mandates(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client()
    _users(admin)

    def conf(login: str, password: str) -> Path:
        path = tmp_path / f"{login}.conf"
        path.write_text(f'server = "{srv.url}"\nca = "{srv.ca}"\nlogin = "{login}"\npassword = "{password}"\n')
        return path

    def xw(config: Path, *argv: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "HOME": str(tmp_path), "XW_CONFIG": str(config)}
        env.pop("XW_ON_BEHALF_OF", None)
        p = subprocess.run([str(BIN / "xw"), *argv], capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == rc, (p.stdout, p.stderr)
        assert "Traceback" not in p.stderr
        return p

    alice_conf, portal_conf = conf("alice", "alice's password"), conf("portal", "portal's password")
    uri = xw(alice_conf, "mandate", "grant", "portal").stdout.strip()
    assert uri.startswith("xw://")
    listed = xw(alice_conf, "mandate", "--xwformat", "csv").stdout
    assert "alice" in listed and "portal" in listed and uri.rsplit("/", 1)[1] in listed
    note = tmp_path / "note.txt"
    note.write_text("for alice\n")
    sent = xw(portal_conf, "senddata", str(note), "--xwonbehalfof", "alice").stdout.strip()
    alice = _client(srv, "alice", "alice's password")
    assert alice.get(sent)["owner"] == alice.me()["uid"]
    refused = xw(portal_conf, "senddata", str(note), "--xwonbehalfof", "mallory", rc=1)
    assert refused.stderr.count("\n") == 1 and "gave portal no mandate" in refused.stderr
    xw(alice_conf, "mandate", "revoke", uri)
    assert xw(alice_conf, "mandate").stdout.strip() == ""
    usage = xw(alice_conf, "mandate", "grant", rc=2)
    assert "usage" in usage.stderr
