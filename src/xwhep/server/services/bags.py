"""Sessions (temporary bags of works) and groups (lasting bags of works)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.model import UsageLevel
from xwhep.core.rights import Action
from xwhep.core.uri import new_uid
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.errors import bad_request, forbidden
from xwhep.server.services import common as c
from xwhep.server.services.effects import Effects
from xwhep.server.services.works import delete_many


def create(conn: Connection, ident: Identity, kind: str, spec: dict[str, Any], server: str) -> dict[str, Any]:
    if ident.is_worker or ident.level < UsageLevel.STANDARD_USER:
        raise forbidden(f"{ident.login} ({ident.level.name}) may not create {kind}s")
    label = spec.get("label")
    if label is not None and (not isinstance(label, str) or len(label) > 255):
        raise bad_request("label: at most 255 characters", "label")
    table = s.TABLES_BY_TYPE[kind]
    t = c.now()
    uid = new_uid()
    conn.execute(table.insert().values(uid=uid, owner=ident.uid, access_rights=0x700, created=t, modified=t,
                                       label=label))
    c.event(conn, ident.uid, f"{kind}.create", uid)
    return c.render(c.load(conn, kind, uid), server)


def listing(conn: Connection, ident: Identity, kind: str, server: str) -> list[dict[str, Any]]:
    table = s.TABLES_BY_TYPE[kind]
    q = sa.select(table)
    vis = c.visible(table, ident)
    if vis is not None:
        q = q.where(vis)
    return [c.render(r, server) for r in conn.execute(q.order_by(table.c.created)).mappings()]


def delete(conn: Connection, ident: Identity, kind: str, uid: str) -> Effects:
    """Delete the bag and its works (a session's works go with it, as in XWHEP)."""
    c.load_checked(conn, ident, kind, uid, Action.DELETE)
    col = s.works.c.session if kind == "session" else s.works.c.grp
    eff = delete_many(conn, ident, col == uid)
    conn.execute(s.TABLES_BY_TYPE[kind].delete().where(s.TABLES_BY_TYPE[kind].c.uid == uid))
    c.event(conn, ident.uid, f"{kind}.delete", uid)
    return eff
