"""``POST /works/wait`` on a group or a label: a long-poll on the counts of its works' statuses.

The answer, ``{"counts": {status: n}, "total": n, "final": bool}``, comes as soon as the counts differ from
``known_counts``, every work is final, or ``timeout`` passed: one request per change for a bag of any size (the
uid form answers one status per work, and stops at 10,000 works). Same wake-ups and rate limit as the uid form.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.rights import Action
from xwhep.core.states import is_final
from xwhep.server.api.models import WaitIn
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.errors import bad_request
from xwhep.server.services import common as c
from xwhep.server.state import ServerState

SLICE = 2.0  # re-read at least this often (other server processes' changes), as the uid form
INTERVAL = 0.2  # and at most this often


def counts(conn: Connection, ident: Identity, group: str | None, label: str | None) -> dict[str, int]:
    """status → number of the works of ``group`` (readable by ``ident``: 404 otherwise) or with ``label`` that
    ``ident`` reads."""
    w = s.works
    q = sa.select(w.c.status, sa.func.count()).group_by(w.c.status)
    if group is not None:
        c.load_checked(conn, ident, "group", group, Action.READ)
        q = q.where(w.c.grp == group)
    if label is not None:
        q = q.where(w.c.label == label)
    seen = c.visible(w, ident)
    if seen is not None:
        q = q.where(seen)
    return {status: int(n) for status, n in conn.execute(q)}


async def wait_bag(body: WaitIn, ident: Identity, st: ServerState) -> dict[str, Any]:
    """The long-poll itself (see the module's doc)."""
    if body.works:
        raise bad_request("works: give works, or a group or a label, not both", "works")
    group = c.ref(body.group, "group") if body.group is not None else None
    deadline = time.monotonic() + body.timeout
    while True:
        last = time.monotonic()
        now = await st.db.run(counts, ident, group, body.label)
        final = all(is_final(status) for status in now)
        if now != body.known_counts or final or deadline <= time.monotonic() or st.scheduler.closing:
            return {"counts": now, "total": sum(now.values()), "final": final}
        await st.work_changes.wait(min(deadline - time.monotonic(), SLICE))
        pause = min(INTERVAL - (time.monotonic() - last), deadline - time.monotonic())
        if pause > 0:
            await asyncio.sleep(pause)  # a rate limit, not a synchronisation
