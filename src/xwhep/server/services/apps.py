"""Applications: one name, a type, binaries per OS/CPU (or a JAVA jar), defaults and minimums."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.model import AppType, UsageLevel, normalize_cpu, normalize_os
from xwhep.core.rights import Action, BadRights, format_rights, parse_rights
from xwhep.core.uri import is_uid, new_uid
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError, bad_request, conflict, forbidden
from xwhep.server.services import common as c
from xwhep.server.services.works import app_datas


def platform_key(key: str) -> str:
    """``Linux/AMD64`` → ``linux/x86_64``; ``java`` stays ``java``."""
    if key.strip().lower() in ("java", "jar"):
        return "java"
    if "/" not in key:
        raise bad_request(f"binaries: {key!r} is not OS/CPU (like linux/x86_64) or java", "binaries")
    os_, cpu = key.split("/", 1)
    return f"{normalize_os(os_)}/{normalize_cpu(cpu)}"


def _data_ref(conn: Connection, ident: Identity, value: Any, field: str) -> str:
    uid = c.ref(str(value), field)
    row = conn.execute(sa.select(s.datas).where(s.datas.c.uid == uid)).mappings().first()
    if row is None or not c.allowed(conn, ident, Action.READ, row):
        raise ApiError(404, f"{field}: unknown data {value}", field)
    return uid


def resolve(conn: Connection, ident: Identity, ref: str) -> dict[str, Any]:
    """An app by uid, URI or name, if ``ident`` may read it."""
    if ref.startswith("xw://") or is_uid(ref.lower()):
        row = conn.execute(sa.select(s.apps).where(s.apps.c.uid == c.ref(ref, "app"))).mappings().first()
    else:
        row = conn.execute(sa.select(s.apps).where(s.apps.c.name == ref)).mappings().first()
    if row is None or not c.allowed(conn, ident, Action.READ, row):
        raise ApiError(404, f"unknown app {ref!r}", "app")
    return dict(row)


def put(conn: Connection, ident: Identity, spec: dict[str, Any], server: str) -> dict[str, Any]:
    """Create an app, or (same name, same owner) add binaries and update its settings, as xwsendapp does."""
    if ident.is_worker or ident.level < UsageLevel.STANDARD_USER:
        raise forbidden(f"{ident.login} may not register applications")
    name = spec.get("name")
    if not name or not isinstance(name, str) or len(name) > 255:
        raise bad_request("name: required, at most 255 characters", "name")
    existing = conn.execute(sa.select(s.apps).where(s.apps.c.name == name)).mappings().first()
    default_type = existing["type"] if existing else "DEPLOYABLE"  # an update keeps the type unless told
    try:
        atype = AppType(str(spec.get("type") or default_type).upper())
    except ValueError:
        raise bad_request(f"type: {spec.get('type')!r} is not DEPLOYABLE, SHARED, VM or CONTAINER", "type") from None
    if existing is not None and not c.allowed(conn, ident, Action.WRITE, existing):
        if c.allowed(conn, ident, Action.READ, existing):
            raise forbidden(f"{ident.login} may not modify app {name}")
        raise conflict(f"name: an app named {name!r} already exists", "name")
    bins = dict(existing["binaries"]) if existing else {}
    raw = spec.get("binaries") or {}
    if not isinstance(raw, dict):
        raise bad_request("binaries: expected an object {\"linux/x86_64\": data}", "binaries")
    added: list[str] = []
    for key, ref in raw.items():
        bins[platform_key(key)] = _data_ref(conn, ident, ref, "binaries")
        added.append(bins[platform_key(key)])
    if atype == AppType.DEPLOYABLE and not bins:
        raise bad_request("binaries: a DEPLOYABLE app needs at least one binary (OS/CPU or java)", "binaries")
    values: dict[str, Any] = {"type": atype, "binaries": bins, "modified": c.now()}
    for key in ("default_stdin", "default_dirin", "base_dirin", "image"):
        if spec.get(key):
            values[key] = _data_ref(conn, ident, spec[key], key)
            added.append(values[key])
    env = spec.get("env")
    if env is not None:
        if not isinstance(env, dict):
            raise bad_request("env: expected an object of string values", "env")
        values["env"] = {str(k): str(v) for k, v in env.items()}
    pk = spec.get("packages")
    if pk is not None:
        if isinstance(pk, list):
            pk = {str(p): "" for p in pk}
        if not isinstance(pk, dict):
            raise bad_request("packages: expected {\"ROOT\": \"6.30\"} or a list of names", "packages")
        values["packages"] = {str(k): str(v) for k, v in pk.items()}
    for key in ("min_memory", "min_cpuspeed", "min_disk"):
        if spec.get(key) is not None:
            v = spec[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad_request(f"{key}: expected a non-negative integer", key)
            values[key] = v
    if spec.get("access_rights") is not None or existing is None:
        try:
            rights = parse_rights(str(spec.get("access_rights") or ("0x755" if ident.is_admin else "0x700")))
        except BadRights as exc:
            raise bad_request(f"access_rights: {exc}", "access_rights") from None
        if spec.get("access_rights") is not None:
            check_app_rights(ident, rights)
        values["access_rights"] = rights
    if existing is None:
        uid = new_uid()
        t = values["modified"]
        conn.execute(s.apps.insert().values(uid=uid, owner=ident.uid, created=t, name=name,
                                            **{"env": {}, "packages": {}, "min_memory": 0, "min_cpuspeed": 0,
                                               "min_disk": 0, **values}))
        c.event(conn, ident.uid, "app.create", uid)
    else:
        uid = existing["uid"]
        conn.execute(s.apps.update().where(s.apps.c.uid == uid).values(**values))
        c.event(conn, ident.uid, "app.update", uid)
    for d in added:
        conn.execute(s.datas.update().where(s.datas.c.uid == d).values(links=s.datas.c.links + 1))
    return c.render(c.load(conn, "app", uid), server)


def check_app_rights(ident: Identity, rights: int) -> None:
    """Only the administrator publishes apps; a group administrator may share with its group. Asking for more is
    refused (403 naming access_rights), never trimmed behind the asker's back."""
    if ident.is_admin:
        return
    ceiling = 0x1750 if ident.level == UsageLevel.ADVANCED_USER else 0x1700
    if rights & ~ceiling:
        raise ApiError(403, f"access_rights: {ident.login} ({ident.level.name}) may not open an app beyond "
                            f"{format_rights(ceiling)} (asked {format_rights(rights)}); only an administrator "
                            "publishes apps", "access_rights")


def listing(conn: Connection, ident: Identity, server: str) -> list[dict[str, Any]]:
    q = sa.select(s.apps)
    vis = c.visible(s.apps, ident)
    if vis is not None:
        q = q.where(vis)
    return [c.render(r, server) for r in conn.execute(q.order_by(s.apps.c.name)).mappings()]


def delete(conn: Connection, ident: Identity, uid: str) -> None:
    row = c.load_checked(conn, ident, "app", uid, Action.DELETE)
    n = conn.execute(sa.select(sa.func.count()).select_from(s.works).where(s.works.c.app == uid)).scalar()
    if n:
        raise conflict(f"app {row['name']} is used by {n} work(s); delete them first", "works")
    for d in app_datas(row):
        conn.execute(s.datas.update().where(s.datas.c.uid == d).values(links=s.datas.c.links - 1))
    conn.execute(s.apps.delete().where(s.apps.c.uid == uid))
    c.event(conn, ident.uid, "app.delete", uid)
