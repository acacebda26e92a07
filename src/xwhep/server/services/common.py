"""Helpers every service uses: time, rendering, loading with rights, events, references."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.model import UsageLevel
from xwhep.core.rights import Action, Owned, can, format_rights
from xwhep.core.uri import BadUri, make_uri, to_uid
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.db.raw import last_rowid, note_events
from xwhep.server.errors import ApiError, bad_request

_TIME_FIELDS = {"created", "modified", "pending_since", "started", "completed", "last_alive", "ended", "time"}
_HIDDEN = {"password_hash", "key_hash"}  # secrets (hashed) never leave the server


def now() -> float:
    return time.time()


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def render(row: Mapping[str, Any], server: str) -> dict[str, Any]:
    """An object row as API JSON: times in ISO 8601, rights as 0x755, its xw:// URI."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        k = str(k)
        if k in _HIDDEN or k == "id":
            continue
        if k in _TIME_FIELDS:
            out[k] = iso(v)
        elif k == "access_rights":
            out[k] = format_rights(v)
        elif k == "grp":
            out["group"] = v
        else:
            out[k] = v
    if "uid" in out:
        out["uri"] = make_uri(server, out["uid"])
    return out


def ref(value: str, field: str) -> str:
    """A uid from a uid or URI given in ``field``; 400 naming the field otherwise."""
    try:
        return to_uid(value)
    except BadUri as exc:
        raise bad_request(f"{field}: {exc}", field) from None


def owner_group(conn: Connection, owner: str | None) -> str | None:
    if owner is None:
        return None
    return conn.execute(sa.select(s.users.c.usergroup).where(s.users.c.uid == owner)).scalar()


def allowed(conn: Connection, ident: Identity, action: Action, row: Mapping[str, Any]) -> bool:
    """``can()`` with the owner's group looked up only when it can matter."""
    owner = row.get("owner") or ""
    group = None
    if not ident.is_admin and owner != ident.uid and ident.usergroup:
        group = owner_group(conn, owner)
    return can(ident.actor, action, Owned(owner, row["access_rights"], group))


def load(conn: Connection, kind: str, uid: str) -> dict[str, Any]:
    """The row of ``kind`` named ``uid``, or 404."""
    table = s.TABLES_BY_TYPE[kind]
    row = conn.execute(sa.select(table).where(table.c.uid == uid)).mappings().first()
    if row is None:
        raise ApiError(404, f"no {kind} {uid}")
    return dict(row)


def load_checked(conn: Connection, ident: Identity, kind: str, uid: str, action: Action) -> dict[str, Any]:
    """Load and check rights: unreadable → 404 (no existence leak); readable but not allowed → 403."""
    row = load(conn, kind, uid)
    if not allowed(conn, ident, Action.READ, row):
        raise ApiError(404, f"no {kind} {uid}")
    if action != Action.READ and not allowed(conn, ident, action, row):
        raise ApiError(403, f"{ident.login} may not {action.value} {kind} {uid}")
    return row


def visible(table: sa.Table, ident: Identity) -> sa.ColumnElement[bool] | None:
    """SQL filter for the rows ``ident`` may read (None: everything)."""
    if ident.is_admin:
        return None
    if ident.is_worker or ident.level < UsageLevel.WORKER_USER:  # workers see through their tasks only
        own = table.c.owner == ident.uid
        if ident.level == UsageLevel.VWORKER_USER:
            return sa.or_(own, table.c.access_rights.op("&")(0x1000) != 0)
        return own
    other_read = table.c.access_rights.op("&")(4) != 0
    if not ident.usergroup:
        return sa.or_(table.c.owner == ident.uid, other_read)
    members = sa.select(s.users.c.uid).where(s.users.c.usergroup == ident.usergroup)
    if ident.level == UsageLevel.ADVANCED_USER:  # a group administrator reads all of its group's objects
        return sa.or_(table.c.owner == ident.uid, table.c.owner.in_(members), other_read)
    # like Unix: a member of the owner's group gets the group bits, everybody else the other bits
    return sa.or_(table.c.owner == ident.uid,
                  sa.and_(table.c.owner.in_(members), table.c.access_rights.op("&")(0x40) != 0),
                  sa.and_(table.c.owner.notin_(members), other_read))


def event(conn: Connection, actor: str | None, action: str, obj: str | None, source: str | None = None,
          target: str | None = None, detail: str | None = None) -> None:
    # parameters, not .values(...): literal values make SQLAlchemy build a new cache key per call
    t = now()
    r = conn.execute(_EVENT, {"time": t, "actor": actor, "action": action, "object": obj, "source": source,
                              "target": target, "detail": detail})
    ident = r.lastrowid if conn.dialect.name == "sqlite" else None
    note_events(conn, [(ident, t, action, obj, source, target, detail, actor)])


_EVENT = s.events.insert()


def events(conn: Connection, rows: Iterable[dict[str, Any]]) -> None:
    """Many events in one statement (the hot paths write one per work)."""
    batch = list(rows)
    if batch:
        t = now()
        for r in batch:
            r.setdefault("time", t)
            for k in ("actor", "object", "source", "target", "detail"):
                r.setdefault(k, None)
        conn.execute(s.events.insert(), batch)
        first = last_rowid(conn) - len(batch) + 1 if conn.dialect.name == "sqlite" else None
        note_events(conn, [(None if first is None else first + i, r["time"], r["action"], r["object"], r["source"],
                            r["target"], r["detail"], r["actor"]) for i, r in enumerate(batch)])
