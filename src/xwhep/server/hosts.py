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


def forget(st: ServerState, uid: str) -> None:
    """Host ``uid`` was deleted (here or by another server process)."""
    st.hosts.pop(uid, None)
    st.scheduler.forget_host(uid)
    st.inactive_hosts.discard(uid)


async def lookup(st: ServerState, ident: Identity, uid: str) -> tuple[HostProfile, int]:
    """The profile of host ``uid``, for an identity bound to that very host (a host token: services/hostkeys.py).

    Its owner with another credential gets 403 (use the host's token); anybody else 404 (no existence leak)."""
    if ident.host != uid:
        hit = st.hosts.get(uid)
        owner = hit[0].owner if hit is not None else None
        if owner is not None and owner == ident.uid and ident.host is None:
            raise ApiError(403, f"host {uid} speaks only with its own token: POST /api/v1/auth/host with its key")
        raise ApiError(404, f"no host {uid}")
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
    if hit[0].owner != ident.uid:  # a token of the host's former owner (the host was registered anew)
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
