"""Hosts a user may register (issue 13: registering is cheap, and every host is checked by ``why`` and the
scheduler), and the size of the lists a host declares (fed to every work's requirements expression)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import ServerProc

from xwhep.client import Client, XwError


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProc]:
    home = tmp_path / "server"
    home.mkdir()
    (home / "server.toml").write_text("max_hosts_per_user = 3\n")
    srv = ServerProc(home=home).start()
    try:
        yield srv
    finally:
        srv.stop()


def _user(srv: ServerProc, login: str, level: str = "STANDARD_USER") -> Client:
    with srv.client() as admin:
        admin.create_user(login, f"{login}'s password", level)
    return Client(srv.url, ca=str(srv.ca), login=login, password=f"{login}'s password")


def test_hosts_per_user_are_capped(server: ServerProc) -> None:
    with _user(server, "alice") as alice:
        hosts = [alice.register_host({"name": f"pc{i}"}) for i in range(3)]
        with pytest.raises(XwError) as err:
            alice.register_host({"name": "pc3"})
        assert err.value.status == 403 and err.value.field == "hosts"
        assert "alice already owns 3 hosts, at most 3 per user" in err.value.message, err.value.message
        # an existing host re-registers with its key (a worker restarting keeps its uid)
        again = alice.register_host({"uid": hosts[0]["uid"], "key": hosts[0]["key"], "name": "pc0", "memory": 2048})
        assert again["uid"] == hosts[0]["uid"]
        assert sum(1 for h in alice.hosts() if h["owner"] == alice.me()["uid"]) == 3
        # a re-registration without the key is a new host: refused past the cap too
        with pytest.raises(XwError) as err:
            alice.register_host({"uid": hosts[0]["uid"], "name": "pc0"})
        assert err.value.status == 403 and err.value.field == "hosts"
    with _user(server, "bob") as bob:  # the cap is per user
        bob.register_host({"name": "bobs-pc"})
    # a worker identity (a pool of workers) and the administrator are not capped
    with server.client("worker") as worker, server.client() as admin:
        for i in range(5):
            worker.register_host({"name": f"pool{i}"})
            admin.register_host({"name": f"admin{i}"})


@pytest.mark.parametrize("field", ["apptypes", "datas", "packages"])
def test_host_lists_are_bounded_at_registration(server: ServerProc, field: str) -> None:
    too_many: list[str] | dict[str, str] = [f"item{i}" for i in range(257)]
    if field == "packages":
        too_many = {f"pkg{i}": "1.0" for i in range(257)}
    with server.client("worker") as worker:
        with pytest.raises(XwError) as err:
            worker.register_host({"name": "big", field: too_many})
        assert err.value.status == 400 and err.value.field == field
        assert err.value.message.startswith(f"{field}: 257 items, at most 256"), err.value.message
        worker.register_host({"name": "fits", field: too_many[:256] if isinstance(too_many, list)
                              else dict(list(too_many.items())[:256])})
