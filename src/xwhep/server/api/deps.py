"""What every router needs: the server state, the caller's identity, fast JSON responses."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse

from xwhep.server.auth import Identity
from xwhep.server.errors import ApiError
from xwhep.server.revocation import user_epoch
from xwhep.server.services import hostkeys
from xwhep.server.state import ServerState


class FastJSON(JSONResponse):
    """orjson rendering: the hot paths return plain dicts and skip FastAPI's encoder."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def json_bytes(content: Any) -> bytes:
    """The server's JSON rendering (orjson; non-string keys allowed), for FastAPI routes and the fast path."""
    return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def state(request: Request) -> ServerState:
    st: ServerState = request.app.state.xw
    return st


async def state_dep(request: Request) -> ServerState:
    """The same as :func:`state`, as an async dependency: FastAPI runs sync dependencies in a thread pool,
    a hop that cost about a tenth of the alive path (measured)."""
    return state(request)


ON_BEHALF_OF = "x-xw-on-behalf-of"


async def identity(request: Request) -> Identity:
    """The bearer token's identity (ours, or an OpenID Connect issuer's); 401 without a valid one. With an
    ``X-Xw-On-Behalf-Of`` header, the identity of the user who mandated the caller (see services/mandates)."""
    st = state(request)
    ident = await authenticate(st, request.headers.get("authorization", ""))
    request.state.ident = ident  # for the audit event of a refusal
    if ident.host is not None and not hostkeys.in_scope(request.url.path):
        raise ApiError(403, f"a host token acts only as host {ident.host} (its protocol, its tasks' data, its "
                            "tunnels): log in as a user for anything else")
    behalf = request.headers.get(ON_BEHALF_OF)
    if behalf is not None:
        from xwhep.server.services import mandates

        if not behalf.strip():
            raise ApiError(400, "X-Xw-On-Behalf-Of: empty; give the mandator's login, uid or URI",
                           "X-Xw-On-Behalf-Of")
        what = f"{getattr(request, 'method', 'WEBSOCKET')} {request.url.path}"  # relay channels come here too
        ident = await st.db.run(mandates.act_for, ident, behalf, what)
        why = await revoked(st, ident)
        if why:
            raise ApiError(401, f"X-Xw-On-Behalf-Of: {why}")
        request.state.ident = ident
    return ident


async def authenticate(st: ServerState, header: str) -> Identity:
    """The identity behind an ``Authorization`` header value; :class:`ApiError` 401 without a valid one."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "authentication required: log in with POST /api/v1/auth/login and send the token")
    token = token.strip()
    ident = st.tokens.check(token)
    if ident is None and st.oidc:
        # not one of ours: maybe a bearer JWT from a configured OpenID Connect issuer
        ident = await st.oidc.verify(token, st.db)
    if ident is None:
        raise ApiError(401, "invalid or expired token: log in again")
    why = await revoked(st, ident)
    if why:
        raise ApiError(401, why)
    return ident


async def revoked(st: ServerState, ident: Identity) -> str | None:
    """Why an identity established earlier (a token, a stream ticket) no longer counts; None if it still does.

    Durable (server/revocation.py): a deleted user, or a token issued before the user's ``tokens_after``
    (password change, reset, revocation), is refused at once and after any restart."""
    if ident.x509_serial is not None and st.x509.revocations.is_revoked(ident.x509_serial):
        return "the certificate this token was obtained with is revoked"
    epoch = st.revocations.cached(ident.uid)
    if epoch is None:
        epoch = await st.db.run(user_epoch, ident.uid)
        st.revocations.remember(ident.uid, epoch)
    return st.revocations.verdict(ident, epoch)
