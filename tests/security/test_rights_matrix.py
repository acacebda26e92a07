"""The rights matrix, generated from one table: usage level × object type × action × rights (owner/group/other).

Every cell is checked through the real API of a real server: allowed → 2xx; refused → 403 when the caller may
read the object, 404 when it may not even know it exists; and every listing shows exactly the readable objects.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import ServerProc

from xwhep.client import Client, XwError

# -- the one table ----------------------------------------------------------------------------------------------
# actor → (usage level, in the owner's group?, rule). Rules: "all" (administrators, the group's administrator),
# "owner" (everything; execute per the owner x bit), "group"/"other" (those rights bits; delete and chmod never),
# "none" (workers act only through their tasks), "sticky" (virtual workers: read/execute sticky objects).
ACTORS: dict[str, tuple[str, bool, str]] = {
    "admin": ("SUPER_USER", False, "all"),
    "gadmin": ("ADVANCED_USER", True, "all"),
    "owner": ("STANDARD_USER", True, "owner"),
    "member": ("STANDARD_USER", True, "group"),
    "other": ("STANDARD_USER", False, "other"),
    "worker": ("WORKER_USER", False, "none"),
    "vworker": ("VWORKER_USER", False, "sticky"),
    "lister": ("LISTJOB", False, "none"),
}
ACTIONS = ("list", "read", "write", "execute", "delete", "chmod")
RIGHTS = (0x700, 0x750, 0x755, 0x1700)
# the actions that mean something for each object type (execute: submitting against an app)
TYPES: dict[str, tuple[str, ...]] = {
    "data": ("list", "read", "write", "delete", "chmod"),
    "work": ("list", "read", "write", "delete", "chmod"),
    "session": ("list", "read", "write", "delete", "chmod"),
    "group": ("list", "read", "write", "delete", "chmod"),
    "app": ACTIONS,
}


def expected(actor: str, action: str, rights: int) -> bool:
    rule = ACTORS[actor][2]
    if rule == "all":
        return True
    if rule == "none":
        return False
    if rule == "sticky":
        return bool(rights & 0x1000) and action in ("list", "read")
    if rule == "owner":
        return action != "execute" or bool(rights & 0x100)
    bits = (rights >> 4) & 7 if rule == "group" else rights & 7
    return {"list": bits & 4, "read": bits & 4, "write": bits & 2, "execute": (bits & 5) == 5}.get(action, 0) > 0


# -- the world ---------------------------------------------------------------------------------------------------
class World:
    def __init__(self, srv: ServerProc, tmp: Path) -> None:
        self.srv = srv
        self.tmp = tmp
        self.admin = srv.client()
        self.admin.create_usergroup("G")
        self.clients: dict[str, Client] = {"admin": self.admin}
        for name, (level, in_group, _) in ACTORS.items():
            if name == "admin":
                continue
            self.admin.create_user(f"m-{name}", f"{name}-password!", level, usergroup="G" if in_group else None)
            self.clients[name] = Client(srv.url, ca=str(srv.ca), login=f"m-{name}", password=f"{name}-password!")
        prog = tmp / "p.sh"
        prog.write_text("#!/bin/sh\n")
        # public and sticky: a work may be as open as any rights of the table (never more open than its app)
        self.public_app = self.admin.put_app("public", binaries={"linux/x86_64": prog},
                                             access_rights="0x1755")["name"]
        self.n = 0

    def make(self, kind: str, rights: int) -> dict[str, Any]:
        """A fresh object of ``kind`` owned by "owner", with ``rights`` (as far as the owner may set them)."""
        c = self.clients["owner"]
        self.n += 1
        if kind == "data":
            content = f"content {self.n}".encode()
            obj = c.create_data(f"d{self.n}", len(content), hashlib.sha256(content).hexdigest())
        elif kind == "work":
            obj = c.submit(self.public_app)
        elif kind in ("session", "group"):
            obj = c.create_bag(kind, f"{kind}{self.n}")
        else:
            prog = self.tmp / f"a{self.n}.sh"
            prog.write_text("#!/bin/sh\n")
            obj = c.put_app(f"app{self.n}", binaries={"linux/x86_64": prog})
        got = c.chmod(obj["uid"], f"0x{rights:x}")["access_rights"]
        assert int(got, 16) == rights  # stored as asked (what may not be set is refused, never trimmed)
        return {**obj, "kind": kind, "rights": int(got, 16)}


def attempt(w: World, actor: str, action: str, obj: dict[str, Any]) -> int | bool:
    """Do ``action`` on ``obj`` as ``actor``: an HTTP status, or for listings whether ``obj`` was listed."""
    c = w.clients[actor]
    kind, uid = obj["kind"], obj["uid"]
    try:
        if action == "list":
            path = {"data": "/datas", "work": "/works", "session": "/sessions", "group": "/groups", "app": "/apps"}
            items = c._json("GET", path[kind])
            items = items["items"] if isinstance(items, dict) else items
            return any(i["uid"] == uid for i in items)
        if action == "read":
            c.get(uid)
        elif action == "write":
            if kind == "data":
                f = w.tmp / "content"
                f.write_bytes(f"content {obj['name'][1:]}".encode())
                c.upload(uid, f)
            elif kind == "work":
                c.cancel(uid)
            elif kind in ("session", "group"):
                c.submit(w.public_app, **{kind: uid})
            else:
                c._json("POST", "/apps", json={"name": obj["name"], "min_memory": 1})
        elif action == "execute":
            c.submit(obj["name"])
        elif action == "delete":
            c._send("DELETE", f"/{kind}s/{uid}")
        elif action == "chmod":
            c.chmod(uid, f"0x{obj['rights']:x}")
    except XwError as exc:
        assert exc.status is not None
        return exc.status
    return 200


CASES = [(actor, kind, action, rights) for kind, actions in TYPES.items() for actor in ACTORS
         for action in actions for rights in (RIGHTS if kind != "app" else (0x700, 0x1700))]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    srv = ServerProc(home=tmp_path_factory.mktemp("rights")).start()
    try:
        yield World(srv, tmp_path_factory.mktemp("rights-files"))
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def shared(world: World) -> dict[tuple[str, int], dict[str, Any]]:
    """One object per (type, rights) for the actions that change nothing."""
    return {(k, r): world.make(k, r) for k in TYPES for r in RIGHTS if k != "app" or r in (0x700, 0x1700)}


@pytest.mark.parametrize(("actor", "kind", "action", "rights"), CASES,
                         ids=[f"{a}-{k}-{x}-{r:x}" for a, k, x, r in CASES])
def test_cell(world: World, shared: dict[tuple[str, int], dict[str, Any]], actor: str, kind: str, action: str,
              rights: int) -> None:
    destructive = action in ("write", "delete") or (action == "execute" and kind != "app")
    obj = world.make(kind, rights) if destructive else shared[(kind, rights)]
    allow = expected(actor, action, obj["rights"])
    got = attempt(world, actor, action, obj)
    if action == "list":
        assert got is allow, f"{actor} {'missed' if allow else 'saw'} a {kind} {obj['rights']:#x} in its listing"
        return
    if allow:
        assert got in (200, 201), f"{actor} was refused ({got}) {action} on a {kind} {obj['rights']:#x}"
    else:
        readable = expected(actor, "read", obj["rights"])
        want = 403 if readable else 404
        submits = (kind == "app" and action in ("write", "execute")) or (kind in ("session", "group")
                                                                            and action == "write")
        if submits and ACTORS[actor][0] in ("WORKER_USER", "VWORKER_USER", "LISTJOB"):
            want = 403  # refused for what the caller is (it may not submit or register), before the object
        elif kind == "app" and action == "write" and not readable:
            want = 409  # app names are unique: an unknown caller learns only that the name is taken
        assert got == want, f"{actor} {action} on a {kind} {obj['rights']:#x}: got {got}, want {want}"


def test_listings_leak_nothing(world: World, shared: dict[tuple[str, int], dict[str, Any]]) -> None:
    """Every listing holds exactly the objects its caller may read, for every actor and type at once."""
    for actor, kind in itertools.product(ACTORS, TYPES):
        mine = {o["uid"] for (k, _), o in shared.items() if k == kind}
        path = {"data": "/datas", "work": "/works", "session": "/sessions", "group": "/groups", "app": "/apps"}[kind]
        items = world.clients[actor]._json("GET", path)
        items = items["items"] if isinstance(items, dict) else items
        seen = {i["uid"] for i in items} & mine
        want = {o["uid"] for (k, _), o in shared.items() if k == kind and expected(actor, "read", o["rights"])}
        assert seen == want, f"{actor} listing of {kind}s"


def test_users_listing(world: World) -> None:
    assert {u["login"] for u in world.clients["owner"].users()} == {"m-owner"}
    assert {u["login"] for u in world.clients["gadmin"].users()} == {"m-gadmin", "m-owner", "m-member"}
    assert {u["login"] for u in world.admin.users()} >= {f"m-{a}" for a in ACTORS if a != "admin"}

