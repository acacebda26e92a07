"""Read-only summaries for the dashboard: counts by status, their history, bags' progress, a host's record.

Every query applies the caller's rights in SQL (:func:`common.visible`), so a summary never counts what the caller
could not read one by one. Costs are bounded by what changed recently, not by the database's history: the history
reads only the events of its window, found by bisecting the event ids (events are appended in time order).
"""

from __future__ import annotations

import math
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.model import TaskStatus, WorkStatus
from xwhep.core.states import is_final
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError, bad_request
from xwhep.server.services import common as c

STATUSES = [st.value for st in WorkStatus]
FINAL = [st for st in STATUSES if is_final(st)]
MAX_BAGS = 50  # bags in one summary (the most recent): a dashboard shows a screenful, not thousands
MAX_LABELS = 50
MAX_POINTS = 1000  # buckets in one history


def _works_filter(ident: Identity, group: str | None, label: str | None,
                  session: str | None) -> list[sa.ColumnElement[bool]]:
    w = s.works.c
    where: list[sa.ColumnElement[bool]] = []
    vis = c.visible(s.works, ident)
    if vis is not None:
        where.append(vis)
    if group:
        where.append(w.grp == c.ref(group, "group"))
    if session:
        where.append(w.session == c.ref(session, "session"))
    if label:
        where.append(w.label == label)
    return where


def _counts(conn: Connection, where: list[sa.ColumnElement[bool]]) -> dict[str, int]:
    q = sa.select(s.works.c.status, sa.func.count()).where(*where).group_by(s.works.c.status)
    return {str(st): int(n) for st, n in conn.execute(q)}


def summary(conn: Connection, ident: Identity, server: str, alive_since: float, live_hosts: dict[str, float],
            group: str | None = None, label: str | None = None, session: str | None = None,
            by_label: bool = False) -> dict[str, Any]:
    """Counts of the works the caller may read by status (optionally of one group, session or label), its bags'
    progress (the most recent :data:`MAX_BAGS` groups and sessions), per label on request, and the hosts it sees."""
    where = _works_filter(ident, group, label, session)
    works = _counts(conn, where)
    out: dict[str, Any] = {"time": c.iso(c.now()), "works": works, "total": sum(works.values()),
                           "bags": _bags(conn, ident, server), "hosts": _hosts(conn, ident, alive_since, live_hosts)}
    if by_label:
        w = s.works.c
        q = (sa.select(w.label, w.status, sa.func.count()).where(*where, w.label.is_not(None))
             .group_by(w.label, w.status))
        labels: dict[str, dict[str, int]] = {}
        for lab, st, n in conn.execute(q):
            labels.setdefault(str(lab), {})[str(st)] = int(n)
        top = sorted(labels.items(), key=lambda kv: -sum(kv[1].values()))[:MAX_LABELS]
        out["labels"] = [{"label": lab, "works": counts, "total": sum(counts.values())} for lab, counts in top]
    return out


def _bags(conn: Connection, ident: Identity, server: str) -> list[dict[str, Any]]:
    """The caller's readable groups and sessions, newest first, each with its works' counts by status."""
    out = []
    wvis = c.visible(s.works, ident)
    for kind, table, col in (("group", s.groups, s.works.c.grp), ("session", s.sessions, s.works.c.session)):
        q = sa.select(table).order_by(table.c.created.desc()).limit(MAX_BAGS)
        vis = c.visible(table, ident)
        if vis is not None:
            q = q.where(vis)
        rows = {r["uid"]: dict(r) for r in conn.execute(q).mappings()}
        if not rows:
            continue
        counts: dict[str, dict[str, int]] = {uid: {} for uid in rows}
        cq = sa.select(col, s.works.c.status, sa.func.count()).where(col.in_(list(rows)))
        if wvis is not None:
            cq = cq.where(wvis)
        for bag, st, n in conn.execute(cq.group_by(col, s.works.c.status)):
            counts[bag][str(st)] = int(n)
        for uid, row in rows.items():
            item = c.render(row, server)
            item.update(kind=kind, works=counts[uid], total=sum(counts[uid].values()))
            out.append(item)
    out.sort(key=lambda b: str(b["created"]), reverse=True)
    return out[:MAX_BAGS]


def _hosts(conn: Connection, ident: Identity, alive_since: float, live: dict[str, float]) -> dict[str, Any]:
    h = s.hosts.c
    q = sa.select(h.uid, h.cores, h.active, h.last_alive)
    if not ident.is_admin:  # as GET /hosts: one's own hosts and the public ones
        q = q.where(sa.or_(h.owner == ident.uid, h.access_rights.op("&")(4) != 0))
    registered = alive = cores = 0
    for uid, n, _active, last in conn.execute(q):
        registered += 1
        seen = live.get(uid) or last
        if seen is not None and seen >= alive_since:
            alive += 1
            cores += int(n or 0)
    return {"registered": registered, "alive": alive, "cores_alive": cores}


# -- history -------------------------------------------------------------------------------------------------------

def first_event_at(conn: Connection, since: float) -> int:
    """The smallest event id whose time is at or after ``since`` (one past the last id if none), by bisection over
    the primary key: events are appended in time order (within a few ms across server processes), so this costs
    about log2(events) index lookups instead of a scan of the whole log."""
    e = s.events.c
    lo = conn.execute(sa.select(sa.func.min(e.id))).scalar()
    hi = conn.execute(sa.select(sa.func.max(e.id))).scalar()
    if lo is None or hi is None:
        return 1
    hi += 1
    at = sa.select(e.time).where(e.id >= sa.bindparam("i")).order_by(e.id).limit(1)
    while lo < hi:
        mid = (lo + hi) // 2
        t = conn.execute(at, {"i": mid}).scalar()
        if t is None or t >= since:
            hi = mid
        else:
            lo = mid + 1
    return int(lo)


def history(conn: Connection, ident: Identity, window: float, step: float, group: str | None = None,
            label: str | None = None, session: str | None = None) -> dict[str, Any]:
    """Works by status over the last ``window`` seconds in buckets of ``step`` seconds, and how many reached each
    final status per bucket (throughput).

    The counts are walked back from the current ones through the window's status events (``work.submit`` and
    ``work.transition``) of the works the caller may read: exact for the works that still exist, at the cost of
    reading only the window's events. Times are epoch seconds (the bucket starts), as charting libraries take them.
    """
    if not 1 <= step <= 3600:
        raise bad_request("step: 1 to 3600 seconds", "step")
    if not 1 <= window <= 7 * 86400:
        raise bad_request("window: 1 s to 7 days (604,800 s)", "window")
    # at least one bucket and at most MAX_POINTS: a longer step then (the answer's "step" says which was used)
    step = max(step, math.ceil(window / MAX_POINTS))
    n = max(1, int(window // step))
    now = c.now()
    end = (int(now // step) + 1) * step  # the current bucket is the last, partly filled
    start = end - n * step
    where = _works_filter(ident, group, label, session)
    current = _counts(conn, where)
    first = first_event_at(conn, start)
    e, w = s.events.c, s.works.c
    dialect = conn.dialect.name
    offset = (e.time - start) / step
    bucket = sa.cast(offset, sa.Integer) if dialect == "sqlite" else sa.cast(sa.func.floor(offset), sa.Integer)
    q = (sa.select(bucket.label("b"), e.action, e.source, e.target, sa.func.count())
         .select_from(s.events.join(s.works, w.uid == e.object))
         .where(e.id >= first, e.time >= start, e.action.in_(["work.submit", "work.transition"]), *where)
         .group_by(bucket, e.action, e.source, e.target))
    moves: dict[int, list[tuple[str, str | None, str | None, int]]] = {}
    for b, action, source, target, count in conn.execute(q):
        moves.setdefault(min(int(b), n - 1), []).append((str(action), source, target, int(count)))
    series = {st: [0] * n for st in STATUSES}
    finished = {st: [0] * n for st in FINAL}
    level = {st: current.get(st, 0) for st in STATUSES}
    for i in range(n - 1, -1, -1):  # the level at the end of bucket i, then undo its moves
        for st in STATUSES:
            series[st][i] = level[st]
        for action, source, target, count in moves.get(i, ()):
            if target in level:
                level[target] -= count
            if action == "work.transition" and source in level:
                level[source] += count
            if action == "work.transition" and target in finished:
                finished[target][i] += count
    return {"start": start, "step": step, "times": [start + i * step for i in range(n)],
            "status": {st: v for st, v in series.items() if any(v)}, "finished": finished, "now": now}


# -- a host's record -----------------------------------------------------------------------------------------------

def host_record(conn: Connection, ident: Identity, uid: str, server: str, recent: int = 20) -> dict[str, Any]:
    """What a host did: its tasks by status, the time they ran, its latest tasks. Its owner and administrators
    only (404 for anyone else: a volunteer's record is its own business)."""
    row = conn.execute(sa.select(s.hosts).where(s.hosts.c.uid == uid)).mappings().first()
    if row is None or not (ident.is_admin or row["owner"] == ident.uid):
        raise ApiError(404, f"no host {uid}")
    t = s.tasks.c
    counts = {str(st): int(n) for st, n in conn.execute(
        sa.select(t.status, sa.func.count()).where(t.host == uid).group_by(t.status))}
    ran = conn.execute(sa.select(sa.func.sum(t.ended - t.started)).where(t.host == uid, t.ended.is_not(None)))
    latest = conn.execute(sa.select(t.uid, t.work, t.trial, t.status, t.started, t.ended, t.return_code, t.reason)
                          .where(t.host == uid).order_by(t.started.desc()).limit(recent)).mappings()
    return {"host": c.render(dict(row), server), "tasks": counts,
            "done": counts.get(TaskStatus.COMPLETED, 0),
            "failed": sum(counts.get(x, 0) for x in (TaskStatus.ERROR, TaskStatus.FAILED)),
            "interrupted": sum(counts.get(x, 0) for x in (TaskStatus.ABORTED, TaskStatus.LOST)),
            "run_seconds": float(ran.scalar() or 0.0), "recent": [c.render(dict(r), server) for r in latest],
            "time": c.iso(time.time())}
