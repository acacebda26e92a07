"""X.509 login routes: a challenge, then the chain + a signature over it; the answer is our usual bearer token.

The checks live in :mod:`xwhep.server.x509`; here the proven subject DN becomes a user (``users.x509_dn``),
created as a STANDARD_USER (WORKER_USER for ``OU=worker`` certificates) only when the server's
``delegated_registration`` setting is on.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from pydantic import Field
from sqlalchemy.engine import Connection

from xwhep.core.model import UsageLevel
from xwhep.server.api import schemas as S
from xwhep.server.api.deps import FastJSON, state_dep
from xwhep.server.api.models import Strict, Unicode
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.errors import ApiError
from xwhep.server.services import common as c
from xwhep.server.services import users
from xwhep.server.state import ServerState
from xwhep.server.x509 import MAX_CHAIN, MAX_PEM, Verified, X509Refused, serial_hex

router = APIRouter(prefix="/api/v1")
St = Annotated[ServerState, Depends(state_dep)]


class X509LoginIn(Strict):
    chain: list[Annotated[str, Unicode(MAX_PEM)]] = Field(min_length=1, max_length=MAX_CHAIN)
    nonce: Annotated[str, Unicode(64)]
    audience: Annotated[str, Unicode(255)]
    signature: Annotated[str, Unicode(4096)]


@router.post("/auth/x509/challenge", tags=["public"], response_model=S.Nonce)
async def challenge(st: St) -> FastJSON:
    """A single-use nonce to sign for ``POST /auth/x509`` (valid ``expires_in`` seconds)."""
    if st.x509.ca() is None:
        raise ApiError(503, "X.509 login is not available: this server has no CA (xw ca init)")
    nonce = st.x509.nonces.issue()
    if nonce is None:
        raise ApiError(503, "too many X.509 logins in progress: retry shortly", None, {"Retry-After": "5"})
    return FastJSON({"nonce": nonce, "expires_in": st.x509.nonces.ttl})


@router.post("/auth/x509", tags=["public"], response_model=S.X509Token)
async def login_x509(body: X509LoginIn, request: Request, st: St) -> FastJSON:
    """Log in with a certificate (or an RFC 3820 proxy of one): ``chain`` leaf first, ``signature`` (base64) by
    the leaf's key over ``xwhep-x509-login\\0<audience>\\0<nonce>``, ``audience`` the server host name."""
    address = request.client.host if request.client else "unknown"
    key = f"addr:{address}"
    wait = st.login_failures_address.retry_after(key)
    if wait:
        await _failed(st, f"too many failed logins from {address}")
        raise ApiError(429, f"too many failed logins: retry in {wait:.0f} s", None,
                       {"Retry-After": f"{max(1, round(wait))}"})
    try:
        verified = st.x509.authenticate(body.chain, body.nonce, body.audience, body.signature)
    except X509Refused as exc:
        st.login_failures_address.fail(key)
        await _failed(st, f"{exc} (from {address})")
        raise ApiError(401, f"X.509 login refused: {exc}", "chain") from None
    ident, registered = await _user_for(st, verified)
    where = f"{verified.dn} serial {serial_hex(verified.serial)}" + (
        f" via {verified.proxies} prox{'y' if verified.proxies == 1 else 'ies'}" if verified.proxies else "")
    if ident is None:
        st.login_failures_address.fail(key)
        await _failed(st, f"no user bound to {where} and delegated registration is off (from {address})")
        raise ApiError(401, f"X.509 login refused: no user is bound to {verified.dn} "
                            "(an administrator sets the user's x509_dn)", "chain")
    await st.db.run(c.event, ident.uid, "auth.x509", ident.uid, None, None, f"{where} from {address}")
    # the token carries the certificate's serial (revocation ends it at once) and ends no later than the chain
    left = int((verified.not_after - dt.datetime.now(dt.UTC)).total_seconds())
    token, ttl = st.tokens.issue(ident, ttl=max(1, min(st.tokens.ttl, left)))
    return FastJSON({"token": token, "expires_in": ttl, "user": ident.uid, "level": ident.level.name,
                     "login": ident.login, "dn": verified.dn, "registered": registered})


async def _failed(st: ServerState, reason: str) -> None:
    await st.db.run(c.event, None, "auth.x509.failed", None, None, None, reason[:2000])


async def _user_for(st: ServerState, verified: Verified) -> tuple[Identity | None, bool]:
    """The user bound to the certificate's DN, created when delegated registration allows it."""
    args = (verified.dn_forms, verified.cn, verified.kind, verified.serial, st.config.delegated_registration,
            st.name)
    try:
        return await st.db.run(_bind, *args)
    except sa.exc.IntegrityError:
        # another login of the same new DN registered it first (unique x509_dn / login): use that user
        return await st.db.run(_bind, *args)


def _bind(conn: Connection, dn_forms: tuple[str, str], cn: str, kind: str, serial: int, delegated: bool,
          server: str) -> tuple[Identity | None, bool]:
    rows = conn.execute(sa.select(s.users).where(s.users.c.x509_dn.in_(dn_forms))).mappings().all()
    if rows:
        row = min(rows, key=lambda r: dn_forms.index(r["x509_dn"]))  # the RFC 4514 spelling wins
        return _identity(row, serial), False
    if not delegated:
        return None, False
    level = UsageLevel.WORKER_USER if kind == "worker" else UsageLevel.STANDARD_USER
    login = _free_login(conn, cn)
    out = users.create_user(conn, None, {"login": login, "level": level.name, "x509_dn": dn_forms[0]}, server)
    c.event(conn, out["uid"], "auth.x509.register", out["uid"], None, None,
            f"{dn_forms[0]} as {login} ({level.name}), delegated registration")
    row = conn.execute(sa.select(s.users).where(s.users.c.uid == out["uid"])).mappings().one()
    return _identity(row, serial), True


def _identity(row: Any, serial: int) -> Identity:
    return Identity(row["uid"], row["login"], UsageLevel[row["level"]], row["usergroup"], x509_serial=serial)


def _free_login(conn: Connection, cn: str) -> str:
    """A login derived from the common name: ``alice``, else ``alice-2``, … (logins are unique)."""
    base = re.sub(r"[^A-Za-z0-9._@-]+", "_", cn).strip("._-")[:100] or "x509user"
    taken = {r[0] for r in conn.execute(sa.select(s.users.c.login).where(
        sa.or_(s.users.c.login == base, s.users.c.login.like(f"{base}-%"))))}
    if base not in taken:
        return base
    for n in range(2, 1000):
        if f"{base}-{n}" not in taken:
            return f"{base}-{n}"
    return f"{base}-{secrets.token_hex(4)}"
