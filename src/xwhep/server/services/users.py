"""Users and user groups (an administrator's business; everyone may read themselves)."""

from __future__ import annotations

import secrets
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.model import UsageLevel
from xwhep.core.rights import Action
from xwhep.core.uri import new_uid
from xwhep.server.auth import Identity, hash_password
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError, bad_request, conflict, forbidden
from xwhep.server.services import common as c
from xwhep.server.services import dispatch, mandates
from xwhep.server.services.effects import Effects


def create_user(conn: Connection, ident: Identity | None, spec: dict[str, Any], server: str) -> dict[str, Any]:
    """A new user (administrators; a group administrator inside its own group, up to its own level)."""
    if ident is not None and not ident.is_admin and ident.level != UsageLevel.ADVANCED_USER:
        raise forbidden(f"{ident.login} may not create users")
    login = spec.get("login")
    if not login or not isinstance(login, str) or len(login) > 128 or ":" in login:
        raise bad_request("login: required, at most 128 characters, no ':'", "login")
    try:
        level = UsageLevel.parse(str(spec.get("level") or "STANDARD_USER"))
    except ValueError as exc:
        raise bad_request(f"level: {exc}", "level") from None
    group = spec.get("usergroup")
    if group:
        group = _group_uid(conn, str(group))
    if ident is not None and not ident.is_admin:
        if level > UsageLevel.ADVANCED_USER or level == UsageLevel.MANDATED_USER:
            raise forbidden(f"{ident.login} may not create {level.name} users")
        group = ident.usergroup
    if conn.execute(sa.select(s.users.c.uid).where(s.users.c.login == login)).first():
        raise conflict(f"login: {login!r} is taken", "login")
    password = spec.get("password")
    if password is not None and (not isinstance(password, str) or len(password) < 8):
        raise bad_request("password: at least 8 characters", "password")
    t = c.now()
    uid = new_uid()
    conn.execute(s.users.insert().values(
        uid=uid, owner=ident.uid if ident else uid, access_rights=0x700, created=t, modified=t, login=login,
        password_hash=spec.get("password_hash") or (hash_password(password) if password else None),
        level=level.name, usergroup=group,
        email=spec.get("email"), x509_dn=spec.get("x509_dn"), oidc_subject=spec.get("oidc_subject")))
    c.event(conn, ident.uid if ident else None, "user.create", uid, detail=f"{login} {level.name}")
    return c.render(c.load(conn, "user", uid), server)


def _group_uid(conn: Connection, ref: str) -> str:
    row = conn.execute(sa.select(s.usergroups.c.uid).where(
        sa.or_(s.usergroups.c.label == ref, s.usergroups.c.uid == ref.lower().removeprefix("xw://").split("/")[-1]))).first()
    if row is None:
        raise ApiError(404, f"usergroup: unknown user group {ref!r}", "usergroup")
    return str(row[0])


def credentials(conn: Connection, name: str) -> tuple[Identity | None, str]:
    """The identity behind a login and the hash to check the password against.

    An unknown login gets a dummy hash, so that it costs the same time as a known one (no enumeration).
    """
    row = conn.execute(sa.select(s.users).where(s.users.c.login == name)).mappings().first()
    if row is None or not row["password_hash"]:
        return None, DUMMY_HASH
    return Identity(row["uid"], row["login"], UsageLevel[row["level"]], row["usergroup"]), row["password_hash"]


DUMMY_HASH = hash_password(secrets.token_hex(16))


def identity_of(conn: Connection, uid: str) -> Identity | None:
    row = conn.execute(sa.select(s.users).where(s.users.c.uid == uid)).mappings().first()
    if row is None:
        return None
    return Identity(row["uid"], row["login"], UsageLevel[row["level"]], row["usergroup"])


def listing(conn: Connection, ident: Identity, server: str) -> list[dict[str, Any]]:
    q = sa.select(s.users)
    if not ident.is_admin:
        if ident.level == UsageLevel.ADVANCED_USER and ident.usergroup:
            q = q.where(sa.or_(s.users.c.uid == ident.uid, s.users.c.usergroup == ident.usergroup))
        else:
            q = q.where(s.users.c.uid == ident.uid)
    return [c.render(r, server) for r in conn.execute(q.order_by(s.users.c.login)).mappings()]


def create_group(conn: Connection, ident: Identity, spec: dict[str, Any], server: str) -> dict[str, Any]:
    if not ident.is_admin:
        raise forbidden(f"{ident.login} may not create user groups")
    label = spec.get("label")
    if not label or not isinstance(label, str) or len(label) > 128:
        raise bad_request("label: required, at most 128 characters", "label")
    if conn.execute(sa.select(s.usergroups.c.uid).where(s.usergroups.c.label == label)).first():
        raise conflict(f"label: a user group {label!r} exists", "label")
    t = c.now()
    uid = new_uid()
    conn.execute(s.usergroups.insert().values(uid=uid, owner=ident.uid, access_rights=0x755, created=t,
                                              modified=t, label=label))
    c.event(conn, ident.uid, "usergroup.create", uid)
    return c.render(c.load(conn, "usergroup", uid), server)


def list_groups(conn: Connection, ident: Identity, server: str) -> list[dict[str, Any]]:
    return [c.render(r, server) for r in conn.execute(sa.select(s.usergroups).order_by(s.usergroups.c.label))
            .mappings()]


def delete_user(conn: Connection, ident: Identity, uid: str) -> tuple[list[str], Effects]:
    """Remove a user, its mandates and its hosts (their keys die with their owner; the works they ran go back to
    PENDING). Returns the hosts removed and the effects to apply."""
    row = c.load(conn, "user", uid)
    if not ident.is_admin and not (ident.level == UsageLevel.ADVANCED_USER and row["usergroup"] == ident.usergroup
                                   and row["uid"] != ident.uid):
        raise ApiError(404, f"no user {uid}")
    if row["uid"] == ident.uid:  # an administrator locking itself out (perhaps the last one): another one may
        raise conflict("uid: an account cannot delete itself; another administrator can", "uid")
    eff = Effects()
    hosts = list(conn.execute(sa.select(s.hosts.c.uid).where(s.hosts.c.owner == uid)).scalars())
    for host in hosts:
        eff.merge(dispatch.remove_host(conn, ident, host))
    conn.execute(s.users.delete().where(s.users.c.uid == uid))
    mandates.forget_user(conn, uid)
    c.event(conn, ident.uid, "user.delete", uid)
    return hosts, eff


def check_password(password: object) -> str:
    """The password policy (before any hashing)."""
    if not isinstance(password, str) or len(password) < 8:
        raise bad_request("password: at least 8 characters", "password")
    return password


def set_password(conn: Connection, ident: Identity, uid: str, password_hash: str) -> None:
    """Store a new password (already checked and hashed off the event loop) and void every token issued before:
    a stolen token must not outlive the password change that was meant to end it."""
    row = c.load_checked(conn, ident, "user", uid, Action.WRITE) if ident.uid != uid else c.load(conn, "user", uid)
    t = c.now()
    conn.execute(s.users.update().where(s.users.c.uid == row["uid"]).values(
        password_hash=password_hash, modified=t, tokens_after=t))
    c.event(conn, ident.uid, "user.password", uid)


def revoke_tokens(conn: Connection, ident: Identity, uid: str) -> None:
    """End every session of user ``uid`` now (its tokens, and its hosts' tokens: hosts get new ones with their
    keys). The user itself, its group administrator or an administrator."""
    row = c.load(conn, "user", uid)
    allowed = (ident.is_admin or ident.uid == uid
               or (ident.level == UsageLevel.ADVANCED_USER and row["usergroup"] == ident.usergroup))
    if not allowed:
        raise ApiError(404, f"no user {uid}")
    t = c.now()
    conn.execute(s.users.update().where(s.users.c.uid == uid).values(tokens_after=t, modified=t))
    c.event(conn, ident.uid, "user.revoke", uid)
