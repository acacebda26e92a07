"""The server side of the worker protocol: register, claim, report, complete, reap.

Every status change goes through :func:`move`, which asks the state graph, does a compare-and-set update
and writes the event, so an illegal or stale change can never land.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.expressions import MAX_HOST_ITEMS
from xwhep.core.matching import HostProfile
from xwhep.core.model import AppType, DataStatus, TaskStatus, WorkStatus, normalize_cpu, normalize_os
from xwhep.core.states import after_loss, is_final, transition
from xwhep.core.uri import new_uid
from xwhep.server.auth import Identity
from xwhep.server.db import raw
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError, bad_request
from xwhep.server.services import common as c
from xwhep.server.services import hostkeys
from xwhep.server.services.effects import Effects
from xwhep.server.services.works import Resolver, profile_of

W = WorkStatus


def move(conn: Connection, work: dict[str, Any], target: WorkStatus, actor: str | None, note: str = "",
         **values: Any) -> None:
    """Change a work's status along the graph (compare-and-set on the current status) and log the event."""
    source = WorkStatus(work["status"])
    transition(source, target, note)
    t = c.now()
    values.setdefault("modified", t)
    if target == W.PENDING:
        values.setdefault("pending_since", t)
    if is_final(target):
        values.setdefault("completed", t)
    r = conn.execute(s.works.update().where(s.works.c.uid == work["uid"], s.works.c.status == source)
                     .values(status=target, **values))
    if r.rowcount != 1:
        raise ApiError(409, f"work {work['uid']} changed concurrently (expected {source})", "status")
    c.event(conn, actor, "work.transition", work["uid"], source, target, note or None)
    work.update(values, status=target)


# -- hosts -----------------------------------------------------------------------------------------------------

def register(conn: Connection, ident: Identity, desc: Mapping[str, Any],
             max_hosts: int | None = None) -> tuple[dict[str, Any], str | None]:
    """Create or refresh the host a worker runs as; the caller becomes its owner. Returns the host's row and, for
    a new host, its key (services/hostkeys.py: shown once, the server keeps only its digest).

    An existing host is refreshed only by its owner giving the host's key. Any other request — an unknown uid,
    another's host, a wrong or missing key — registers a *new* host with a uid the server chooses: a uid is never
    taken over, and the answer says nothing of whether the uid existed. A user (not a worker identity, not an
    administrator) owns at most ``max_hosts`` hosts.
    """
    _check_sharings(desc)
    t = c.now()
    values = {
        "name": str(desc.get("name") or "unnamed")[:255],
        "os": normalize_os(str(desc.get("os") or "linux")), "cpu": normalize_cpu(str(desc.get("cpu") or "x86_64")),
        "cpuspeed": int(desc.get("cpuspeed") or 0), "cores": max(1, int(desc.get("cores") or 1)),
        "memory": int(desc.get("memory") or 0), "disk": int(desc.get("disk") or 0),
        "java": bool(desc.get("java")), "version": str(desc.get("version") or "")[:64],
        "apptypes": sorted({str(a) for a in desc.get("apptypes") or []}),
        "packages": {str(k): str(v) for k, v in (desc.get("packages") or {}).items()},
        "sharedatas": sorted({str(d) for d in desc.get("datas") or []}),
        "project": desc.get("project") or None, "incoming": bool(desc.get("incoming")),
        "pool": max(1, int(desc.get("pool") or 1)), "active": bool(desc.get("active", True)),
        "last_alive": t, "modified": t,
    }
    uid = desc.get("uid")
    if uid:
        uid = c.ref(str(uid), "uid")
        row = conn.execute(sa.select(s.hosts.c.owner, s.hosts.c.key_hash).where(s.hosts.c.uid == uid)).first()
        if row is not None and row[0] == ident.uid and hostkeys.key_matches(row[1], desc.get("key")):
            conn.execute(s.hosts.update().where(s.hosts.c.uid == sa.bindparam("h")), {"h": uid, **values})
            c.event(conn, ident.uid, "host.register", uid, detail="re-registered")
            return c.load(conn, "host", uid), None
    _check_quota(conn, ident, max_hosts)
    uid = new_uid()
    key = hostkeys.new_key()
    conn.execute(s.hosts.insert(), {"uid": uid, "owner": ident.uid, "access_rights": 0x700, "created": t,
                                    "key_hash": hostkeys.digest(key), **values})
    c.event(conn, ident.uid, "host.register", uid)
    return c.load(conn, "host", uid), key


def _check_sharings(desc: Mapping[str, Any]) -> None:
    """A host's lists are fed to every work's requirements expression: bounded (400 naming the field)."""
    for key in ("apptypes", "packages", "datas"):
        items = desc.get(key) or ()
        if len(items) > MAX_HOST_ITEMS:
            raise bad_request(f"{key}: {len(items):,} items, at most {MAX_HOST_ITEMS}", key)


def _check_quota(conn: Connection, ident: Identity, max_hosts: int | None) -> None:
    """A new host of a user beyond ``max_hosts`` is refused (403): registering is cheap, and every host is checked
    by ``why`` and the scheduler. Worker identities (pools of workers) and administrators are not counted."""
    if max_hosts is None or ident.is_worker or ident.is_admin:
        return
    n = conn.execute(sa.select(sa.func.count()).select_from(s.hosts).where(s.hosts.c.owner == ident.uid)).scalar()
    if n >= max_hosts:
        raise ApiError(403, f"hosts: {ident.login} already owns {n} hosts, at most {max_hosts} per user "
                            "(max_hosts_per_user); re-register an existing host (its uid and key) or ask an "
                            "administrator", "hosts")


def host_profile(row: Mapping[str, Any], ident_level: Any, ident_group: str | None) -> HostProfile:
    return HostProfile(
        uid=row["uid"], name=row["name"], os=row["os"], cpu=row["cpu"], cpuspeed=row["cpuspeed"],
        cores=row["cores"], memory=row["memory"], disk=row["disk"], java=row["java"],
        apptypes=frozenset(row["apptypes"] or []), packages=dict(row["packages"] or {}),
        datas=frozenset(row["sharedatas"] or []), project=row["project"] or "", incoming=row["incoming"],
        owner=row["owner"] or "", owner_level=ident_level, owner_group=ident_group)


def own_host(conn: Connection, ident: Identity, host_uid: str) -> dict[str, Any]:
    row = conn.execute(sa.select(s.hosts).where(s.hosts.c.uid == host_uid)).mappings().first()
    if row is None or (row["owner"] != ident.uid and not ident.is_admin):
        raise ApiError(404, f"no host {host_uid}")
    return dict(row)


# -- claiming --------------------------------------------------------------------------------------------------

_WORK_COLS = ("works.uid, works.owner, works.app, works.args, works.env, works.stdin, works.dirin, works.wallclock, "
              "works.min_memory, works.listen_ports, works.forward_addresses, works.label, works.replicas, "
              "works.replica_of, works.task, works.trials")
# Compare-and-set of a batch of picked works in one statement; each claimed row comes back with the task uid it
# now carries and its attempt count (a row another server process claimed first is simply not returned).
# :m is a JSON object {work uid: new task uid}.
_CLAIM = raw.Sql(
    "UPDATE works SET status = 'RUNNING', host = :h, task = j.value, started = :t, modified = :t, "
    # "+status": SQLite would otherwise walk the status index through every PENDING work instead of looking
    # the few uids up (no statistics to tell it otherwise)
    "trials = works.trials + 1 FROM json_each(:m) AS j WHERE works.uid = j.key AND +works.status = 'PENDING' "
    f"RETURNING {_WORK_COLS}",
    # PostgreSQL: no join (with stale statistics it hashed every PENDING work against the map), the uids as an
    # array for the unique index, and "status || ''" so that the status index never looks cheaper
    postgres="UPDATE works SET status = 'RUNNING', host = :h, task = CAST(:m AS jsonb) ->> works.uid, "
    "started = :t, modified = :t, trials = works.trials + 1 WHERE works.uid IN_LIST(:uids) "
    f"AND works.status || '' = 'PENDING' RETURNING {_WORK_COLS}")
_APPS = raw.Sql("SELECT uid, name, type, binaries, env, base_dirin, image, default_stdin, default_dirin "
                "FROM apps WHERE uid IN_LIST(:uids)")
_DATAINFO = raw.Sql("SELECT uid, name, sha256, size, type FROM datas WHERE uid IN_LIST(:uids)")
_NEW_TASK = raw.Sql("INSERT INTO tasks (uid, owner, access_rights, created, modified, work, host, trial, status, "
                    "started, last_alive) "
                    "VALUES (:uid, :owner, :rights, :t, :t, :work, :host, :trial, 'RUNNING', :t, :t)")


def _datainfo(conn: Connection, uids: set[str]) -> dict[str, dict[str, Any]]:
    if not uids:
        return {}
    return {r["uid"]: r for r in raw.rows(conn, _DATAINFO, {"uids": uids})}


def claim(conn: Connection, host: HostProfile, picked: list[str]) -> tuple[list[dict[str, Any]], Effects]:
    """Claim the picked works for ``host`` (compare-and-set) and describe them for the worker."""
    t = c.now()
    eff = Effects()
    if not picked:
        return [], eff
    mine = {uid: new_uid() for uid in picked}
    claimed = {w["uid"]: w for w in raw.rows(conn, _CLAIM, {"m": orjson.dumps(mine).decode(), "uids": picked,
                                                           "h": host.uid, "t": t})}
    works = [claimed[uid] for uid in picked if uid in claimed]  # in the scheduler's order
    if not works:
        return [], eff
    apps = {a["uid"]: a for a in raw.rows(conn, _APPS, {"uids": {w["app"] for w in works}})}
    wanted: set[str] = set()
    plat = f"{host.os}/{host.cpu}"
    for a in apps.values():
        a["binaries"] = b = raw.json_value(a["binaries"]) or {}
        a["env"] = raw.json_value(a["env"])
        for key in (plat, "java"):
            if key in b:
                wanted.add(b[key])
                break
        wanted.update(x for x in (a["default_stdin"], a["default_dirin"], a["base_dirin"], a["image"]) if x)
    for w in works:
        w["env"] = raw.json_value(w["env"])
        wanted.update(x for x in (w["stdin"], w["dirin"]) if x)
    info = _datainfo(conn, wanted)
    task_rows, ev, out = [], [], []
    for w in works:
        task = w["task"]
        trial = w["trials"]  # attempts so far, this one and aborted ones included: unique per work
        task_rows.append({"uid": task, "owner": host.owner, "rights": 0x700, "t": t, "work": w["uid"],
                          "host": host.uid, "trial": trial})
        ev.append({"actor": host.owner, "action": "work.transition", "object": w["uid"], "source": "PENDING",
                   "target": "RUNNING", "detail": f"host {host.uid} task {task}"})
        eff.running[w["owner"]] += 1
        eff.tasks_started[task] = (w["uid"], host.uid)
        rset = w["replica_of"] or (w["uid"] if w["replicas"] > 1 else None)
        if rset:
            eff.replica_hosts.append((rset, host.uid))
        out.append(assignment(w, apps[w["app"]], task, plat, info, trial))
    raw.executemany(conn, _NEW_TASK, task_rows)
    raw.events(conn, t, ev)
    return out, eff


def assignment(w: Mapping[str, Any], app: Mapping[str, Any], task: str, plat: str,
               info: dict[str, dict[str, Any]], trial: int) -> dict[str, Any]:
    """What a worker needs to run one work."""
    b = app["binaries"] or {}
    key = plat if plat in b else ("java" if "java" in b else None)
    binary = None
    if key:
        binary = {**info.get(b[key], {"uid": b[key]}), "platform": key}

    def d(uid: str | None) -> dict[str, Any] | None:
        return info.get(uid, {"uid": uid}) if uid else None

    return {
        "task": task, "work": w["uid"], "owner": w["owner"], "trial": trial,
        "app": {"uid": app["uid"], "name": app["name"], "type": app["type"], "binary": binary,
                "env": app["env"] or {}, "base_dirin": d(app["base_dirin"]), "image": d(app["image"])},
        "args": w["args"], "env": w["env"] or {}, "stdin": d(w["stdin"]), "dirin": d(w["dirin"]),
        "wallclock": w["wallclock"], "min_memory": w["min_memory"], "listen_ports": w["listen_ports"],
        "forward_addresses": w["forward_addresses"], "label": w["label"],
    }


# -- reports ---------------------------------------------------------------------------------------------------

def _task_and_work(conn: Connection, task_uid: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    task = conn.execute(sa.select(s.tasks).where(s.tasks.c.uid == task_uid)).mappings().first()
    if task is None:
        return None, None
    work = conn.execute(sa.select(s.works).where(s.works.c.uid == task["work"])).mappings().first()
    return dict(task), (dict(work) if work else None)


# the batched common case of a report: COMPLETED, no result, current attempt (PostgreSQL: rows locked until commit)
_REPORTED = raw.Sql("SELECT t.uid, t.status, t.host, w.uid AS w, w.status AS ws, w.task AS current, w.owner, "
                    "w.replicas, w.replica_of FROM tasks t JOIN works w ON w.uid = t.work "
                    "WHERE t.uid IN_LIST(:uids) FOR_UPDATE")
_DONE_TASK = raw.Sql("UPDATE tasks SET status = 'COMPLETED', ended = :t, modified = :t, return_code = :rc "
                     "WHERE uid = :k")
_DONE_WORK = raw.Sql("UPDATE works SET status = 'COMPLETED', modified = :t, completed = :t, return_code = :rc "
                     "WHERE uid = :w")


def report(conn: Connection, ident: Identity, host_uid: str, reports: list[Mapping[str, Any]],
           blob_exists: Any, host_checked: bool = False) -> tuple[list[dict[str, Any]], Effects]:
    """Workers report finished tasks; each gets an outcome: done, upload (send the result), or stale.

    The common case (COMPLETED without a result, current attempt, no replicas) is done for the whole batch in a
    few statements; everything else goes one by one through the state graph. ``host_checked``: the caller
    already made sure ``ident`` owns the host.
    """
    if not host_checked:
        own_host(conn, ident, host_uid)
    eff = Effects()
    uids = [c.ref(str(rep.get("task") or ""), "task") for rep in reports]
    rows = {r["uid"]: r for r in raw.rows(conn, _REPORTED, {"uids": uids})}
    fast: dict[str, dict[str, Any]] = {}
    transition(W.RUNNING, W.COMPLETED)  # the batch below takes this edge of the graph
    for uid, rep in zip(uids, reports, strict=True):
        r = rows.get(uid)
        if (r is not None and r["host"] == host_uid and r["status"] == TaskStatus.RUNNING and r["current"] == uid
                and r["ws"] == W.RUNNING and r["replicas"] == 1 and r["replica_of"] is None
                and str(rep.get("status") or "COMPLETED").upper() == "COMPLETED" and not rep.get("result")
                and uid not in fast):
            fast[uid] = {"k": uid, "w": r["w"], "rc": rep.get("return_code"), "owner": r["owner"]}
    if fast:
        t = c.now()
        batch = [{"k": f["k"], "w": f["w"], "rc": f["rc"], "t": t} for f in fast.values()]
        raw.executemany(conn, _DONE_TASK, batch)
        raw.executemany(conn, _DONE_WORK, batch)
        raw.events(conn, t, ({"actor": ident.uid, "action": "work.transition", "object": f["w"],
                              "source": "RUNNING", "target": "COMPLETED", "detail": f"task {f['k']}"}
                             for f in fast.values()))
        for f in fast.values():
            eff.running[f["owner"]] -= 1
            eff.tasks_ended.append(f["k"])
    outcomes = []
    for uid, rep in zip(uids, reports, strict=True):
        if uid in fast:
            outcomes.append({"task": uid, "outcome": "done"})
            continue
        task, work = _task_and_work(conn, uid)
        if task is None or task["host"] != host_uid:
            outcomes.append({"task": uid, "outcome": "stale", "message": "no such task on this host"})
            continue
        outcomes.append(_one_report(conn, ident, task, work, rep, eff, blob_exists))
    return outcomes, eff


def _one_report(conn: Connection, ident: Identity, task: dict[str, Any], work: dict[str, Any] | None,
                rep: Mapping[str, Any], eff: Effects, blob_exists: Any) -> dict[str, Any]:
    tuid = task["uid"]
    status = str(rep.get("status") or "COMPLETED").upper()
    if status not in ("COMPLETED", "FAILED", "ERROR", "ABORTED"):
        raise bad_request(f"status: {status!r} is not COMPLETED, FAILED, ERROR or ABORTED", "status")
    result = rep.get("result")
    sha = (result or {}).get("sha256")
    if task["status"] != TaskStatus.RUNNING:
        # Completion is idempotent: the same report again gets the same answer, nothing is counted twice.
        if task["status"] == TaskStatus.COMPLETED and task["result_sha256"] == sha:
            return {"task": tuid, "outcome": "done"}
        if task["status"] == TaskStatus.DATAREQUEST and task["result_sha256"] == sha and work:
            return {"task": tuid, "outcome": "upload", "result": work["result"]}
        return {"task": tuid, "outcome": "stale", "message": f"task is {task['status']}"}
    if work is None or work["task"] != tuid or work["status"] != W.RUNNING:
        _end_task(conn, tuid, TaskStatus.LOST, rep, "stale attempt", eff)
        return {"task": tuid, "outcome": "stale", "message": "the work was reassigned or removed"}
    rc = rep.get("return_code")
    reason = str(rep.get("reason") or "")[:2000]
    if status == "ABORTED":
        _end_task(conn, tuid, TaskStatus.ABORTED, rep, reason, eff)
        move(conn, work, W.ABORTED, ident.uid, reason)
        eff.running[work["owner"]] -= 1
        if rep.get("charge", True):  # a failure on the worker's side: bounded like any lost attempt
            target, retries, why = after_loss(work["retries"], work["max_retries"])
        else:  # the volunteer took the machine back: not the work's fault, no retry charged
            target, retries, why = W.PENDING, work["retries"], "rescheduled after abort"
        if target == W.ERROR:
            move(conn, work, W.ERROR, ident.uid, why, retries=retries, reason=f"{why}; last: {reason}", host=None,
                 task=None)
            settle_replicas(conn, work, ident.uid)
        else:
            move(conn, work, W.PENDING, ident.uid, why, retries=retries, host=None, task=None)
            requeue(conn, work, eff)
        return {"task": tuid, "outcome": "done"}
    if status in ("FAILED", "ERROR"):
        _end_task(conn, tuid, TaskStatus(status), rep, reason, eff)
        move(conn, work, W(status), ident.uid, reason, return_code=rc, reason=reason)
        eff.running[work["owner"]] -= 1
        settle_replicas(conn, work, ident.uid)
        return {"task": tuid, "outcome": "done"}
    if not result:
        _end_task(conn, tuid, TaskStatus.COMPLETED, rep, reason, eff)
        complete(conn, work, ident.uid, rc, None, eff)
        return {"task": tuid, "outcome": "done"}
    try:
        size = int(result["size"])
        sha = str(result["sha256"]).lower()
    except (KeyError, TypeError, ValueError):
        raise bad_request("result: needs sha256 and size", "result") from None
    if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise bad_request("result.sha256: expected 64 hexadecimal characters", "result")
    t = c.now()
    data_uid = new_uid()
    # same bytes already stored, and the work's owner has them already: no upload needed (a worker that names
    # another user's checksum must not hand that user's bytes to the work's owner)
    available = blob_exists(sha) and _owner_has(conn, work["owner"], sha, size)
    conn.execute(s.datas.insert().values(
        uid=data_uid, owner=work["owner"], access_rights=work["access_rights"], created=t, modified=t,
        name=str(result.get("name") or f"{work['uid']}-result.zip")[:255], type=str(result.get("type") or "zip"),
        size=size, sha256=sha, status=DataStatus.AVAILABLE if available else DataStatus.UNAVAILABLE, links=1,
        work=work["uid"]))
    conn.execute(s.tasks.update().where(s.tasks.c.uid == tuid).values(result_sha256=sha))
    if available:
        _end_task(conn, tuid, TaskStatus.COMPLETED, rep, reason, eff)
        complete(conn, work, ident.uid, rc, data_uid, eff)
        return {"task": tuid, "outcome": "done"}
    conn.execute(s.tasks.update().where(s.tasks.c.uid == tuid).values(status=TaskStatus.DATAREQUEST, modified=t,
                                                                      return_code=rc))
    move(conn, work, W.DATAREQUEST, ident.uid, "result upload pending", result=data_uid, return_code=rc)
    return {"task": tuid, "outcome": "upload", "result": data_uid}


def _end_task(conn: Connection, task_uid: str, status: TaskStatus, rep: Mapping[str, Any], reason: str,
              eff: Effects) -> None:
    conn.execute(s.tasks.update().where(s.tasks.c.uid == task_uid).values(
        status=status, ended=c.now(), modified=c.now(), return_code=rep.get("return_code"),
        reason=reason or None))
    eff.tasks_ended.append(task_uid)


def complete(conn: Connection, work: dict[str, Any], actor: str | None, rc: int | None, result: str | None,
             eff: Effects) -> None:
    """The work's own run is done: COMPLETED, or REPLICATING while its replicas are still out."""
    values: dict[str, Any] = {"return_code": rc}
    if result is not None:
        values["result"] = result
    target = W.COMPLETED
    if work["replicas"] > 1 and work["replica_of"] is None and _replicas_open(conn, work["uid"]):
        target = W.REPLICATING
    move(conn, work, target, actor, "", **values)
    eff.running[work["owner"]] -= 1  # only RUNNING and DATAREQUEST works complete, both counted as running
    settle_replicas(conn, work, actor)


def _replicas_open(conn: Connection, master: str) -> bool:
    return conn.execute(sa.select(sa.func.count()).select_from(s.works).where(
        s.works.c.replica_of == master,
        s.works.c.status.notin_([W.COMPLETED, W.ERROR, W.FAILED]))).scalar() > 0


def settle_replicas(conn: Connection, work: Mapping[str, Any], actor: str | None) -> None:
    """A replica ended: its master leaves REPLICATING once every replica is final."""
    master_uid = work.get("replica_of")
    if not master_uid:
        return
    master = conn.execute(sa.select(s.works).where(s.works.c.uid == master_uid)).mappings().first()
    if master and master["status"] == W.REPLICATING and not _replicas_open(conn, master_uid):
        move(conn, dict(master), W.COMPLETED, actor, "all replicas done")


def requeue(conn: Connection, work: Mapping[str, Any], eff: Effects) -> None:
    """Put a work that went back to PENDING into the scheduler's index (after commit)."""
    app = c.load(conn, "app", work["app"])
    seq = conn.execute(sa.select(s.works.c.id).where(s.works.c.uid == work["uid"])).scalar()
    res = Resolver(conn, None)  # type: ignore[arg-type]
    rset = work["replica_of"] or (work["uid"] if work["replicas"] > 1 else None)
    eff.pending.append((work["uid"], int(seq or 0), profile_of(work, app, res.owner_group(work["owner"])),
                        work["rank"], rset))


def _owner_has(conn: Connection, owner: str, sha: str, size: int) -> bool:
    """An AVAILABLE data of ``owner`` (or one everybody reads) holds these bytes."""
    return conn.execute(sa.select(s.datas.c.uid).where(
        s.datas.c.sha256 == sha, s.datas.c.size == size, s.datas.c.status == DataStatus.AVAILABLE,
        sa.or_(s.datas.c.owner == owner, s.datas.c.access_rights.op("&")(4) != 0)).limit(1)).first() is not None


def result_arrived(conn: Connection, data: Mapping[str, Any], actor: str | None, eff: Effects) -> None:
    """A result upload became AVAILABLE: its DATAREQUEST work completes."""
    work = conn.execute(sa.select(s.works).where(s.works.c.uid == data["work"])).mappings().first()
    if work is None or work["result"] != data["uid"] or work["status"] != W.DATAREQUEST:
        return
    w = dict(work)
    if w["task"]:
        conn.execute(s.tasks.update().where(s.tasks.c.uid == w["task"]).values(
            status=TaskStatus.COMPLETED, ended=c.now(), modified=c.now()))
        eff.tasks_ended.append(w["task"])
    complete(conn, w, actor, w["return_code"], data["uid"], eff)


# -- the reaper ------------------------------------------------------------------------------------------------

def reap(conn: Connection, cutoff: float) -> tuple[int, Effects]:
    """Tasks silent since before ``cutoff`` are LOST; their works go back to PENDING (retry+1) or to ERROR."""
    eff = Effects()
    silent = conn.execute(sa.select(s.tasks.c.uid, s.tasks.c.work, s.tasks.c.host).where(
        s.tasks.c.status.in_([TaskStatus.RUNNING, TaskStatus.DATAREQUEST]),
        s.tasks.c.last_alive < cutoff)).all()
    for task_uid, work_uid, host_uid in silent:
        _lose(conn, task_uid, work_uid, f"host {host_uid} silent", "alive timeout",
              f"alive timeout on host {host_uid}", eff)
    return len(silent), eff


def _lose(conn: Connection, task_uid: str, work_uid: str, event_detail: str, task_reason: str, why: str,
          eff: Effects) -> None:
    """Task ``task_uid`` will never report: LOST; its work goes back to PENDING (retry+1) or to ERROR."""
    conn.execute(s.tasks.update().where(s.tasks.c.uid == task_uid).values(
        status=TaskStatus.LOST, ended=c.now(), modified=c.now(), reason=task_reason))
    c.event(conn, None, "task.lost", task_uid, detail=event_detail)
    eff.tasks_ended.append(task_uid)
    row = conn.execute(sa.select(s.works).where(s.works.c.uid == work_uid)).mappings().first()
    if row is None or row["task"] != task_uid or row["status"] not in (W.RUNNING, W.DATAREQUEST):
        return
    work = dict(row)
    eff.running[work["owner"]] -= 1
    if work["status"] == W.DATAREQUEST and work["result"]:  # the promised result will never come
        conn.execute(s.datas.delete().where(s.datas.c.uid == work["result"],
                                            s.datas.c.status == DataStatus.UNAVAILABLE))
    move(conn, work, W.LOST, None, why, result=None)
    target, retries, reason = after_loss(work["retries"], work["max_retries"])
    if target == W.ERROR:
        move(conn, work, W.ERROR, None, reason, retries=retries, reason=reason, host=None, task=None)
        settle_replicas(conn, work, None)
    else:
        move(conn, work, W.PENDING, None, reason, retries=retries, host=None, task=None)
        requeue(conn, work, eff)


def delete_host(conn: Connection, ident: Identity, host_uid: str) -> Effects:
    """Remove a host (its owner or an administrator): its key and tokens stop working at once, and the works it
    was running are LOST now rather than at the alive timeout (charged as any loss: the host may have cheated)."""
    row = conn.execute(sa.select(s.hosts.c.owner).where(s.hosts.c.uid == host_uid)).first()
    if row is None or (row[0] != ident.uid and not ident.is_admin):
        raise ApiError(404, f"no host {host_uid}")
    return remove_host(conn, ident, host_uid)


def remove_host(conn: Connection, ident: Identity, host_uid: str) -> Effects:
    """:func:`delete_host` once allowed (also when its owner is deleted)."""
    eff = Effects()
    running = conn.execute(sa.select(s.tasks.c.uid, s.tasks.c.work).where(
        s.tasks.c.host == host_uid, s.tasks.c.status.in_([TaskStatus.RUNNING, TaskStatus.DATAREQUEST]))).all()
    for task_uid, work_uid in running:
        _lose(conn, task_uid, work_uid, f"host {host_uid} deleted", "host deleted",
              f"host {host_uid} deleted by {ident.login}", eff)
    conn.execute(s.hosts.delete().where(s.hosts.c.uid == host_uid))
    c.event(conn, ident.uid, "host.delete", host_uid)
    return eff


def flush_alive(conn: Connection, hosts: dict[str, float], tasks: dict[str, float]) -> None:
    """Write the batched alive times."""
    if hosts:
        conn.execute(s.hosts.update().where(s.hosts.c.uid == sa.bindparam("h")).values(
            last_alive=sa.bindparam("t")), [{"h": h, "t": t} for h, t in hosts.items()])
    if tasks:
        stmt = s.tasks.update().where(s.tasks.c.uid == sa.bindparam("k"), s.tasks.c.last_alive < sa.bindparam("t"))
        conn.execute(stmt.values(last_alive=sa.bindparam("t")), [{"k": k, "t": t} for k, t in tasks.items()])


def sync(conn: Connection, ident: Identity, host: HostProfile, reports: list[Mapping[str, Any]], blob_exists: Any,
         lookup: list[str], picked: list[str]
         ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], list[dict[str, Any]], Effects]:
    """A worker's round trip in one transaction: its reports, the states of tasks its alive part asks about,
    and the claim of the works the scheduler picked for it. The host's ownership was checked by the caller."""
    outcomes, eff = report(conn, ident, host.uid, reports, blob_exists, True) if reports else ([], Effects())
    states = task_states(conn, host.uid, lookup)
    works, claimed = claim(conn, host, picked)
    return outcomes, states, works, eff.merge(claimed)


def task_states(conn: Connection, host_uid: str, task_uids: list[str]) -> dict[str, dict[str, Any]]:
    """Status, work and result of the given tasks of ``host_uid`` (alive replies use it)."""
    if not task_uids:
        return {}
    q = (sa.select(s.tasks.c.uid, s.tasks.c.status, s.tasks.c.work, s.works.c.task.label("current"),
                   s.works.c.status.label("work_status"), s.works.c.result)
         .select_from(s.tasks.outerjoin(s.works, s.works.c.uid == s.tasks.c.work))
         .where(s.tasks.c.uid.in_(task_uids), s.tasks.c.host == host_uid))
    return {r["uid"]: dict(r) for r in conn.execute(q).mappings()}


APP_TYPES_NEEDING_IMAGE = {AppType.VM, AppType.CONTAINER}
