"""Mandates: a user lets a MANDATED_USER (a portal, a workflow engine) act on its behalf.

A mandated request carries ``X-Xw-On-Behalf-Of: LOGIN|UID`` next to the mandatary's own credentials. It then runs
as the mandator — its rights, its ownership of what gets created — and every such use is an event naming both
(``mandate.use``: actor the mandatary, object the mandator). Without a live mandate the request is refused (403,
``access.denied``). Revoking (deleting) a mandate, or deleting either user, ends it at once.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.model import UsageLevel
from xwhep.core.uri import BadUri, is_uid, to_uid
from xwhep.core.uri import new_uid as make_uid
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError, bad_request, forbidden
from xwhep.server.services import common as c

MAX_EXPIRES_IN = 10 * 365 * 86400.0


def user_row(conn: Connection, ref: str, field: str) -> dict[str, Any]:
    """A user by login, uid or ``xw://`` URI; 404 naming ``field`` otherwise."""
    if not isinstance(ref, str) or not ref.strip():
        raise bad_request(f"{field}: a login, uid or URI is required", field)
    ref = ref.strip()
    q = sa.select(s.users)
    if ref.startswith("xw://") or is_uid(ref):
        try:
            q = q.where(s.users.c.uid == to_uid(ref))
        except BadUri as exc:
            raise bad_request(f"{field}: {exc}", field) from None
    else:
        q = q.where(s.users.c.login == ref)
    row = conn.execute(q).mappings().first()
    if row is None:
        raise ApiError(404, f"{field}: no user {ref}", field)
    return dict(row)


def _render(row: dict[str, Any], logins: dict[str, str], server: str) -> dict[str, Any]:
    out = c.render(row, server)
    out["mandator_login"] = logins.get(row["mandator"])
    out["mandatary_login"] = logins.get(row["mandatary"])
    out["expires"] = c.iso(row["expires"])
    return out


def _logins(conn: Connection, uids: set[str]) -> dict[str, str]:
    if not uids:
        return {}
    return dict(conn.execute(sa.select(s.users.c.uid, s.users.c.login).where(s.users.c.uid.in_(uids))).all())


def grant(conn: Connection, ident: Identity, spec: dict[str, Any], server: str) -> dict[str, Any]:
    """``ident`` mandates ``spec["mandatary"]`` (an administrator may grant for ``spec["mandator"]``); granting
    again renews the mandate (new expiry)."""
    if ident.is_worker or ident.level < UsageLevel.STANDARD_USER:
        raise forbidden(f"{ident.login} ({ident.level.name}) may not give mandates")
    mandator = ident.uid
    if spec.get("mandator") is not None:
        ref = str(spec["mandator"])
        if not ident.is_admin:
            # the caller itself, or refused before any lookup: the answer never tells whether a user exists
            if not _names(ident, ref):
                raise forbidden("mandator: only an administrator gives mandates for another user")
        else:
            row = user_row(conn, ref, "mandator")
            if UsageLevel[row["level"]] in (UsageLevel.WORKER_USER, UsageLevel.VWORKER_USER):
                raise bad_request("mandator: a worker identity cannot give mandates", "mandator")
            mandator = row["uid"]
    target = _mandatary(conn, ident, str(spec.get("mandatary") or ""))
    expires = None
    if spec.get("expires_in") is not None:
        try:
            seconds = float(spec["expires_in"])
        except (TypeError, ValueError):
            raise bad_request("expires_in: expected a number of seconds", "expires_in") from None
        if not 0 < seconds <= MAX_EXPIRES_IN:
            raise bad_request(f"expires_in: between 1 second and {MAX_EXPIRES_IN:.0f} seconds", "expires_in")
        expires = c.now() + seconds
    t = c.now()
    existing = conn.execute(sa.select(s.mandates).where(s.mandates.c.mandator == mandator,
                                                        s.mandates.c.mandatary == target["uid"])).mappings().first()
    if existing is not None:
        uid = existing["uid"]
        conn.execute(s.mandates.update().where(s.mandates.c.uid == uid).values(expires=expires, modified=t))
    else:
        uid = make_uid()
        conn.execute(s.mandates.insert().values(uid=uid, owner=mandator, access_rights=0x700, created=t, modified=t,
                                                mandator=mandator, mandatary=target["uid"], expires=expires))
    c.event(conn, ident.uid, "mandate.grant", uid, None, None,
            f"mandator {mandator} mandatary {target['uid']}" + (f" until {c.iso(expires)}" if expires else ""))
    row = dict(conn.execute(sa.select(s.mandates).where(s.mandates.c.uid == uid)).mappings().one())
    return _render(row, _logins(conn, {row["mandator"], row["mandatary"]}), server)


def _names(ident: Identity, ref: str) -> bool:
    """Does ``ref`` (login, uid or URI) name ``ident`` itself?"""
    ref = ref.strip()
    if ref == ident.login:
        return True
    try:
        return (ref.startswith("xw://") or is_uid(ref)) and to_uid(ref) == ident.uid
    except BadUri:
        return False


def _mandatary(conn: Connection, ident: Identity, ref: str) -> dict[str, Any]:
    """The MANDATED_USER named by ``ref``. To anyone but an administrator, an unknown user and a user of another
    level get the same answer (no existence oracle: users are not listed to them)."""
    try:
        row = user_row(conn, ref, "mandatary")
    except ApiError:
        if ident.is_admin or not ref.strip():
            raise
        row = None
    if row is not None and UsageLevel[row["level"]] == UsageLevel.MANDATED_USER:
        return row
    if ident.is_admin and row is not None:
        raise bad_request(f"mandatary: {row['login']} is {row['level']}, not MANDATED_USER", "mandatary")
    raise ApiError(404, f"mandatary: no MANDATED_USER {ref.strip()!r}", "mandatary")


def listing(conn: Connection, ident: Identity, server: str) -> list[dict[str, Any]]:
    """The mandates ``ident`` gave or holds (administrators: all)."""
    q = sa.select(s.mandates).order_by(s.mandates.c.created)
    if not ident.is_admin:
        q = q.where(sa.or_(s.mandates.c.mandator == ident.uid, s.mandates.c.mandatary == ident.uid))
    rows = [dict(r) for r in conn.execute(q).mappings()]
    logins = _logins(conn, {r["mandator"] for r in rows} | {r["mandatary"] for r in rows})
    return [_render(r, logins, server) for r in rows]


def revoke(conn: Connection, ident: Identity, uid: str) -> None:
    """End a mandate at once (its mandator, its mandatary giving it up, or an administrator)."""
    row = conn.execute(sa.select(s.mandates).where(s.mandates.c.uid == uid)).mappings().first()
    if row is None or not (ident.is_admin or ident.uid in (row["mandator"], row["mandatary"])):
        raise ApiError(404, f"no mandate {uid}")
    conn.execute(s.mandates.delete().where(s.mandates.c.uid == uid))
    c.event(conn, ident.uid, "mandate.revoke", uid, None, None,
            f"mandator {row['mandator']} mandatary {row['mandatary']}")


def forget_user(conn: Connection, uid: str) -> None:
    """A deleted user's mandates, given or held, end with it."""
    conn.execute(s.mandates.delete().where(sa.or_(s.mandates.c.mandator == uid, s.mandates.c.mandatary == uid)))


def act_for(conn: Connection, ident: Identity, ref: str, what: str) -> Identity:
    """The identity a mandated request runs as: the mandator named by ``ref`` (login, uid or URI), if it gave
    ``ident`` a live mandate. Records the use (``mandate.use``); a refusal raises 403 (the caller records it)."""
    if ident.level != UsageLevel.MANDATED_USER:
        raise forbidden(f"X-Xw-On-Behalf-Of: {ident.login} is {ident.level.name}; only a MANDATED_USER acts on "
                        "behalf of another user")
    try:
        mandator = user_row(conn, ref, "X-Xw-On-Behalf-Of")
    except ApiError:  # no existence leak: an unknown user and a user who gave no mandate read the same
        mandator = None
    m = None
    if mandator is not None:
        m = conn.execute(sa.select(s.mandates.c.uid, s.mandates.c.expires).where(
            s.mandates.c.mandator == mandator["uid"], s.mandates.c.mandatary == ident.uid)).first()
    if mandator is None or m is None:
        raise forbidden(f"X-Xw-On-Behalf-Of: {ref} gave {ident.login} no mandate")
    if m[1] is not None and m[1] < c.now():
        raise forbidden(f"X-Xw-On-Behalf-Of: the mandate of {mandator['login']} to {ident.login} expired "
                        f"{c.iso(m[1])}")
    c.event(conn, ident.uid, "mandate.use", mandator["uid"], None, None, f"mandate {m[0]}: {what}"[:2000])
    return Identity(uid=mandator["uid"], login=mandator["login"], level=UsageLevel[mandator["level"]],
                    usergroup=mandator["usergroup"], via=ident.uid, issued=c.now())  # checked live, each request
