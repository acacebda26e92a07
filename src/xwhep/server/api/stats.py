"""Read-only summaries the dashboard reads (and anyone else may): counts, history, a host's record, a work's
logs, one's tunnels. Each one applies the caller's rights like the listings it summarizes."""

from __future__ import annotations

import time
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Query

from xwhep.server.api import schemas as S
from xwhep.server.api.deps import FastJSON, identity, state_dep
from xwhep.server.api.models import UidPath
from xwhep.server.auth import Identity
from xwhep.server.services import common as c
from xwhep.server.services import logs, stats
from xwhep.server.state import ServerState

router = APIRouter(prefix="/api/v1", tags=["stats"])
Ident = Annotated[Identity, Depends(identity)]
St = Annotated[ServerState, Depends(state_dep)]


@router.get("/stats", response_model=S.Stats)
async def summary(ident: Ident, st: St, group: str | None = None, label: str | None = None,
                  session: str | None = None, by: Annotated[str | None, Query(pattern="^label$")] = None
                  ) -> FastJSON:
    """The caller's works by status (optionally of one group, session or label; ``by=label``: per label too), its
    groups' and sessions' progress, and the hosts it sees (registered, alive, cores alive)."""
    since = time.time() - st.config.alive_timeout
    return FastJSON(await st.db.run(stats.summary, ident, st.name, since, dict(st.liveness.hosts), group, label,
                                    session, by == "label"))


@router.get("/stats/history", response_model=S.StatsHistory)
async def history(ident: Ident, st: St, window: Annotated[float, Query(ge=1, le=7 * 86400)] = 900.0,
                  step: Annotated[float, Query(ge=1, le=3600)] = 10.0, group: str | None = None,
                  label: str | None = None, session: str | None = None) -> FastJSON:
    """Works by status over the last ``window`` seconds in ``step`` buckets, and per bucket how many reached each
    final status (throughput). Times are epoch seconds. At most 1,000 buckets: a longer window is answered with a
    longer step (the answer's ``step``)."""
    return FastJSON(await st.db.run(stats.history, ident, window, step, group, label, session))


@router.get("/hosts/{uid:uid}/stats", response_model=S.HostRecord)
async def host_record(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    """A host's record (its owner, administrators): tasks by status, time run, latest tasks."""
    return FastJSON(await st.db.run(stats.host_record, ident, c.ref(uid, "uid"), st.name))


@router.get("/works/{uid:uid}/logs", response_model=S.WorkLogs)
async def work_logs(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    """The end of a work's captured stdout and stderr, and the names in its result."""
    where = await st.db.run(logs.locate, ident, c.ref(uid, "uid"))
    path = st.store.path(where["sha256"]) if where.get("sha256") else None
    return FastJSON(await anyio.to_thread.run_sync(logs.read, where, path))


@router.get("/stats/tunnels", response_model=S.TunnelStats)
async def tunnels(ident: Ident, st: St) -> FastJSON:
    """The caller's open tunnels: its server proxies connected now and the relayed streams of its works
    (administrators: everyone's, and the relay's counters)."""
    hub = st.relay
    proxies = [{"address": ch.key, "owner": ch.owner, "opened": c.iso(ch.opened), "streams": ch.streams}
               for ch in hub.proxies.values() if ident.is_admin or ch.owner == ident.uid]
    works = {sm.work for sm in hub.active.values() if sm.work}
    readable = await st.db.run(_readable_works, ident, sorted(works)) if works else set()
    streams: dict[str, dict[str, Any]] = {}
    for sm in hub.active.values():
        if sm.work in readable:
            one = streams.setdefault(sm.work, {"work": sm.work, "streams": 0, "bytes_up": 0, "bytes_down": 0})
            one["streams"] += 1
            one["bytes_up"] += sm.bytes_up
            one["bytes_down"] += sm.bytes_down
    out: dict[str, Any] = {"proxies": proxies, "works": list(streams.values())}
    if ident.is_admin:
        out["relay"] = hub.stats()
    return FastJSON(out)


def _readable_works(conn: Any, ident: Identity, uids: list[str]) -> set[str]:
    import sqlalchemy as sa

    from xwhep.server.db import schema as s

    q = sa.select(s.works.c.uid).where(s.works.c.uid.in_(uids))
    vis = c.visible(s.works, ident)
    if vis is not None:
        q = q.where(vis)
    return set(conn.execute(q).scalars())
