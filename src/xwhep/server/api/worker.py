"""The worker protocol: register a host, request works (long-poll), alive signals, reports.

These are the hot paths: no per-request password hashing, alive does no database write (times are batched),
a request claims up to ``max`` works in one transaction.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends

from xwhep.core.model import TaskStatus
from xwhep.server import hosts as hostcache
from xwhep.server.api.deps import FastJSON, identity, state_dep
from xwhep.server.api.models import AliveIn, HostSpec, ReportsIn, RequestIn, dump
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.services import common as c
from xwhep.server.services import dispatch
from xwhep.server.state import ServerState

router = APIRouter(prefix="/api/v1", tags=["worker"])
Ident = Annotated[Identity, Depends(identity)]
St = Annotated[ServerState, Depends(state_dep)]


@router.post("/hosts", status_code=201)
async def register(body: HostSpec, ident: Ident, st: St) -> FastJSON:
    """Register (or re-register) the caller's host with its description and sharings."""
    row = await st.db.run(dispatch.register, ident, dump(body))
    hostcache.remember(st, row, ident.level, ident.usergroup)
    st.liveness.hosts[row["uid"]] = time.time()
    out = c.render(row, st.name)
    out["alive_period"] = st.config.alive_period
    return FastJSON(out, status_code=201)


@router.get("/hosts")
async def list_hosts(ident: Ident, st: St) -> FastJSON:
    def run(conn: Any) -> list[dict[str, Any]]:
        q = sa.select(s.hosts).order_by(s.hosts.c.name)
        if not ident.is_admin:
            q = q.where(sa.or_(s.hosts.c.owner == ident.uid, s.hosts.c.access_rights.op("&")(4) != 0))
        rows = [c.render(r, st.name) for r in conn.execute(q).mappings()]
        running = dict(conn.execute(sa.select(s.tasks.c.host, sa.func.count()).where(
            s.tasks.c.status == TaskStatus.RUNNING).group_by(s.tasks.c.host)).all())
        for r in rows:
            r["running"] = running.get(r["uid"], 0)
            r["active"] = r["uid"] not in st.inactive_hosts
            live = st.liveness.hosts.get(r["uid"])
            if live:
                r["last_alive"] = c.iso(live)
        return rows

    return FastJSON(await st.db.run(run))


@router.post("/hosts/{uid}/request")
async def request_works(uid: str, body: RequestIn, ident: Ident, st: St) -> FastJSON:
    """Up to ``max`` matching works, waiting up to ``wait`` seconds for some to arrive (long-poll)."""
    uid = c.ref(uid, "uid")
    host, version = await hostcache.lookup(st, ident, uid)
    deadline = time.monotonic() + min(body.wait, st.config.max_long_poll)
    st.inactive_hosts.discard(uid)  # asking for work means active again
    while True:
        if uid in st.inactive_hosts:  # deactivated (alive said so) while this long-poll waited
            return FastJSON({"works": []})
        st.liveness.hosts[uid] = time.time()
        picked = st.scheduler.pick(host, body.max, version)
        if picked:
            try:
                out, eff = await st.db.run(dispatch.claim, host, picked)
            except BaseException:
                st.resync_needed = True  # the picked works are still PENDING in the database
                raise
            eff.apply(st)
            if out:
                return FastJSON({"works": out})
        remaining = deadline - time.monotonic()
        if remaining <= 0 or st.scheduler.closing:
            return FastJSON({"works": []})
        await st.scheduler.wait(remaining)


@router.post("/hosts/{uid}/alive")
async def alive(uid: str, body: AliveIn, ident: Ident, st: St) -> FastJSON:
    """Per-host and per-task alive signal. The reply says, per task, continue or stop; it acknowledges results
    the server holds (the worker may drop them) and asks again for results it still misses."""
    uid = c.ref(uid, "uid")
    await hostcache.lookup(st, ident, uid)
    t = time.time()
    live = st.liveness
    live.hosts[uid] = t
    for task in body.tasks:
        live.tasks[task] = t
    for task in body.results:
        live.tasks[task] = t
    unknown = [task for task in body.tasks if task not in live.active_tasks]
    states: dict[str, dict[str, Any]] = {}
    if unknown or body.results:
        states = await st.db.run(dispatch.task_states, uid, unknown + list(body.results))
    orders = {}
    for task in body.tasks:
        if task in live.active_tasks:
            orders[task] = "continue"
            continue
        info = states.get(task)
        if info and info["status"] == TaskStatus.RUNNING and info["current"] == task:
            live.active_tasks[task] = info["work"]
            orders[task] = "continue"
        else:
            orders[task] = "stop"
            live.tasks.pop(task, None)
    ack, resend, report = [], {}, []
    for task in body.results:
        info = states.get(task)
        if info and info["status"] == TaskStatus.DATAREQUEST and info["current"] == task and info["result"]:
            resend[task] = info["result"]
        elif info and info["status"] == TaskStatus.RUNNING and info["current"] == task:
            report.append(task)  # the server never got this report (e.g. it was down): send it, keep the result
        else:
            ack.append(task)
            live.tasks.pop(task, None)
    if body.active:
        st.inactive_hosts.discard(uid)
    elif uid not in st.inactive_hosts:  # a deactivated worker gets no more works: release its long-poll now
        st.inactive_hosts.add(uid)
        st.scheduler.notify()
    return FastJSON({"tasks": orders, "ack": ack, "resend": resend, "report": report,
                     "alive_period": st.config.alive_period})


@router.post("/hosts/{uid}/reports")
async def reports(uid: str, body: ReportsIn, ident: Ident, st: St) -> FastJSON:
    """Finished tasks. Outcome per task: ``done``; ``upload`` (send the result bytes to data ``result``);
    ``stale`` (the attempt no longer counts: the work was reassigned, removed, or this is not your task)."""
    uid = c.ref(uid, "uid")
    await hostcache.lookup(st, ident, uid)
    st.liveness.hosts[uid] = time.time()
    outcomes, eff = await st.db.run(dispatch.report, ident, uid, [dump(r) for r in body.reports],
                                    st.store.exists)
    eff.apply(st)
    return FastJSON({"reports": outcomes})
