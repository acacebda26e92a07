"""The worker protocol: register a host, request works (long-poll), alive signals, reports.

These are the hot paths: no per-request password hashing, alive does no database write (times are batched),
a request claims up to ``max`` works in one transaction.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request

from xwhep.core.matching import HostProfile
from xwhep.core.model import TaskStatus
from xwhep.server import hosts as hostcache
from xwhep.server.api import schemas as S
from xwhep.server.api.deps import FastJSON, identity, state_dep
from xwhep.server.api.models import (
    AliveIn,
    HostLoginIn,
    HostSpec,
    ReportsIn,
    RequestIn,
    SyncIn,
    UidPath,
    dump,
)
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError
from xwhep.server.services import common as c
from xwhep.server.services import dispatch, hostkeys
from xwhep.server.state import ServerState

router = APIRouter(prefix="/api/v1", tags=["worker"])
Ident = Annotated[Identity, Depends(identity)]
St = Annotated[ServerState, Depends(state_dep)]


@router.post("/hosts", status_code=201, response_model=S.HostRegistered)
async def register(body: HostSpec, ident: Ident, st: St) -> FastJSON:
    """Register a host with its description and sharings, or refresh the caller's host (``uid`` with its
    ``key``). A new host's answer carries its ``key`` (shown once: keep it) and, always, a ``token``
    bound to the host: every other host call needs it."""
    row, key = await st.db.run_grouped(dispatch.register, ident, dump(body), st.config.max_hosts_per_user)
    hostcache.remember(st, row, ident.level, ident.usergroup)
    st.liveness.hosts[row["uid"]] = time.time()
    out = c.render(row, st.name)
    out["alive_period"] = st.config.alive_period
    if key is not None:
        out["key"] = key
    out["token"], out["expires_in"] = st.tokens.issue(hostkeys.bound(ident, row["uid"]))
    return FastJSON(out, status_code=201)


@router.post("/auth/host", tags=["public"], response_model=S.HostToken)
async def host_login(body: HostLoginIn, request: Request, st: St) -> FastJSON:
    """A host's token from its key (issued at registration): how a worker renews its token after it expired or
    after a restart. Failures are rate-limited per address (429 with Retry-After)."""
    address = request.client.host if request.client else "unknown"
    key = f"host:{address}"
    wait = st.login_failures_address.retry_after(key)
    if wait:
        raise ApiError(429, f"too many failed host logins: retry in {wait:.0f} s", "key",
                       {"Retry-After": f"{max(1, round(wait))}"})
    uid = c.ref(body.host, "host")
    ident = await st.db.run(hostkeys.host_identity, uid, body.key)
    if ident is None:
        st.login_failures_address.fail(key)
        await st.db.run(c.event, None, "auth.host.failed", None, None, None, f"host {uid} from {address}")
        raise ApiError(401, "host login failed: unknown host or wrong key (register again)", "key")
    token, ttl = st.tokens.issue(ident)
    return FastJSON({"token": token, "expires_in": ttl, "host": uid, "user": ident.uid, "level": ident.level.name})


@router.delete("/hosts/{uid:uid}", response_model=S.Deleted)
async def delete_host(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    """Remove a host (its owner or an administrator): its key and tokens are refused at once, and the works it
    was running go back to PENDING (or ERROR past their retries) without waiting for the alive timeout."""
    uid = c.ref(uid, "uid")
    eff = await st.db.run(dispatch.delete_host, ident, uid)
    hostcache.forget(st, uid)
    eff.apply(st)
    return FastJSON({"deleted": uid})


@router.get("/hosts", response_model=list[S.Host])
async def list_hosts(ident: Ident, st: St) -> FastJSON:
    def run(conn: Any) -> list[dict[str, Any]]:
        q = sa.select(s.hosts).order_by(s.hosts.c.name)
        if ident.is_worker:  # a volunteer sees none of the other volunteers' hosts (host tokens: not in scope)
            q = q.where(sa.false())
        elif not ident.is_admin:
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


@router.post("/hosts/{uid:uid}/request", response_model=S.Assignments)
async def request_works(uid: UidPath, body: RequestIn, ident: Ident, st: St) -> FastJSON:
    """Up to ``max`` matching works, waiting up to ``wait`` seconds for some to arrive (long-poll)."""
    uid = c.ref(uid, "uid")
    host, version = await hostcache.lookup(st, ident, uid)
    st.inactive_hosts.discard(uid)  # asking for work means active again
    deadline = time.monotonic() + min(body.wait, st.config.max_long_poll)
    return FastJSON({"works": await _long_poll(st, host, version, body.max, deadline)})


async def _long_poll(st: ServerState, host: HostProfile, version: int, k: int, deadline: float
                     ) -> list[dict[str, Any]]:
    """Claim up to ``k`` works for ``host`` as soon as some match, or give up at ``deadline``."""
    uid = host.uid
    while True:
        if uid in st.inactive_hosts or st.scheduler.closing:  # deactivated while this long-poll waited
            return []
        st.liveness.hosts[uid] = time.time()
        hold: dict[str, Any] = {}
        picked = st.scheduler.pick(host, k, version, hold)
        if picked:
            try:
                out, eff = await st.db.run_grouped(dispatch.claim, host, picked)
            except BaseException as exc:
                _unclaimed(st, hold, exc)
                raise
            eff.apply(st)
            if out:
                return out
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return []
        await st.scheduler.wait(remaining)


def _unclaimed(st: ServerState, hold: dict[str, Any], exc: BaseException) -> None:
    """The claim of picked works did not commit: they are still PENDING in the database; back into the index."""
    st.scheduler.put_back(hold)
    if not isinstance(exc, (ApiError, asyncio.CancelledError)):  # an unexpected failure: trust only the database
        st.resync_needed = True


def _alive_mark(st: ServerState, uid: str, tasks: list[str], results: list[str]) -> list[str]:
    """Record host ``uid``'s alive signal in memory; returns the tasks whose state must be read from the database.

    A task is kept alive only by the host it was given to: tasks known to run elsewhere are ignored (the reply
    says stop), unknown ones and held results are marked once the database says they are this host's."""
    t = time.time()
    live = st.liveness
    live.hosts[uid] = t
    lookup = []
    for task in tasks:
        running = live.active_tasks.get(task)
        if running is None:
            lookup.append(task)
        elif running[1] == uid:
            live.tasks[task] = t
    return lookup + list(results)


def _alive_reply(st: ServerState, uid: str, tasks: list[str], results: list[str],
                 states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per task continue or stop; results acknowledged, to send again, or never reported. ``states`` holds only
    tasks of host ``uid`` (read with that filter): another host's task is never kept alive nor forgotten here."""
    t = time.time()
    live = st.liveness
    orders = {}
    for task in tasks:
        running = live.active_tasks.get(task)
        if running is not None:
            orders[task] = "continue" if running[1] == uid else "stop"
            continue
        info = states.get(task)
        if info and info["status"] == TaskStatus.RUNNING and info["current"] == task:
            live.active_tasks[task] = (info["work"], uid)
            live.tasks[task] = t
            orders[task] = "continue"
        else:
            orders[task] = "stop"
            if info:
                live.tasks.pop(task, None)
    ack, resend, report = [], {}, []
    for task in results:
        info = states.get(task)
        if info and info["status"] == TaskStatus.DATAREQUEST and info["current"] == task and info["result"]:
            resend[task] = info["result"]
            live.tasks[task] = t
        elif info and info["status"] == TaskStatus.RUNNING and info["current"] == task:
            report.append(task)  # the server never got this report (e.g. it was down): send it, keep the result
            live.tasks[task] = t
        else:
            ack.append(task)
            if info:
                live.tasks.pop(task, None)
    return {"tasks": orders, "ack": ack, "resend": resend, "report": report, "alive_period": st.config.alive_period}


def _set_active(st: ServerState, uid: str, active: bool) -> None:
    if active:
        st.inactive_hosts.discard(uid)
    elif uid not in st.inactive_hosts:  # a deactivated worker gets no more works: release its long-poll now
        st.inactive_hosts.add(uid)
        st.scheduler.notify()


@router.post("/hosts/{uid:uid}/alive", response_model=S.AliveReply)
async def alive(uid: UidPath, body: AliveIn, ident: Ident, st: St) -> FastJSON:
    """Per-host and per-task alive signal. The reply says, per task, continue or stop; it acknowledges results
    the server holds (the worker may drop them) and asks again for results it still misses."""
    return FastJSON(await alive_reply(st, ident, uid, body))


async def alive_reply(st: ServerState, ident: Identity, uid: str, body: AliveIn) -> dict[str, Any]:
    """The alive call itself (also served by :mod:`~xwhep.server.api.fastpath`)."""
    uid = c.ref(uid, "uid")
    await hostcache.lookup(st, ident, uid)
    lookup = _alive_mark(st, uid, body.tasks, body.results)
    states = await st.db.run_grouped(dispatch.task_states, uid, lookup) if lookup else {}
    _set_active(st, uid, body.active)
    return _alive_reply(st, uid, body.tasks, body.results, states)


@router.post("/hosts/{uid:uid}/sync", response_model=S.SyncReply)
async def sync(uid: UidPath, body: SyncIn, ident: Ident, st: St) -> FastJSON:
    """A worker's whole round trip in one call and one transaction: ``reports`` (as ``/reports``), the alive
    part (``tasks``, ``results``, ``active`` as ``/alive``) and up to ``max`` new works, waiting up to ``wait``
    seconds for some (as ``/request``). The reply carries all three answers. This is the hot path: a worker
    finishing short jobs costs the server one request per round, not three."""
    return FastJSON(await sync_reply(st, ident, uid, body))


async def sync_reply(st: ServerState, ident: Identity, uid: str, body: SyncIn) -> dict[str, Any]:
    """The sync call itself (also served by :mod:`~xwhep.server.api.fastpath`)."""
    uid = c.ref(uid, "uid")
    host, version = await hostcache.lookup(st, ident, uid)
    lookup = _alive_mark(st, uid, body.tasks, body.results)
    _set_active(st, uid, body.active)
    want = body.max if body.active else 0
    hold: dict[str, Any] = {}
    picked = st.scheduler.pick(host, want, version, hold) if want else []
    reports = [dump(r) for r in body.reports]
    try:
        outcomes, states, works, eff = await st.db.run_grouped(dispatch.sync, ident, host, reports,
                                                               st.store.exists, lookup, picked)
    except BaseException as exc:
        _unclaimed(st, hold, exc)  # e.g. a malformed report in the same call: nothing of it landed
        raise
    eff.apply(st)
    out = _alive_reply(st, uid, body.tasks, body.results, states)
    out["reports"] = outcomes
    if not works and want and body.wait > 0:
        works = await _long_poll(st, host, version, want, time.monotonic() + min(body.wait, st.config.max_long_poll))
    out["works"] = works
    return out


@router.post("/hosts/{uid:uid}/reports", response_model=S.ReportOutcomes)
async def reports(uid: UidPath, body: ReportsIn, ident: Ident, st: St) -> FastJSON:
    """Finished tasks. Outcome per task: ``done``; ``upload`` (send the result bytes to data ``result``);
    ``stale`` (the attempt no longer counts: the work was reassigned, removed, or this is not your task)."""
    uid = c.ref(uid, "uid")
    await hostcache.lookup(st, ident, uid)
    st.liveness.hosts[uid] = time.time()
    outcomes, eff = await st.db.run_grouped(dispatch.report, ident, uid, [dump(r) for r in body.reports],
                                            st.store.exists)
    eff.apply(st)
    return FastJSON({"reports": outcomes})
