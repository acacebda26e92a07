"""The data repository: create, upload (streaming, verified), download, link counting, delete."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.model import DataStatus, TaskStatus, UsageLevel, WorkStatus
from xwhep.core.rights import Action, BadRights, parse_rights
from xwhep.core.uri import new_uid
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError, bad_request, conflict
from xwhep.server.services import common as c
from xwhep.server.services.dispatch import result_arrived
from xwhep.server.services.effects import Effects
from xwhep.server.services.works import app_datas, blob_used, profile_of

_TYPES = {".zip": "zip", ".jar": "jar", ".txt": "text", ".sh": "text", ".py": "text", ".tar": "tar",
          ".gz": "gz", ".tgz": "tgz", ".iso": "iso", ".qcow2": "qcow2", ".img": "img", ".raw": "raw",
          ".vmdk": "vmdk", ".vdi": "vdi", ".json": "json", ".csv": "csv", ".xml": "xml"}


def guess_type(name: str) -> str:
    return _TYPES.get(PurePath(name).suffix.lower(), "bin")


def _sha(value: Any) -> str | None:
    if value in (None, ""):
        return None
    text = str(value).lower()
    if len(text) != 64 or any(ch not in "0123456789abcdef" for ch in text):
        raise bad_request("sha256: expected 64 hexadecimal characters", "sha256")
    return text


def create(conn: Connection, ident: Identity, spec: dict[str, Any], server: str,
           blob_exists: Any) -> tuple[dict[str, Any], Effects]:
    """A new data, UNAVAILABLE until its bytes arrive (or at once when the same bytes are already stored)."""
    if ident.is_worker or ident.level < UsageLevel.STANDARD_USER:
        raise ApiError(403, f"{ident.login} ({ident.level.name}) may not create data")
    name = spec.get("name")
    if not name or not isinstance(name, str) or len(name) > 255:
        raise bad_request("name: required, at most 255 characters", "name")
    size = spec.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise bad_request("size: expected a non-negative integer", "size")
    sha = _sha(spec.get("sha256"))
    rights = 0x700 if not ident.is_admin else 0x755
    if spec.get("access_rights") is not None:
        try:
            rights = parse_rights(str(spec["access_rights"]))
        except BadRights as exc:
            raise bad_request(f"access_rights: {exc}", "access_rights") from None
    t = c.now()
    uid = new_uid()
    status = DataStatus.UNAVAILABLE
    if sha and size is not None and blob_exists(sha) and _size_matches(conn, sha, size) \
            and _readable_copy(conn, ident, sha):
        status = DataStatus.AVAILABLE
    conn.execute(s.datas.insert().values(
        uid=uid, owner=ident.uid, access_rights=rights, created=t, modified=t, name=name,
        type=str(spec.get("type") or guess_type(name))[:32], size=size, sha256=sha, status=status, links=0))
    c.event(conn, ident.uid, "data.create", uid, None, status)
    eff = Effects()
    if status == DataStatus.AVAILABLE:
        _release_waiting(conn, uid, ident.uid, eff)
    return c.render(c.load(conn, "data", uid), server), eff


def _readable_copy(conn: Connection, ident: Identity, sha: str) -> bool:
    """Does ``ident`` already read an AVAILABLE data with these bytes? Only then is the upload skipped: knowing a
    checksum is not having the bytes, and a skip would hand another user's private bytes to anyone who knows
    their sha256 (and tell whether the server holds them)."""
    q = sa.select(s.datas.c.uid).where(s.datas.c.sha256 == sha, s.datas.c.status == DataStatus.AVAILABLE)
    vis = c.visible(s.datas, ident)
    if vis is not None:
        q = q.where(vis)
    return conn.execute(q.limit(1)).first() is not None


def _size_matches(conn: Connection, sha: str, size: int) -> bool:
    known = conn.execute(sa.select(s.datas.c.size).where(s.datas.c.sha256 == sha,
                                                         s.datas.c.status == DataStatus.AVAILABLE).limit(1)).scalar()
    return known is None or known == size


def check_upload(conn: Connection, ident: Identity, uid: str) -> dict[str, Any]:
    """May ``ident`` send the bytes of data ``uid`` now? The owner may (a writer per rights); a host only the
    result of the task it runs (its current attempt, given to this very host)."""
    row = c.load(conn, "data", uid)
    if ident.host is not None or ident.is_worker:
        if not _result_of_host(conn, ident, row):
            if c.allowed(conn, ident, Action.READ, row):  # e.g. sticky data seen by a virtual worker
                raise ApiError(403, f"{ident.login} may not write data {uid}")
            raise ApiError(404, f"no data {uid}")
    else:
        row = c.load_checked(conn, ident, "data", uid, Action.WRITE)
    if row["status"] == DataStatus.AVAILABLE:
        raise conflict(f"data {uid} already has its content (sha256 {row['sha256']})", "content")
    return row


def _result_of_host(conn: Connection, ident: Identity, row: dict[str, Any]) -> bool:
    """Is data ``row`` the awaited result of a work whose current task runs on ``ident``'s host?"""
    if ident.host is None or not row["work"]:
        return False
    host = conn.execute(sa.select(s.tasks.c.host).select_from(s.works.join(s.tasks, s.tasks.c.uid == s.works.c.task))
                        .where(s.works.c.uid == row["work"], s.works.c.result == row["uid"])).scalar()
    return bool(host == ident.host)


def mark_available(conn: Connection, ident: Identity, uid: str, sha: str, size: int) -> tuple[dict[str, Any], Effects]:
    """The verified bytes are in the store: the data becomes AVAILABLE; works waiting on it move on."""
    row = c.load(conn, "data", uid)
    eff = Effects()
    if row["status"] == DataStatus.AVAILABLE:
        return row, eff
    conn.execute(s.datas.update().where(s.datas.c.uid == uid).values(
        status=DataStatus.AVAILABLE, sha256=sha, size=size, modified=c.now()))
    c.event(conn, ident.uid, "data.available", uid, row["status"], DataStatus.AVAILABLE, f"sha256 {sha}")
    row = c.load(conn, "data", uid)
    if row["work"]:
        result_arrived(conn, row, ident.uid, eff)
    _release_waiting(conn, uid, ident.uid, eff)
    return row, eff


def _release_waiting(conn: Connection, uid: str, actor: str | None, eff: Effects) -> None:
    """Works in UNAVAILABLE that needed ``uid`` become PENDING once all their inputs are there."""
    from xwhep.server.services.dispatch import move
    from xwhep.server.services.works import Resolver

    apps = [dict(a) for a in conn.execute(sa.select(s.apps)).mappings() if uid in app_datas(a)]
    cond = [s.works.c.stdin == uid, s.works.c.dirin == uid]
    if apps:
        cond.append(s.works.c.app.in_([a["uid"] for a in apps]))
    waiting = conn.execute(sa.select(s.works).where(s.works.c.status == WorkStatus.UNAVAILABLE, sa.or_(*cond))
                           .order_by(s.works.c.id)).mappings().all()
    res = Resolver(conn, None)  # type: ignore[arg-type]
    for w in waiting:
        app = c.load(conn, "app", w["app"])
        needed = app_datas(app) | {x for x in (w["stdin"], w["dirin"]) if x}
        ready = conn.execute(sa.select(sa.func.count()).select_from(s.datas).where(
            s.datas.c.uid.in_(needed), s.datas.c.status == DataStatus.AVAILABLE)).scalar()
        if ready == len(needed):
            work = dict(w)
            move(conn, work, WorkStatus.PENDING, actor, "inputs available")
            rset = work["replica_of"] or (work["uid"] if work["replicas"] > 1 else None)
            eff.pending.append((work["uid"], work["id"], profile_of(work, app, res.owner_group(work["owner"])),
                                work["rank"], rset))


def check_download(conn: Connection, ident: Identity, uid: str) -> dict[str, Any]:
    """May ``ident`` read the bytes of ``uid``? Readers may (per rights); a host may read what the tasks running
    on it need, whatever the data's rights (the right to run a work is not the right to read it: a private work
    runs on a public worker, scoped to its task); a virtual worker also sticky data."""
    row = c.load(conn, "data", uid)
    if ident.is_worker or ident.host is not None:
        sticky_ok = ident.level.name == "VWORKER_USER" and row["access_rights"] & 0x1000
        if not sticky_ok and not _needed_by_host(conn, ident, uid) and (
                ident.is_worker or not c.allowed(conn, ident, Action.READ, row)):
            raise ApiError(404, f"no data {uid}")
    elif not c.allowed(conn, ident, Action.READ, row):
        raise ApiError(404, f"no data {uid}")
    if row["status"] != DataStatus.AVAILABLE:
        raise conflict(f"data {uid} is {row['status']}: its content has not arrived", "status")
    return row


def _needed_by_host(conn: Connection, ident: Identity, uid: str) -> bool:
    """Does a task running on ``ident``'s host need data ``uid`` (its stdin, dirin, or its app's data)?"""
    if ident.host is None:
        return False
    q = (sa.select(s.works.c.stdin, s.works.c.dirin, s.works.c.app)
         .select_from(s.tasks.join(s.works, s.works.c.task == s.tasks.c.uid))
         .where(s.tasks.c.host == ident.host, s.tasks.c.status == TaskStatus.RUNNING))
    apps = set()
    for stdin, dirin, app in conn.execute(q):
        if uid in (stdin, dirin):
            return True
        apps.add(app)
    rows = conn.execute(sa.select(s.apps).where(s.apps.c.uid.in_(apps))).mappings()
    return any(uid in app_datas(a) for a in rows)


def listing(conn: Connection, ident: Identity, server: str, limit: int = 1000, after: str = "") -> list[dict[str, Any]]:
    q = sa.select(s.datas)
    vis = c.visible(s.datas, ident)
    if vis is not None:
        q = q.where(vis)
    rows = conn.execute(q.where(s.datas.c.uid > after).order_by(s.datas.c.uid).limit(limit)).mappings().all()
    return [c.render(r, server) for r in rows]


def delete(conn: Connection, ident: Identity, uid: str) -> Effects:
    """Remove a data unless a work or app still uses it; free its blob when no other data shares it."""
    row = c.load_checked(conn, ident, "data", uid, Action.DELETE)
    if row["links"] > 0 and not row["work"]:
        raise conflict(f"data {uid} is used by {row['links']} work(s)/app(s); delete them first", "links")
    apps = [a["name"] for a in conn.execute(sa.select(s.apps)).mappings() if uid in app_datas(a)]
    if apps:
        raise conflict(f"data {uid} is used by app(s) {', '.join(apps)}", "links")
    if row["work"]:
        conn.execute(s.works.update().where(s.works.c.uid == row["work"], s.works.c.result == uid).values(result=None))
    conn.execute(s.datas.delete().where(s.datas.c.uid == uid))
    c.event(conn, ident.uid, "data.delete", uid, row["status"], None)
    eff = Effects()
    if row["sha256"] and row["status"] == DataStatus.AVAILABLE and not blob_used(conn, row["sha256"]):
        eff.blobs.append(row["sha256"])
    return eff
