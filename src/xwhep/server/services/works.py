"""Works (jobs) from the client's side: submit (one or a bag), list, show, delete, why-pending."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.expressions import BadExpression, check_expression
from xwhep.core.matching import HostProfile, WorkProfile, survey
from xwhep.core.model import AppType, DataStatus, UsageLevel, WorkStatus
from xwhep.core.rights import PRIVATE, Action, BadRights, clamp_to, format_rights, parse_rights
from xwhep.core.states import is_final, transition
from xwhep.core.tunnels import BadAddress, Target, parse_forwards, parse_target, work_address
from xwhep.core.uri import new_uid
from xwhep.server.auth import Identity
from xwhep.server.db import raw
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError, bad_request, forbidden
from xwhep.server.services import common as c
from xwhep.server.services.effects import Effects

DEFAULT_MAX_RETRIES = 3


def parse_ports(value: Any, field: str = "listen_ports") -> str | None:
    """``"8080,8081"`` or ``[8080, 8081]`` → ``"8080,8081"``; 400 on anything else."""
    if value in (None, "", []):
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    ports = []
    for item in items:
        try:
            port = int(str(item).strip())
        except ValueError:
            raise bad_request(f"{field}: {item!r} is not a port number", field) from None
        if not 1 <= port <= 65535:
            raise bad_request(f"{field}: {port} is out of range 1-65535", field)
        ports.append(str(port))
    return ",".join(ports)


def app_platforms(app: Mapping[str, Any]) -> frozenset[str]:
    return frozenset((app.get("binaries") or {}).keys())


def app_datas(app: Mapping[str, Any]) -> set[str]:
    """Every data an app refers to (binaries, default stdin/dirin, base dirin, image)."""
    out = set((app.get("binaries") or {}).values())
    for key in ("default_stdin", "default_dirin", "base_dirin", "image"):
        if app.get(key):
            out.add(app[key])
    return out


class Resolver:
    """Per-transaction caches for the lookups a bag of thousands of works repeats."""

    def __init__(self, conn: Connection, ident: Identity,
                 proxy_refusal: Callable[[str, str], str | None] | None = None) -> None:
        self.conn = conn
        self.ident = ident
        self.proxy_refusal = proxy_refusal  # the relay's say on server proxy addresses (None: not checked here)
        self.apps: dict[str, dict[str, Any]] = {}
        self.datas: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, tuple[str | None, str | None]] = {}
        self.bags: dict[tuple[str, str], str] = {}

    def app(self, ref: str) -> dict[str, Any]:
        hit = self.apps.get(ref)
        if hit is not None:
            return hit
        conn = self.conn
        row = None
        if not ref.startswith("xw://") and not _looks_uid(ref):
            row = conn.execute(sa.select(s.apps).where(s.apps.c.name == ref)).mappings().first()
        else:
            uid = c.ref(ref, "app")
            row = conn.execute(sa.select(s.apps).where(s.apps.c.uid == uid)).mappings().first()
        if row is None or not c.allowed(conn, self.ident, Action.READ, row):
            raise ApiError(404, f"unknown app {ref!r}", "app")
        if not c.allowed(conn, self.ident, Action.EXECUTE, row):
            raise ApiError(403, f"{self.ident.login} may not submit works against app {row['name']}", "app")
        self.apps[ref] = dict(row)
        return self.apps[ref]

    def data(self, ref: str, field: str) -> dict[str, Any]:
        uid = c.ref(ref, field)
        hit = self.datas.get(uid)
        if hit is not None:
            return hit
        row = self.conn.execute(sa.select(s.datas).where(s.datas.c.uid == uid)).mappings().first()
        if row is None or not c.allowed(self.conn, self.ident, Action.READ, row):
            raise ApiError(404, f"{field}: unknown data {ref}", field)
        self.datas[uid] = dict(row)
        return self.datas[uid]

    def app_ready(self, app: Mapping[str, Any]) -> bool:
        """All data the app refers to are AVAILABLE (not a rights check: the app's owner chose them)."""
        key = "ready:" + app["uid"]
        if key not in self.datas:
            needed = app_datas(app)
            n = self.conn.execute(sa.select(sa.func.count()).select_from(s.datas).where(
                s.datas.c.uid.in_(needed), s.datas.c.status == DataStatus.AVAILABLE)).scalar() if needed else 0
            self.datas[key] = {"ready": n == len(needed)}
        return bool(self.datas[key]["ready"])

    def owner_group(self, owner: str) -> tuple[str | None, str | None]:
        hit = self.groups.get(owner)
        if hit is None:
            row = self.conn.execute(
                sa.select(s.users.c.usergroup, s.usergroups.c.label)
                .select_from(s.users.outerjoin(s.usergroups, s.usergroups.c.uid == s.users.c.usergroup))
                .where(s.users.c.uid == owner)).first()
            hit = (row[0], row[1]) if row else (None, None)
            self.groups[owner] = hit
        return hit

    def bag(self, kind: str, ref: str) -> str:
        key = (kind, ref)
        if key not in self.bags:
            row = c.load_checked(self.conn, self.ident, kind, c.ref(ref, kind), Action.WRITE)
            self.bags[key] = row["uid"]
        return self.bags[key]


def _looks_uid(text: str) -> bool:
    from xwhep.core.uri import is_uid

    return is_uid(text.lower())


def profile_of(work: Mapping[str, Any], app: Mapping[str, Any], group: tuple[str | None, str | None]) -> WorkProfile:
    """The scheduler's view of a work (app needs plus the work's own)."""
    return WorkProfile(
        app_name=app["name"], app_type=AppType(app["type"]), platforms=app_platforms(app),
        packages=dict(app.get("packages") or {}),
        min_memory=max(work.get("min_memory") or 0, app.get("min_memory") or 0),
        min_cpuspeed=max(work.get("min_cpuspeed") or 0, app.get("min_cpuspeed") or 0),
        min_disk=max(work.get("min_disk") or 0, app.get("min_disk") or 0),
        expected_host=work.get("expected_host"), needs_incoming=bool(work.get("listen_ports")),
        requirements=work.get("requirements"), owner=work["owner"], owner_group=group[0],
        owner_group_label=group[1], rights=work["access_rights"])


def _int(spec: Mapping[str, Any], key: str, default: int | None, lo: int = 0, hi: int = 2**31 - 1) -> int | None:
    value = spec.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{key}: expected an integer, got {value!r}", key)
    if not lo <= value <= hi:
        raise bad_request(f"{key}: {value} is out of range {lo}-{hi}", key)
    return value


def submit(conn: Connection, ident: Identity, specs: list[dict[str, Any]], server: str,
           max_bag: int, proxy_refusal: Callable[[str, str], str | None] | None = None
           ) -> tuple[list[dict[str, Any]], Effects]:
    """Insert a bag of works in one transaction; returns their summaries (uid, uri, status) and effects.
    ``proxy_refusal(address, owner)`` says why a server proxy may not be named in forward addresses."""
    if ident.is_worker or ident.level < UsageLevel.STANDARD_USER:
        raise forbidden(f"{ident.login} ({ident.level.name}) may not submit works")
    if not specs:
        raise bad_request("works: the bag is empty", "works")
    if len(specs) > max_bag:
        raise ApiError(413, f"works: {len(specs)} works in one request, at most {max_bag}", "works")
    # the bound is on works made, replicas included (a bad replicas value is refused with its field below)
    total = sum(r if type(r) is int and r > 1 else 1 for r in (spec.get("replicas") for spec in specs))
    if total > max_bag:
        raise ApiError(413, f"works: {total:,} works in one request ({len(specs):,} specs with their replicas), "
                            f"at most {max_bag:,}", "works")
    res = Resolver(conn, ident, proxy_refusal)
    t = c.now()
    rows: list[dict[str, Any]] = []
    links: dict[str, int] = {}
    apps_of: dict[str, dict[str, Any]] = {}
    # A bag's works usually differ only in their arguments and label: the rest is checked once per shape and
    # its row reused (half of a 10,000-work submission went to checking the same fields again, measured).
    shapes: dict[str | bytes, dict[str, Any]] = {}  # an app reference alone, or the JSON of the shared fields
    for i, spec in enumerate(specs):
        try:
            app_ref = spec.get("app")
            shape: str | bytes = (app_ref if isinstance(app_ref, str) and _BARE.issuperset(spec) else
                                  orjson.dumps({k: v for k, v in spec.items() if k not in _PER_WORK},
                                               option=orjson.OPT_SORT_KEYS))
            template = shapes.get(shape)
            if template is None:
                built = _build(res, ident, spec, t, links, apps_of)
                if len(built) == 1:  # replicas refer to their master's uid: not reusable as they are
                    shapes[shape] = built[0]
                rows.extend(built)
                continue
            row = {**template, "uid": new_uid(), "args": _args(spec), "label": spec.get("label")}
            for key in ("stdin", "dirin"):
                if row[key]:
                    links[row[key]] += 1
            apps_of[row["uid"]] = apps_of[template["uid"]]
            rows.append(row)
        except ApiError as exc:
            if len(specs) > 1:
                exc.message = f"works[{i}]: {exc.message}"
            raise
    _INSERT_WORK.rows(conn, rows)
    seq_of = _submission_order(conn, rows)
    for uid, n in links.items():
        conn.execute(s.datas.update().where(s.datas.c.uid == uid).values(links=s.datas.c.links + n))
    raw.events(conn, t, ({"actor": ident.uid, "action": "work.submit", "object": r["uid"], "target": r["status"]}
                         for r in rows))
    eff = Effects()
    out = []
    profiles: dict[tuple[Any, ...], WorkProfile] = {}  # a bag's works mostly share one profile: build it once
    for r in rows:
        if r["status"] == WorkStatus.PENDING:
            app = apps_of[r["uid"]]
            key = (app["uid"], r["owner"], r["access_rights"], r["min_memory"], r["min_cpuspeed"], r["min_disk"],
                   r["expected_host"], bool(r["listen_ports"]), r["requirements"])
            profile = profiles.get(key)
            if profile is None:
                profile = profiles[key] = profile_of(r, app, res.owner_group(r["owner"]))
            eff.pending.append((r["uid"], seq_of[r["uid"]], profile, r["rank"],
                                r["replica_of"] or (r["uid"] if r["replicas"] > 1 else None)))
        out.append({"uid": r["uid"], "uri": f"xw://{server}/{r['uid']}", "status": r["status"]})
    return out, eff


_WORK_COLUMNS = ("uid", "owner", "access_rights", "created", "modified", "status", "app", "args", "env", "stdin",
                 "dirin", "label", "grp", "session", "expected_host", "min_memory", "min_cpuspeed", "min_disk",
                 "wallclock", "max_retries", "retries", "replicas", "replica_of", "requirements", "rank",
                 "listen_ports", "forward_addresses", "result", "return_code", "reason", "host", "task",
                 "pending_since", "started", "completed")
# a bag is inserted with one executemany at driver level (SQLAlchemy's per-row parameter processing was a third
# of a 10,000-work submission)
_INSERT_WORK = raw.Insert("works", _WORK_COLUMNS)
_WORK_SEQ = raw.Sql("SELECT uid, id FROM works WHERE uid IN_LIST(:uids)")
_WORK_ID = raw.Sql("SELECT id FROM works WHERE uid = :uid")


def _submission_order(conn: Connection, rows: list[dict[str, Any]]) -> dict[str, int]:
    """uid → id (the FIFO order) of the rows just inserted, in this transaction.

    SQLite gives a table without AUTOINCREMENT the next rowid after the largest, so the inserts of one
    transaction (one writer) are numbered consecutively up to ``last_insert_rowid()``: checked on the first row,
    read back in one query otherwise (and always on PostgreSQL).
    """
    if conn.dialect.name == "sqlite":
        first = raw.last_rowid(conn) - len(rows) + 1
        if raw.tuples(conn, _WORK_ID, {"uid": rows[0]["uid"]}) == [(first,)]:
            return {r["uid"]: first + i for i, r in enumerate(rows)}
    return dict(raw.tuples(conn, _WORK_SEQ, {"uids": [r["uid"] for r in rows]}))


def _build(res: Resolver, ident: Identity, spec: Mapping[str, Any], t: float, links: dict[str, int],
           apps_of: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    app_ref = spec.get("app")
    if not app_ref or not isinstance(app_ref, str):
        raise bad_request("app: required (a name, uid or URI)", "app")
    app = res.app(app_ref)
    inputs_ready = res.app_ready(app)
    refs: dict[str, str | None] = {}
    for key in ("stdin", "dirin"):
        value = spec.get(key) or app.get(f"default_{key}")
        if value:
            d = res.data(value, key)
            refs[key] = d["uid"]
            links[d["uid"]] = links.get(d["uid"], 0) + 1
            inputs_ready = inputs_ready and d["status"] == DataStatus.AVAILABLE
            if d["status"] == DataStatus.ERROR:
                raise bad_request(f"{key}: data {d['uid']} is in ERROR", key)
        else:
            refs[key] = None
    for key in ("requirements", "rank"):
        expr = spec.get(key)
        if expr:
            if not isinstance(expr, str):
                raise bad_request(f"{key}: expected an expression string", key)
            try:
                check_expression(expr)
            except BadExpression as exc:
                raise bad_request(f"{key}: {exc}", key) from None
    env = spec.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise bad_request("env: expected an object of string values", "env")
    args = _args(spec)
    # private to its owner unless asked otherwise, whatever the app's rights: others' args, env, results and
    # tunnels are nobody's business (running on public workers needs no read right, core/matching.py)
    rights = PRIVATE
    if spec.get("access_rights") is not None:
        try:
            rights = parse_rights(str(spec["access_rights"]))
        except BadRights as exc:
            raise bad_request(f"access_rights: {exc}", "access_rights") from None
        check_work_rights(rights, app["name"], app["access_rights"])
    replicas = _int(spec, "replicas", 1, 1, 1000) or 1
    expected = spec.get("expected_host")
    if expected is not None and not isinstance(expected, str):
        raise bad_request("expected_host: expected a host name or uid", "expected_host")
    base = {
        "owner": ident.uid, "access_rights": rights, "created": t, "modified": t,
        "status": WorkStatus.PENDING if inputs_ready else WorkStatus.UNAVAILABLE,
        "app": app["uid"], "args": args, "env": orjson.dumps(env).decode(),  # as stored (a JSON column)
        "stdin": refs["stdin"], "dirin": refs["dirin"],
        "label": spec.get("label"),
        "grp": res.bag("group", spec["group"]) if spec.get("group") else None,
        "session": res.bag("session", spec["session"]) if spec.get("session") else None,
        "expected_host": _expected(expected),
        "min_memory": _int(spec, "min_memory", 0), "min_cpuspeed": _int(spec, "min_cpuspeed", 0),
        "min_disk": _int(spec, "min_disk", 0), "wallclock": _int(spec, "wallclock", None, 1),
        "max_retries": _int(spec, "max_retries", DEFAULT_MAX_RETRIES, 0, 1000), "retries": 0,
        "replicas": replicas, "requirements": spec.get("requirements") or None, "rank": spec.get("rank") or None,
        "listen_ports": parse_ports(spec.get("listen_ports")),
        "forward_addresses": _forward(spec.get("forward_addresses"), res),
        "result": None, "return_code": None, "reason": None, "host": None, "task": None,
        "pending_since": t if inputs_ready else None, "started": None, "completed": None,
    }
    first = {**base, "uid": new_uid(), "replica_of": None}
    out = [first]
    for _ in range(replicas - 1):
        out.append({**base, "uid": new_uid(), "replica_of": first["uid"], "replicas": 1})
        for key in ("stdin", "dirin"):
            if refs[key]:
                links[refs[key]] += 1  # type: ignore[index]
    for r in out:
        apps_of[r["uid"]] = app
    return out


def check_work_rights(rights: int, app_name: str, app_rights: int) -> None:
    """A work is never more open than its app: asking for more is refused (403 naming access_rights)."""
    allowed = clamp_to(rights, app_rights)
    if allowed != rights:
        raise ApiError(403, f"access_rights: a work is never more open than its app ({app_name} is "
                            f"{format_rights(app_rights)}): asked {format_rights(rights)}, "
                            f"{format_rights(allowed)} at most", "access_rights")


_PER_WORK = frozenset({"args", "label"})  # the fields in which the works of one bag usually differ
_BARE = _PER_WORK | {"app"}  # a spec with no other field: its shape is its app reference


def _args(spec: Mapping[str, Any]) -> str | None:
    args = spec.get("args")
    if isinstance(args, list):
        return shlex.join(str(a) for a in args)
    if args is not None and not isinstance(args, str):
        raise bad_request("args: expected a string or a list of strings", "args")
    return args


def _expected(value: str | None) -> str | None:
    if not value:
        return None
    if value.startswith("xw://"):
        return c.ref(value, "expected_host")
    return value


def _forward(value: Any, res: Resolver | None = None) -> str | None:
    """``"ADDRESS,PORT"`` pairs separated by ``;`` (XWHEP's --xwforwardaddresses). With ``res``, each address
    must be one the submitter may use: its own server proxy, or a listen port of a work it may execute."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise bad_request("forward_addresses: expected \"ADDRESS,PORT[;ADDRESS,PORT…]\"", "forward_addresses")
    for pair in value.split(";"):
        parts = pair.split(",")
        if len(parts) != 2 or not parts[0].strip():
            raise bad_request(f"forward_addresses: {pair!r} is not ADDRESS,PORT", "forward_addresses")
        parse_ports(parts[1], "forward_addresses")
    try:  # what the relay will accept: xwproxy:<token> or xw://server/<uid>:<port>, each job-local port once
        targets = [(address, parse_target(address)) for address, _ in parse_forwards(value)]
    except BadAddress as exc:
        raise bad_request(f"forward_addresses: {exc}", "forward_addresses") from None
    if res is not None:
        for address, target in targets:
            _may_forward(res, address, target)
    return value


def _may_forward(res: Resolver, address: str, target: Target) -> None:
    """Refused at submission (403 naming forward_addresses) what the relay would refuse when the job connects,
    so that the work does not run only to find its tunnels closed."""
    if target.proxy is not None:
        why = res.proxy_refusal(target.proxy, res.ident.uid) if res.proxy_refusal else None
        if why:
            raise ApiError(403, f"forward_addresses: {why}: a work may name only its owner's server proxies",
                           "forward_addresses")
        return
    assert target.work is not None and target.port is not None
    try:
        row = c.load_checked(res.conn, res.ident, "work", target.work, Action.EXECUTE)
    except ApiError as exc:  # 404 (unreadable or unknown: no existence leak) or 403 (readable, not executable)
        raise ApiError(exc.status, f"forward_addresses: {address}: {exc.message}", "forward_addresses") from None
    ports = (row["listen_ports"] or "").split(",")
    if str(target.port) not in ports:
        raise bad_request(f"forward_addresses: {address}: work {target.work} does not listen on port {target.port} "
                          f"(its listen ports: {row['listen_ports'] or 'none'})", "forward_addresses")


# -- reading ---------------------------------------------------------------------------------------------------

def get(conn: Connection, ident: Identity, uid: str, server: str) -> dict[str, Any]:
    row = c.load_checked(conn, ident, "work", uid, Action.READ)
    return render_work(conn, row, server)


def statuses(conn: Connection, ident: Identity, uids: list[str]) -> dict[str, str]:
    """uid → status of works ``ident`` may read; 404 naming the first that is unknown or unreadable."""
    rows = {r["uid"]: dict(r) for r in conn.execute(
        sa.select(s.works.c.uid, s.works.c.owner, s.works.c.access_rights, s.works.c.status)
        .where(s.works.c.uid.in_(set(uids)))).mappings()}
    out = {}
    for uid in uids:
        row = rows.get(uid)
        if row is None or not c.allowed(conn, ident, Action.READ, row):
            raise ApiError(404, f"works: no work {uid}", "works")
        out[uid] = str(row["status"])
    return out


def render_work(conn: Connection, row: Mapping[str, Any], server: str) -> dict[str, Any]:
    out = c.render(row, server)
    out["app_name"] = conn.execute(sa.select(s.apps.c.name).where(s.apps.c.uid == row["app"])).scalar()
    if row.get("result"):
        d = conn.execute(sa.select(s.datas.c.sha256, s.datas.c.size, s.datas.c.status)
                         .where(s.datas.c.uid == row["result"])).first()
        if d:
            out["result_sha256"], out["result_size"], out["result_status"] = d
    if row.get("listen_ports") and row.get("status") == WorkStatus.RUNNING:
        # where its ports are reachable: xwproxy UID, or another job's forward addresses (job <-> job)
        out["tunnels"] = [work_address(server, row["uid"], p) for p in row["listen_ports"].split(",")]
    return out


def listing(conn: Connection, ident: Identity, server: str, status: str | None = None, label: str | None = None,
            group: str | None = None, session: str | None = None, app: str | None = None,
            limit: int = 1000, after: int = 0) -> dict[str, Any]:
    """Works ``ident`` may read, oldest first, paged by submission order."""
    w = s.works
    q = sa.select(w, s.apps.c.name.label("app_name")).select_from(w.join(s.apps, s.apps.c.uid == w.c.app))
    vis = c.visible(w, ident)
    if vis is not None:
        q = q.where(vis)
    if status:
        try:
            q = q.where(w.c.status == WorkStatus(status.upper()))
        except ValueError:
            raise bad_request(f"status: unknown status {status!r}", "status") from None
    if label:
        q = q.where(w.c.label == label)
    if group:
        q = q.where(w.c.grp == c.ref(group, "group"))
    if session:
        q = q.where(w.c.session == c.ref(session, "session"))
    if app:
        q = q.where(sa.or_(s.apps.c.name == app, s.apps.c.uid == app))
    rows = conn.execute(q.where(w.c.id > after).order_by(w.c.id).limit(limit)).mappings().all()
    items = [c.render(r, server) for r in rows]
    return {"items": items, "next": rows[-1]["id"] if len(rows) == limit else None}


# -- deleting --------------------------------------------------------------------------------------------------

def delete(conn: Connection, ident: Identity, uid: str) -> Effects:
    """Remove a work, its tasks and its result; release its inputs. A running one is told to stop."""
    row = c.load_checked(conn, ident, "work", uid, Action.DELETE)
    eff = Effects()
    _delete_rows(conn, [row], eff)
    c.event(conn, ident.uid, "work.delete", uid, row["status"], None)
    return eff


def _delete_rows(conn: Connection, rows: list[Mapping[str, Any]], eff: Effects) -> None:
    for row in rows:
        uid = row["uid"]
        for key in ("stdin", "dirin"):
            if row.get(key):
                conn.execute(s.datas.update().where(s.datas.c.uid == row[key]).values(links=s.datas.c.links - 1))
        result = conn.execute(sa.select(s.datas.c.uid, s.datas.c.sha256).where(s.datas.c.work == uid)).all()
        conn.execute(s.datas.delete().where(s.datas.c.work == uid))
        for _, sha in result:
            if sha and not blob_used(conn, sha):
                eff.blobs.append(sha)
        task_uids = [t for (t,) in conn.execute(sa.select(s.tasks.c.uid).where(s.tasks.c.work == uid))]
        conn.execute(s.tasks.delete().where(s.tasks.c.work == uid))
        conn.execute(s.works.delete().where(s.works.c.uid == uid))
        eff.discard.append(uid)
        eff.tasks_ended.extend(task_uids)
        if row["status"] in (WorkStatus.RUNNING, WorkStatus.DATAREQUEST):
            eff.running[row["owner"]] -= 1


def blob_used(conn: Connection, sha256: str) -> bool:
    return conn.execute(sa.select(sa.func.count()).select_from(s.datas)
                        .where(s.datas.c.sha256 == sha256, s.datas.c.status == DataStatus.AVAILABLE)).scalar() > 0


def delete_many(conn: Connection, ident: Identity, where: sa.ColumnElement[bool]) -> Effects:
    """Delete every work matching ``where`` (a session's or group's), checking rights on each."""
    rows = conn.execute(sa.select(s.works).where(where)).mappings().all()
    eff = Effects()
    for row in rows:
        if not c.allowed(conn, ident, Action.DELETE, row):
            raise forbidden(f"{ident.login} may not delete work {row['uid']}")
    _delete_rows(conn, [dict(r) for r in rows], eff)
    return eff


# -- why pending -----------------------------------------------------------------------------------------------

WHY_SECONDS = 3.0  # the most time ``why`` spends checking hosts; past it the answer says "partial"


def why_context(conn: Connection, ident: Identity, uid: str, alive_since: float) -> dict[str, Any]:
    """What ``why`` needs from the database (checked: ``ident`` may read the work); the hosts are checked apart,
    off the event loop (:func:`why_report`)."""
    row = c.load_checked(conn, ident, "work", uid, Action.READ)
    app = c.load(conn, "app", row["app"])
    res = Resolver(conn, ident)
    alive = set(conn.execute(sa.select(s.hosts.c.uid).where(s.hosts.c.last_alive >= alive_since)).scalars().all())
    ahead = conn.execute(sa.select(sa.func.count()).select_from(s.works).where(
        s.works.c.status == WorkStatus.PENDING, s.works.c.id < row["id"])).scalar()
    return {"profile": profile_of(row, app, res.owner_group(row["owner"])), "alive": alive, "ahead": ahead,
            "head": {"uid": uid, "status": row["status"], "reason": row["reason"], "retries": row["retries"],
                     "max_retries": row["max_retries"]}}


def why_report(ctx: Mapping[str, Any], hosts: list[HostProfile], seconds: float = WHY_SECONDS,
               stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Per requirement, how many registered hosts satisfy it (``condor_q -better-analyze``), checking hosts for at
    most ``seconds``: then ``partial`` is true and ``checked`` says how many of ``hosts`` were. CPU-bound (one
    requirements expression per host): run it in a worker thread."""
    found = survey(ctx["profile"], hosts, ctx["alive"], seconds, stop)
    out = {
        **ctx["head"], "hosts": len(hosts), "hosts_alive": len(ctx["alive"]), "matching_alive": found.fit_alive,
        "pending_ahead": ctx["ahead"], "checked": found.checked, "partial": found.partial,
        "requirements": [{"name": n, "satisfied_by": ok, "of": tot, "example_failure": sample}
                         for n, ok, tot, sample in found.rows],
    }
    if found.partial:
        out["note"] = (f"partial: {found.checked} of {found.total} hosts checked (the check stops after "
                       f"{seconds:g} s)")
    return out


def check_transition(current: str, target: str) -> None:
    """Used by the admin's manual status endpoint: a clear 409 for an illegal move."""
    from xwhep.core.states import IllegalTransition

    try:
        transition(current, target)
    except IllegalTransition as exc:
        raise ApiError(409, str(exc), "status") from None


def cancel(conn: Connection, ident: Identity, uid: str) -> Effects:
    """Stop a work for good: PENDING/UNAVAILABLE → ERROR; RUNNING → ABORTED → ERROR (its task is told to stop)."""
    row = c.load_checked(conn, ident, "work", uid, Action.WRITE)
    if is_final(row["status"]):
        raise ApiError(409, f"work {uid} is already {row['status']}", "status")
    eff = Effects()
    status = WorkStatus(row["status"])
    if status in (WorkStatus.RUNNING, WorkStatus.DATAREQUEST):
        transition(status, WorkStatus.ABORTED)
        status = WorkStatus.ABORTED
        eff.running[row["owner"]] -= 1
        if row["task"]:
            conn.execute(s.tasks.update().where(s.tasks.c.uid == row["task"]).values(
                status="ABORTED", ended=c.now(), reason="cancelled by " + ident.login))
            eff.tasks_ended.append(row["task"])
    check_transition(status, WorkStatus.ERROR)
    conn.execute(s.works.update().where(s.works.c.uid == uid).values(
        status=WorkStatus.ERROR, reason=f"cancelled by {ident.login}", modified=c.now(), completed=c.now()))
    c.event(conn, ident.uid, "work.transition", uid, row["status"], "ERROR", f"cancelled by {ident.login}")
    eff.discard.append(uid)
    return eff


LEVELS_THAT_SUBMIT = {lvl for lvl in UsageLevel if lvl >= UsageLevel.STANDARD_USER}
