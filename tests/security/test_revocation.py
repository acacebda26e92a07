"""Issue 13: deleted users came back after a restart (deletion was kept only in memory), and tokens outlived
password changes and resets by an hour. Revocation is now in the database (no row; ``users.tokens_after``) and
takes effect at once, on both databases, and after a restart."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cluster import ServerProc

from xwhep.client import Client, XwError


def _refused(client: Client, call: Callable[[Client], object]) -> str:
    with pytest.raises(XwError) as err:
        call(client)
    assert err.value.status == 401, err.value
    return err.value.message


def _token_client(srv: ServerProc, token: str | None) -> Client:
    """A client holding only ``token`` (no credentials to log in again with)."""
    assert token
    return Client(srv.url, ca=str(srv.ca), token=token)


def test_deleted_user_stays_revoked_after_restart(make_server: Callable[..., ServerProc], db_url: str | None) -> None:
    srv = make_server(db=db_url)
    admin = srv.client()
    user = admin.create_user("ghost", "ghost-password")
    ghost = Client(srv.url, ca=str(srv.ca), login="ghost", password="ghost-password")
    ghost.me()
    token = ghost._token
    admin.delete_user(user["uid"])
    assert "no longer exists" in _refused(_token_client(srv, token), lambda c: c.create_data("x", 1, "0" * 64))
    srv.restart()
    # the token is still within its hour and signed by the same secret: only the database remembers the deletion
    assert "no longer exists" in _refused(_token_client(srv, token), lambda c: c.create_data("x", 1, "0" * 64))
    assert "no longer exists" in _refused(_token_client(srv, token), lambda c: c.works())


@pytest.mark.parametrize("by", ["self", "admin"])
def test_password_change_voids_older_tokens(make_server: Callable[..., ServerProc], db_url: str | None,
                                            by: str) -> None:
    srv = make_server(db=db_url)
    admin = srv.client()
    user = admin.create_user("pw", "first-password")
    pw = Client(srv.url, ca=str(srv.ca), login="pw", password="first-password")
    pw.me()
    old = pw._token
    (pw if by == "self" else admin)._send("POST", f"/users/{user['uid']}/password",
                                          json={"password": "second-password"})
    assert "revoked" in _refused(_token_client(srv, old), lambda c: c.me())
    fresh = Client(srv.url, ca=str(srv.ca), login="pw", password="second-password")
    assert fresh.me()["login"] == "pw"  # a token issued after the change counts
    with pytest.raises(XwError) as err:
        Client(srv.url, ca=str(srv.ca), login="pw", password="first-password").me()
    assert err.value.status == 401
    srv.restart()
    assert "revoked" in _refused(_token_client(srv, old), lambda c: c.me())
    assert _token_client(srv, fresh._token).me()["login"] == "pw"


def test_revoke_ends_every_session_but_not_the_hosts_keys(make_server: Callable[..., ServerProc]) -> None:
    srv = make_server()
    admin = srv.client()
    worker = srv.client("worker")
    reg = worker.register_host({"name": "h"})
    host = worker.host_client(reg)
    host.alive(reg["uid"])
    old_user, old_host = worker._token, host._token
    uid = worker.me()["uid"]
    admin._send("POST", f"/users/{uid}/revoke")
    assert "revoked" in _refused(_token_client(srv, old_user), lambda c: c.me())
    assert "revoked" in _refused(_token_client(srv, old_host), lambda c: c.alive(reg["uid"]))
    # the host renews its token with its own key; the worker credential logs in again
    assert host.alive(reg["uid"])["tasks"] == {}
    assert worker.me()["uid"] == uid
    # a user may end its own sessions, not another's (no existence leak either)
    admin.create_user("carol", "carol-password")
    carol = Client(srv.url, ca=str(srv.ca), login="carol", password="carol-password")
    with pytest.raises(XwError) as err:
        carol._send("POST", f"/users/{uid}/revoke")
    assert err.value.status == 404
