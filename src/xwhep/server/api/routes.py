"""The client-facing API: auth, works, datas, apps, users, groups, sessions, objects, events."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

import anyio
import anyio.to_thread
import sqlalchemy as sa
from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Message, Receive, Scope, Send

from xwhep import __version__
from xwhep.core.rights import Action, BadRights, format_rights, parse_rights
from xwhep.core.states import is_final
from xwhep.server import hosts as hostcache
from xwhep.server.api import schemas as S
from xwhep.server.api.deps import FastJSON, identity, state_dep
from xwhep.server.api.models import (
    BAG,
    QUERY_INT64,
    STATUS_PATTERN,
    SUBMISSION,
    AppRef,
    AppSpec,
    BagSpec,
    ChmodIn,
    DataSpec,
    GroupSpec,
    LoginIn,
    MandateIn,
    PasswordIn,
    RefQuery,
    UidPath,
    UserSpec,
    WaitIn,
    dump,
    set_fields,
)
from xwhep.server.auth import Identity, hash_password, verify_password
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError, bad_request, storage_full, storage_full_error
from xwhep.server.services import apps, bags, datas, mandates, users, works
from xwhep.server.services import common as c
from xwhep.server.state import ServerState
from xwhep.server.store import StoreError

router = APIRouter(prefix="/api/v1")
log = logging.getLogger("xwhep.server")
Ident = Annotated[Identity, Depends(identity)]
St = Annotated[ServerState, Depends(state_dep)]


# -- public ------------------------------------------------------------------------------------------------------

@router.get("/health", tags=["public"], response_model=S.Health)
async def health(st: St) -> FastJSON:
    return FastJSON({"status": "ok", "uptime": time.time() - st.started})


@router.get("/version", tags=["public"], response_model=S.Version)
async def version() -> FastJSON:
    return FastJSON({"version": __version__, "api": "v1"})


@router.post("/auth/login", tags=["public"], response_model=S.Token)
async def login(body: LoginIn, request: Request, st: St) -> FastJSON:
    """Password login; the answer is a short-lived bearer token. Failures slow down the (account, address) pair
    and, past a higher threshold, the address: 429 with a Retry-After that doubles with each further failure.
    Nothing locks an account as such: its owner logs in from another address at once."""
    address = request.client.host if request.client else "unknown"
    pair, addr = f"{body.login}\0{address}", f"addr:{address}"
    limits = ((st.login_failures, pair), (st.login_failures_address, addr))
    wait = max((lim.retry_after(k) or 0.0 for lim, k in limits), default=0.0)
    if wait:
        # trying again before the wait is over is one more failure: the wait grows instead of running out
        wait = max(lim.fail(k) if lim.retry_after(k) else 0.0 for lim, k in limits)
        await st.db.run(c.event, None, "auth.login.throttled", None, None, None,
                        f"login {body.login} from {address}: wait {wait:.0f} s")
        raise ApiError(429, f"too many failed logins: retry in {wait:.0f} s", "password",
                       {"Retry-After": f"{max(1, round(wait))}"})
    ident, stored = await st.db.run(users.credentials, body.login)
    if not await anyio.to_thread.run_sync(verify_password, stored, body.password):
        ident = None
    if ident is None:
        for lim, k in limits:
            lim.fail(k)
        await st.db.run(c.event, None, "auth.login.failed", None, None, None, f"login {body.login} from {address}")
        raise ApiError(401, "login failed: unknown login or wrong password", "password")
    st.login_failures.reset(pair)
    await st.db.run(c.event, ident.uid, "auth.login", ident.uid)
    token, ttl = st.tokens.issue(ident)
    return FastJSON({"token": token, "expires_in": ttl, "user": ident.uid, "level": ident.level.name})


@router.get("/me", response_model=S.User)
async def me(ident: Ident, st: St) -> FastJSON:
    row = await st.db.run(c.load, "user", ident.uid)
    return FastJSON(c.render(row, st.name))


# -- works -------------------------------------------------------------------------------------------------------

@router.post("/works", status_code=201, response_model=S.Submitted | S.SubmittedBag)
async def submit(body: Annotated[dict[str, Any], Body()], ident: Ident, st: St) -> FastJSON:
    """Submit one work (a WorkSpec), or a bag ``{"works": [WorkSpec, ...]}`` of up to 10,000 in one transaction."""
    if isinstance(body.get("works"), list) and len(body["works"]) > st.config.max_bag:
        raise ApiError(413, f"works: {len(body['works'])} works in one request, at most {st.config.max_bag}", "works")
    body_is_bag = "works" in body
    try:
        specs = ([set_fields(w) for w in BAG.validate_python(body)["works"]] if body_is_bag
                 else [set_fields(SUBMISSION.validate_python(body))])
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    out, eff = await st.db.run(works.submit, ident, specs, st.name, st.config.max_bag, st.relay.proxy_refusal)
    eff.apply(st)
    return FastJSON({"works": out} if body_is_bag else out[0], status_code=201)


@router.get("/works", response_model=S.WorkPage)
async def list_works(ident: Ident, st: St, status: Annotated[str | None, Query(pattern=STATUS_PATTERN)] = None,
                     label: Annotated[str | None, Query(max_length=255)] = None, group: RefQuery = None,
                     session: RefQuery = None, app: Annotated[str | None, Query(max_length=255)] = None,
                     limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
                     after: Annotated[int, Query(**QUERY_INT64)] = 0) -> FastJSON:
    return FastJSON(await st.db.run(works.listing, ident, st.name, status, label, group, session, app, limit,
                                    after))


WAIT_SLICE = 2.0  # a waiting request re-reads the states at least this often (other server processes' changes)
WAIT_INTERVAL = 0.2  # and at most this often (a thousand reports a second need not mean a thousand reads)


@router.post("/works/wait", response_model=S.Statuses | S.BagCounts)
async def wait_works(body: WaitIn, ident: Ident, st: St) -> FastJSON:
    """Long-poll: uid → status as soon as one work's status differs from ``known``, all are final, or ``timeout``
    seconds passed (``xw wait`` asks again until its own deadline)."""
    if body.group is not None or body.label is not None:
        from xwhep.server.api.bagwait import wait_bag

        return FastJSON(await wait_bag(body, ident, st))
    if not body.works:
        raise bad_request("works: give the works to wait for (or a group or a label)", "works")
    uids = [c.ref(u, "works") for u in body.works]
    known = {c.ref(k, "known"): v for k, v in body.known.items()}
    deadline = time.monotonic() + min(body.timeout, st.config.max_wait)
    while True:
        last = time.monotonic()
        status = await st.db.run(works.statuses, ident, uids)
        if any(status[u] != known.get(u) for u in uids) or all(is_final(v) for v in status.values()):
            return FastJSON({"works": status})
        remaining = deadline - time.monotonic()
        if remaining <= 0 or st.scheduler.closing:
            return FastJSON({"works": status})
        await st.work_changes.wait(min(remaining, WAIT_SLICE))
        pause = min(WAIT_INTERVAL - (time.monotonic() - last), deadline - time.monotonic())
        if pause > 0:
            await asyncio.sleep(pause)  # a rate limit, not a synchronisation: the next read happens regardless


@router.get("/works/{uid:uid}", response_model=S.Work)
async def get_work(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    return FastJSON(await st.db.run(works.get, ident, c.ref(uid, "uid"), st.name))


@router.get("/works/{uid:uid}/why", response_model=S.Why)
async def why(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    """Why is this work pending: per requirement, how many registered hosts satisfy it."""
    from xwhep.server.hosts import all_profiles

    since = time.time() - st.config.alive_timeout
    ctx = await st.db.run(works.why_context, ident, c.ref(uid, "uid"), since)
    profiles = await all_profiles(st)
    # Every host's requirements expression is evaluated (each within its budget): in a worker thread, never on the
    # event loop, a few requests at a time, and for a bounded time in all ("partial" past it).
    global _why_slots
    if _why_slots is None:
        _why_slots = anyio.CapacityLimiter(2)
    def stop() -> bool:
        # Called between hosts. Giving up the GIL here lets the event loop in at once: otherwise each of its
        # system calls waits out a switch interval behind this CPU-bound thread, and /health took over a second.
        time.sleep(0)
        return st.scheduler.closing

    return FastJSON(await anyio.to_thread.run_sync(works.why_report, ctx, profiles, works.WHY_SECONDS, stop,
                                                   limiter=_why_slots))


_why_slots: anyio.CapacityLimiter | None = None


@router.get("/works/{uid:uid}/tasks", response_model=list[S.Task])
async def work_tasks(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    def run(conn: Any) -> list[dict[str, Any]]:
        c.load_checked(conn, ident, "work", c.ref(uid, "uid"), Action.READ)
        rows = conn.execute(sa.select(s.tasks).where(s.tasks.c.work == c.ref(uid, "uid"))
                            .order_by(s.tasks.c.trial)).mappings()
        return [c.render(r, st.name) for r in rows]

    return FastJSON(await st.db.run(run))


@router.delete("/works/{uid:uid}", response_model=S.Deleted)
async def delete_work(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    eff = await st.db.run(works.delete, ident, c.ref(uid, "uid"))
    eff.apply(st)
    return FastJSON({"deleted": c.ref(uid, "uid")})


@router.post("/works/{uid:uid}/cancel", response_model=S.Work)
async def cancel_work(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    eff = await st.db.run(works.cancel, ident, c.ref(uid, "uid"))
    eff.apply(st)
    return FastJSON(await st.db.run(works.get, ident, c.ref(uid, "uid"), st.name))


# -- datas -------------------------------------------------------------------------------------------------------

@router.post("/datas", status_code=201, response_model=S.Data)
async def create_data(body: DataSpec, ident: Ident, st: St) -> FastJSON:
    out, eff = await st.db.run(datas.create, ident, dump(body), st.name, st.store.exists)
    eff.apply(st)
    return FastJSON(out, status_code=201)


@router.put("/datas/{uid:uid}/content", response_model=S.Data)
async def upload(uid: UidPath, request: Request, ident: Ident, st: St) -> FastJSON:
    """Stream the bytes; they are hashed on the way and committed only when size and sha256 match."""
    uid = c.ref(uid, "uid")
    row = await st.db.run(datas.check_upload, ident, uid)
    declared = row["sha256"] or request.headers.get("x-xw-sha256")
    if not declared:
        raise bad_request("sha256: declare it when creating the data or in the X-Xw-Sha256 header", "sha256")
    size = row["size"]
    if size is None and request.headers.get("content-length"):
        size = int(request.headers["content-length"])
    try:
        staged = st.store.begin()
    except OSError as exc:
        raise _full(exc) from exc
    try:
        async for chunk in request.stream():
            staged.write(chunk)
    except ClientDisconnect:
        st.store.abort(staged)
        raise bad_request(f"upload of data {uid} interrupted after {staged.size} bytes; nothing stored",
                          "content") from None
    except OSError as exc:
        st.store.abort(staged)  # the bytes written so far are freed at once
        raise _full(exc) from exc
    except BaseException:
        st.store.abort(staged)
        raise
    try:
        sha, n = st.store.commit(staged, size, declared)
    except OSError as exc:
        raise _full(exc) from exc
    except StoreError as exc:
        await st.db.run(c.event, ident.uid, "data.upload.refused", uid, None, None, str(exc))
        raise bad_request(f"content: {exc}; data {uid} stays UNAVAILABLE", "content") from None
    out, eff = await st.db.run(datas.mark_available, ident, uid, sha, n)
    eff.apply(st)
    st.metrics.uploaded.inc(n)
    return FastJSON(c.render(out, st.name))


def _full(exc: OSError) -> Exception:
    """A blob store write that failed: 507 naming the content when the storage is full; anything else as it was."""
    why = storage_full(exc)
    if why is None:
        return exc
    log.error("storage full: data upload: %s", why)
    return storage_full_error(why, "content")


class BlobResponse(FileResponse):
    """A blob's bytes (Range and all, as Starlette serves files), read 1 MiB at a time instead of 64 KiB: each read
    is a hop to a worker thread, and at 64 KiB the hops cost the server more CPU than TLS (2.4 → 1.1 ms per MiB
    sent, measured on 512 MiB). A Range it cannot serve is answered in the API's JSON error form (Starlette's own
    answer is text/plain)."""

    chunk_size = 1024 * 1024

    def __init__(self, *args: Any, sent: Any = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sent = sent  # a counter of the bytes sent (the transfer metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        wanted, if_range = headers.get("range"), headers.get("if-range")
        if (wanted is not None and self.stat_result is not None and scope["method"] in ("GET", "HEAD")
                and (if_range is None or self._should_use_range(if_range))):
            size = self.stat_result.st_size
            try:
                self._parse_range_header(wanted, size)
            except MalformedRangeHeader as exc:
                await FastJSON({"error": f"Range: {exc.content}", "field": "Range"}, 400)(scope, receive, send)
                return
            except RangeNotSatisfiable:
                await FastJSON({"error": f"Range: {wanted} is outside the {size} bytes of this data",
                                "field": "Range"}, 416, {"Content-Range": f"bytes */{size}"})(scope, receive, send)
                return
        counter = self.sent
        if counter is None:
            await super().__call__(scope, receive, send)
            return

        async def counting(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body":
                counter.inc(len(message.get("body", b"")))

        await super().__call__(scope, receive, counting)


@router.get("/datas/{uid:uid}/content", response_class=BlobResponse, status_code=200)
async def download(uid: UidPath, ident: Ident, st: St) -> FileResponse:
    """The bytes, with HTTP Range support (resume); ``X-Xw-Sha256`` carries the checksum."""
    row = await st.db.run(datas.check_download, ident, c.ref(uid, "uid"))
    path = st.store.path(row["sha256"])
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ApiError(410, f"data {uid}: content missing from the store", "content") from None
    return BlobResponse(path, media_type="application/octet-stream", filename=row["name"], stat_result=stat,
                        headers={"X-Xw-Sha256": row["sha256"], "ETag": f'"{row["sha256"]}"'},
                        sent=st.metrics.downloaded)


@router.get("/datas", response_model=list[S.Data])
async def list_datas(ident: Ident, st: St, limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
                     after: Annotated[str, Query(max_length=64)] = "") -> FastJSON:
    return FastJSON(await st.db.run(datas.listing, ident, st.name, limit, after))


@router.get("/datas/{uid:uid}", response_model=S.Data)
async def get_data(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    row = await st.db.run(c.load_checked, ident, "data", c.ref(uid, "uid"), Action.READ)
    return FastJSON(c.render(row, st.name))


@router.delete("/datas/{uid:uid}", response_model=S.Deleted)
async def delete_data(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    eff = await st.db.run(datas.delete, ident, c.ref(uid, "uid"))
    eff.apply(st)
    return FastJSON({"deleted": c.ref(uid, "uid")})


# -- apps --------------------------------------------------------------------------------------------------------

@router.post("/apps", status_code=201, response_model=S.App)
async def put_app(body: AppSpec, ident: Ident, st: St) -> FastJSON:
    return FastJSON(await st.db.run(apps.put, ident, dump(body), st.name), status_code=201)


@router.get("/apps", response_model=list[S.App])
async def list_apps(ident: Ident, st: St) -> FastJSON:
    return FastJSON(await st.db.run(apps.listing, ident, st.name))


@router.get("/apps/{ref}", response_model=S.App)
async def get_app(ref: AppRef, ident: Ident, st: St) -> FastJSON:
    return FastJSON(c.render(await st.db.run(apps.resolve, ident, ref), st.name))


@router.delete("/apps/{ref}", response_model=S.Deleted)
async def delete_app(ref: AppRef, ident: Ident, st: St) -> FastJSON:
    """Remove an app (by name, uid or URI, as ``GET /apps/{ref}``)."""
    def run(conn: Any) -> str:
        uid = str(apps.resolve(conn, ident, ref)["uid"])
        apps.delete(conn, ident, uid)
        return uid

    return FastJSON({"deleted": await st.db.run(run)})


# -- users and groups ----------------------------------------------------------------------------------------------

@router.post("/users", status_code=201, response_model=S.User)
async def create_user(body: UserSpec, ident: Ident, st: St) -> FastJSON:
    spec = dump(body)
    if "password" in spec:  # argon2 is slow on purpose: keep it off the event loop
        spec["password_hash"] = await anyio.to_thread.run_sync(hash_password, spec["password"])
    return FastJSON(await st.db.run(users.create_user, ident, spec, st.name), status_code=201)


@router.get("/users", response_model=list[S.User])
async def list_users(ident: Ident, st: St) -> FastJSON:
    return FastJSON(await st.db.run(users.listing, ident, st.name))


@router.delete("/users/{uid:uid}", response_model=S.Deleted)
async def delete_user(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    hosts, eff = await st.db.run(users.delete_user, ident, c.ref(uid, "uid"))
    st.revocations.forget(c.ref(uid, "uid"))  # its unexpired tokens stop working now, not in an hour
    for host in hosts:
        hostcache.forget(st, host)
    eff.apply(st)
    return FastJSON({"deleted": c.ref(uid, "uid")})


# -- mandates (a user lets a MANDATED_USER act on its behalf: X-Xw-On-Behalf-Of) -------------------------------

@router.post("/mandates", status_code=201, response_model=S.Mandate)
async def grant_mandate(body: MandateIn, ident: Ident, st: St) -> FastJSON:
    """``{"mandatary": LOGIN|UID, "expires_in": seconds?, "mandator": LOGIN|UID?}`` (mandator: administrators
    only; default the caller). Granting again renews the mandate."""
    if ident.via is not None:  # a mandate is given by its mandator in person, never through another mandate
        raise ApiError(403, "a mandated request cannot give mandates")
    return FastJSON(await st.db.run(mandates.grant, ident, dump(body), st.name), status_code=201)


@router.get("/mandates", response_model=list[S.Mandate])
async def list_mandates(ident: Ident, st: St) -> FastJSON:
    """The mandates the caller gave or holds (administrators: all)."""
    return FastJSON(await st.db.run(mandates.listing, ident, st.name))


@router.delete("/mandates/{uid:uid}", response_model=S.Deleted)
async def revoke_mandate(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    """End a mandate at once (its mandator, its mandatary, or an administrator)."""
    if ident.via is not None:
        raise ApiError(403, "a mandated request cannot revoke mandates")
    await st.db.run(mandates.revoke, ident, c.ref(uid, "uid"))
    return FastJSON({"deleted": c.ref(uid, "uid")})


@router.post("/users/{uid:uid}/password", response_model=S.Updated)
async def set_password(uid: UidPath, body: PasswordIn, ident: Ident, st: St) -> FastJSON:
    if ident.via is not None:  # credentials stay in their owner's hands, whatever the mandate
        raise ApiError(403, "a mandated request cannot change passwords")
    hashed = await anyio.to_thread.run_sync(hash_password, users.check_password(body.password))  # slow on purpose
    await st.db.run(users.set_password, ident, c.ref(uid, "uid"), hashed)
    st.revocations.forget(c.ref(uid, "uid"))  # the tokens issued before are void from the next request on
    return FastJSON({"updated": c.ref(uid, "uid")})


@router.post("/users/{uid:uid}/revoke", response_model=S.Revoked)
async def revoke_tokens(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    """End every session of a user at once: its tokens issued until now are refused (durably)."""
    if ident.via is not None:
        raise ApiError(403, "a mandated request cannot end sessions")
    await st.db.run(users.revoke_tokens, ident, c.ref(uid, "uid"))
    st.revocations.forget(c.ref(uid, "uid"))
    return FastJSON({"revoked": c.ref(uid, "uid")})


@router.post("/usergroups", status_code=201, response_model=S.UserGroup)
async def create_usergroup(body: GroupSpec, ident: Ident, st: St) -> FastJSON:
    return FastJSON(await st.db.run(users.create_group, ident, dump(body), st.name), status_code=201)


@router.get("/usergroups", response_model=list[S.UserGroup])
async def list_usergroups(ident: Ident, st: St) -> FastJSON:
    return FastJSON(await st.db.run(users.list_groups, ident, st.name))


# -- sessions and groups of works ----------------------------------------------------------------------------------

def _bag_routes(kind: str) -> None:
    async def create(body: BagSpec, ident: Ident, st: St) -> FastJSON:
        return FastJSON(await st.db.run(bags.create, ident, kind, dump(body), st.name), status_code=201)

    async def listing(ident: Ident, st: St) -> FastJSON:
        return FastJSON(await st.db.run(bags.listing, ident, kind, st.name))

    async def delete(uid: UidPath, ident: Ident, st: St) -> FastJSON:
        eff = await st.db.run(bags.delete, ident, kind, c.ref(uid, "uid"))
        eff.apply(st)
        return FastJSON({"deleted": c.ref(uid, "uid")})

    model = S.Session if kind == "session" else S.Group
    router.add_api_route(f"/{kind}s", create, methods=["POST"], status_code=201, name=f"create_{kind}",
                         response_model=model)
    router.add_api_route(f"/{kind}s", listing, methods=["GET"], name=f"list_{kind}s", response_model=list[model])
    router.add_api_route(f"/{kind}s/{{uid:uid}}", delete, methods=["DELETE"], name=f"delete_{kind}",
                         response_model=S.Deleted)


_bag_routes("session")
_bag_routes("group")


# -- any object ----------------------------------------------------------------------------------------------------

def _find(conn: Any, uid: str) -> tuple[str, dict[str, Any]]:
    for kind, table in s.TABLES_BY_TYPE.items():
        row = conn.execute(sa.select(table).where(table.c.uid == uid)).mappings().first()
        if row is not None:
            return kind, dict(row)
    raise ApiError(404, f"no object {uid}")


@router.get("/objects/{uid:uid}", response_model=S.AnyObject)
async def get_object(uid: UidPath, ident: Ident, st: St) -> FastJSON:
    """Any object by uid or URI, with its kind."""
    def run(conn: Any) -> dict[str, Any]:
        kind, row = _find(conn, c.ref(uid, "uid"))
        if not c.allowed(conn, ident, Action.READ, row):
            raise ApiError(404, f"no object {uid}")
        return {"kind": kind, **c.render(row, st.name)}

    return FastJSON(await st.db.run(run))


@router.post("/objects/{uid:uid}/chmod", response_model=S.Chmodded)
async def chmod(uid: UidPath, body: ChmodIn, ident: Ident, st: St) -> FastJSON:
    """Change access rights: ``0x755``, ``755`` (octal digits as meant) or symbolic ``go-rwx``."""
    def run(conn: Any) -> dict[str, Any]:
        kind, row = _find(conn, c.ref(uid, "uid"))
        c.load_checked(conn, ident, kind, row["uid"], Action.CHMOD)
        try:
            rights = parse_rights(body.access_rights, row["access_rights"])
        except BadRights as exc:
            raise bad_request(f"access_rights: {exc}", "access_rights") from None
        # what is stored is what was asked, or the request is refused with the reason (never clamped silently)
        if kind == "work":
            app = conn.execute(sa.select(s.apps.c.name, s.apps.c.access_rights)
                               .where(s.apps.c.uid == row["app"])).first()
            if app is not None:
                works.check_work_rights(rights, app[0], app[1])
        if kind == "app":
            apps.check_app_rights(ident, rights)
        table = s.TABLES_BY_TYPE[kind]
        conn.execute(table.update().where(table.c.uid == row["uid"]).values(access_rights=rights, modified=c.now()))
        c.event(conn, ident.uid, f"{kind}.chmod", row["uid"], format_rights(row["access_rights"]),
                format_rights(rights))
        return {"kind": kind, "uid": row["uid"], "access_rights": format_rights(rights)}

    return FastJSON(await st.db.run(run))


@router.get("/events", response_model=list[S.Event])
async def list_events(ident: Ident, st: St, object: RefQuery = None,
                      limit: Annotated[int, Query(ge=1, le=100_000)] = 1000) -> FastJSON:
    """The event log: an object's history (for its readers), or everything (administrators)."""
    def run(conn: Any) -> list[dict[str, Any]]:
        q = sa.select(s.events).order_by(s.events.c.id.desc()).limit(limit)
        if object:
            uid = c.ref(object, "object")
            _, row = _find(conn, uid)
            if not c.allowed(conn, ident, Action.READ, row):
                raise ApiError(404, f"no object {uid}")
            q = q.where(s.events.c.object == uid)
        elif not ident.is_admin:
            q = q.where(s.events.c.actor == ident.uid)
        return [c.render(r, st.name) for r in conn.execute(q).mappings()][::-1]

    return FastJSON(await st.db.run(run))
