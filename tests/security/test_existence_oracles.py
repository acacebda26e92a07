"""No existence oracles for strangers (issue 13): where a request names something the caller may not see, the
answer is the same whether it exists or not; and knowing a checksum never hands over another user's bytes
(the upload is skipped only for bytes the caller already reads)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster import ServerProc
from sdkworker import SdkWorker

from xwhep.client import Client, XwError


@dataclass
class World:
    srv: ServerProc
    admin: Client
    alice: Client
    bob: Client


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    srv = ServerProc(home=tmp_path_factory.mktemp("server")).start()
    admin = srv.client()
    clients = {}
    for login, level in (("alice", "STANDARD_USER"), ("bob", "STANDARD_USER"), ("portal", "MANDATED_USER")):
        admin.create_user(login, f"{login}'s password", level)
        clients[login] = Client(srv.url, ca=str(srv.ca), login=login, password=f"{login}'s password")
    prog = tmp_path_factory.mktemp("app") / "noop.sh"
    prog.write_text("#!/bin/sh\ntrue\n")
    admin.put_app("noop", binaries={"linux/x86_64": prog})
    try:
        yield World(srv, admin, clients["alice"], clients["bob"])
    finally:
        for c in (admin, *clients.values()):
            c.close()
        srv.stop()


def _refusal(call: object) -> tuple[int | None, str]:
    with pytest.raises(XwError) as err:
        call()  # type: ignore[operator]
    return err.value.status, err.value.message


def test_mandate_to_unknown_or_wrong_level_user_answers_the_same(world: World) -> None:
    """POST /mandates answered 400 "bob is STANDARD_USER" for an existing user, 404 for an unknown one."""
    existing = _refusal(lambda: world.alice.grant_mandate("bob"))
    unknown = _refusal(lambda: world.alice.grant_mandate("nosuchuser"))
    assert existing[0] == unknown[0] == 404
    assert existing[1].replace("'bob'", "'X'") == unknown[1].replace("'nosuchuser'", "'X'"), (existing, unknown)
    assert "STANDARD_USER" not in existing[1]
    assert world.alice.grant_mandate("portal")["mandatary_login"] == "portal"  # the real one works
    # an administrator, who lists users anyway, is told the level
    status, message = _refusal(lambda: world.admin.grant_mandate("bob"))
    assert status == 400 and "bob is STANDARD_USER, not MANDATED_USER" in message


def test_mandate_for_another_mandator_answers_the_same(world: World) -> None:
    """Naming another user as mandator: 403 for an existing one, 404 for an unknown one, before."""
    existing = _refusal(lambda: world.alice.grant_mandate("portal", mandator="bob"))
    unknown = _refusal(lambda: world.alice.grant_mandate("portal", mandator="nosuchuser"))
    assert existing == unknown
    assert existing[0] == 403
    assert world.alice.grant_mandate("portal", mandator="alice")["mandator_login"] == "alice"


def test_a_checksum_does_not_hand_over_another_users_bytes(world: World, tmp_path: Path) -> None:
    """Declaring the sha256 and size of bytes the server holds made a data AVAILABLE at once: the bytes of
    another user's private data, to anyone who knew their checksum."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"bob's private bytes\n")
    sha, size = hashlib.sha256(secret.read_bytes()).hexdigest(), secret.stat().st_size
    bobs = world.bob.put_data(secret)
    assert bobs["status"] == "AVAILABLE" and bobs["access_rights"] == "0x700"
    claim = world.alice.create_data("stolen.txt", size=size, sha256=sha)
    assert claim["status"] == "UNAVAILABLE"  # she must send the bytes, as for anything new
    status, _ = _refusal(lambda: world.alice.download(claim["uid"], tmp_path / "out.txt"))
    assert status == 409 and not (tmp_path / "out.txt").exists()
    # bob himself skips the upload: he has the bytes already
    assert world.bob.create_data("again.txt", size=size, sha256=sha)["status"] == "AVAILABLE"


def test_a_worker_cannot_claim_another_users_bytes_as_a_result(world: World, tmp_path: Path) -> None:
    """A result report naming stored bytes completed the work without an upload: alice's own worker could make
    bob's private bytes the result of alice's work."""
    secret = b"bob's other private bytes\n"
    (tmp_path / "s.txt").write_bytes(secret)
    world.bob.put_data(tmp_path / "s.txt")
    worker = SdkWorker(world.alice, "alices-pc")  # her own host: it runs her works
    uid = world.alice.submit("noop")["uid"]
    (task,) = worker.take()
    assert task["work"] == uid
    out = worker.finish(task["task"], result=secret, upload=False)
    assert out["outcome"] == "upload"  # send the bytes first
    assert world.alice.work(uid)["status"] == "DATAREQUEST"
