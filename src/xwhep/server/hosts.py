"""The host cache: scheduler profiles of registered workers, refreshed on registration."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from xwhep.core.matching import HostProfile
from xwhep.core.model import UsageLevel
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError
from xwhep.server.services.dispatch import host_profile
from xwhep.server.state import ServerState


def remember(st: ServerState, row: dict[str, Any], level: UsageLevel, group: str | None) -> HostProfile:
    profile = host_profile(row, level, group)
    _, version = st.hosts.get(row["uid"], (None, 0))
    st.hosts[row["uid"]] = (profile, version + 1)
    st.scheduler.forget_host(row["uid"])
    return profile


async def lookup(st: ServerState, ident: Identity, uid: str) -> tuple[HostProfile, int]:
    """The profile of host ``uid``, which must belong to ``ident`` (404 otherwise: no existence leak)."""
    hit = st.hosts.get(uid)
    if hit is None:
        def load(conn: Any) -> tuple[dict[str, Any], UsageLevel, str | None] | None:
            row = conn.execute(sa.select(s.hosts).where(s.hosts.c.uid == uid)).mappings().first()
            if row is None:
                return None
            owner = conn.execute(sa.select(s.users.c.level, s.users.c.usergroup)
                                 .where(s.users.c.uid == row["owner"])).first()
            level = UsageLevel[owner[0]] if owner else UsageLevel.WORKER_USER
            return dict(row), level, owner[1] if owner else None

        found = await st.db.run(load)
        if found is None:
            raise ApiError(404, f"no host {uid}")
        remember(st, *found)
        hit = st.hosts[uid]
    if hit[0].owner != ident.uid and not ident.is_admin:
        raise ApiError(404, f"no host {uid}")
    return hit


async def all_profiles(st: ServerState) -> list[HostProfile]:
    """Every registered host (for ``why``)."""
    def load(conn: Any) -> list[HostProfile]:
        cols = (s.hosts, s.users.c.level.label("owner_level"), s.users.c.usergroup.label("owner_grp"))
        q = sa.select(*cols).select_from(s.hosts.outerjoin(s.users, s.users.c.uid == s.hosts.c.owner))
        return [host_profile(r, UsageLevel[r["owner_level"] or "WORKER_USER"], r["owner_grp"])
                for r in conn.execute(q).mappings()]

    return await st.db.run(load)
