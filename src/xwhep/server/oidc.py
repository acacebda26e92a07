"""OpenID Connect bearer tokens: JWTs from configured issuers, checked against their discovery document and JWKS.

Each ``[[oidc]]`` table of HOME/server.toml names one issuer::

    [[oidc]]
    issuer = "https://idp.example.org/realms/grid"   # must equal the discovery document's "issuer"
    audience = "xwhep"          # the token's "aud" (string or list) must contain it
    client_id = "xwhep-cli"     # advertised to ``xw login --oidc`` (public client, device flow)
    user_claim = "sub"          # "sub": users are matched by "ISSUER|SUB"; "email": by verified e-mail
    auto_register = false       # create a user on first sight of an unknown subject
    level = "STANDARD_USER"     # the level of auto-registered users (at most STANDARD_USER)
    ca = "/path/to/idp-ca.pem"  # trust this CA for the issuer's TLS (default: the system's)

A token is looked at unverified only to pick the issuer by its ``iss``; everything else is decided after the
signature was checked with a key from the issuer's JWKS. Only asymmetric algorithms are accepted (never
``none``, never HS*: a public key must not become an HMAC secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.model import UsageLevel
from xwhep.core.uri import new_uid
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.services.common import event, now

log = logging.getLogger("xwhep.server.oidc")

#: Signature algorithms accepted from an issuer: asymmetric only.
ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"})
LEEWAY = 30.0  # seconds of clock skew tolerated on exp/nbf/iat
MAX_TOKEN = 16 * 1024  # a longer bearer string is not worth parsing
METADATA_TTL = 3600.0  # discovery document and JWKS are refetched this often
FETCH_BACKOFF = 5.0  # after a failed fetch, fail fast for this long instead of hammering the issuer
JWKS_MIN_REFRESH = 30.0  # an unknown kid triggers a JWKS refetch at most this often (key rotation, not DoS)
CACHE_TTL = 300.0  # an accepted token is remembered this long (at most until it expires)
CACHE_SIZE = 10_000
FAILURE_EVENTS_PER_MINUTE = 60  # per issuer: garbage tokens must not flood the event log
SUBJECT_MAX = 512  # users.oidc_subject


class OidcConfigError(ValueError):
    """An ``[[oidc]]`` table that cannot be used."""


class _Refused(Exception):
    """A token naming a configured issuer that is not accepted; the message is the reason (for the event log)."""


@dataclass
class IssuerConfig:
    """One configured issuer (see the module docstring)."""

    issuer: str
    audience: str
    client_id: str | None = None
    user_claim: str = "sub"
    auto_register: bool = False
    level: UsageLevel = UsageLevel.STANDARD_USER
    ca: str | None = None
    jwks_min_refresh: float = JWKS_MIN_REFRESH

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IssuerConfig:
        """Check one ``[[oidc]]`` table; :class:`OidcConfigError` names what is wrong."""
        issuer = d.get("issuer")
        if not isinstance(issuer, str) or not issuer:
            raise OidcConfigError("oidc: 'issuer' (a URL) is required")
        where = f"oidc issuer {issuer}"
        parts = urlsplit(issuer)
        if parts.query or parts.fragment or not parts.hostname:
            raise OidcConfigError(f"{where}: not an issuer URL (no query, no fragment)")
        if parts.scheme != "https" and not (parts.scheme == "http" and _is_loopback(parts.hostname)):
            raise OidcConfigError(f"{where}: must use https (plain http only on loopback)")
        audience = d.get("audience")
        if not isinstance(audience, str) or not audience:
            raise OidcConfigError(f"{where}: 'audience' is required (the 'aud' xwhep accepts)")
        user_claim = d.get("user_claim", "sub")
        if user_claim not in ("sub", "email"):
            raise OidcConfigError(f"{where}: user_claim must be 'sub' or 'email'")
        try:
            level = UsageLevel.parse(str(d.get("level") or "STANDARD_USER"))
        except ValueError as exc:
            raise OidcConfigError(f"{where}: level: {exc}") from None
        # anyone the issuer vouches for would get this level: never more than a standard user
        if level > UsageLevel.STANDARD_USER:
            raise OidcConfigError(f"{where}: auto-registered users get at most STANDARD_USER, not {level.name}")
        client_id = d.get("client_id")
        ca = d.get("ca")
        return cls(issuer=issuer, audience=audience, client_id=str(client_id) if client_id else None,
                   user_claim=user_claim, auto_register=bool(d.get("auto_register", False)), level=level,
                   ca=str(ca) if ca else None,
                   jwks_min_refresh=float(d.get("jwks_min_refresh", JWKS_MIN_REFRESH)))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _norm(url: str) -> str:
    return url.rstrip("/")


@dataclass
class _Issuer:
    """An issuer's configuration plus what was fetched from it."""

    cfg: IssuerConfig
    discovery: dict[str, Any] | None = None
    discovery_at: float = 0.0
    jwks: list[dict[str, Any]] = field(default_factory=list)
    jwks_at: float = 0.0
    failed_at: float = 0.0
    failure: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    event_window: float = 0.0
    events_in_window: int = 0
    _ssl: ssl.SSLContext | bool | None = None

    def verify_arg(self) -> ssl.SSLContext | bool:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=self.cfg.ca) if self.cfg.ca else True
        return self._ssl


class OidcVerifier:
    """Check bearer JWTs from the configured issuers and map them to xwhep users."""

    def __init__(self, configs: list[dict[str, Any]], http_timeout: float = 10.0) -> None:
        self.issuers: dict[str, _Issuer] = {}
        for d in configs:
            cfg = IssuerConfig.from_dict(d)
            key = _norm(cfg.issuer)
            if key in self.issuers:
                raise OidcConfigError(f"oidc issuer {cfg.issuer}: configured twice")
            self.issuers[key] = _Issuer(cfg)
        self.http_timeout = http_timeout
        self._accepted: OrderedDict[str, tuple[Identity, float]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self.issuers)

    def public_info(self) -> list[dict[str, Any]]:
        """What a client needs to log in: each issuer's URL, the audience it must get tokens for, its client id."""
        return [{"issuer": i.cfg.issuer, "audience": i.cfg.audience, "client_id": i.cfg.client_id}
                for i in self.issuers.values()]

    async def verify(self, token: str, db: Any) -> Identity | None:
        """The identity behind an OIDC bearer JWT, or None.

        None without a trace for tokens that name no configured issuer (they are someone else's business, e.g.
        an expired xwhep token); None plus an ``auth.oidc.failed`` event for a configured issuer's token that
        is refused. ``db`` is the server's :class:`~xwhep.server.db.engine.Database`.
        """
        if not token or len(token) > MAX_TOKEN or token.count(".") != 2:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        hit = self._accepted.get(digest)
        if hit is not None:
            if hit[1] > time.time():
                return hit[0]
            del self._accepted[digest]
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return None
        iss = unverified.get("iss")
        if not isinstance(iss, str):
            return None
        issuer = self.issuers.get(_norm(iss))
        if issuer is None:
            return None
        try:
            claims = await self._check(issuer, token, header)
        except _Refused as exc:
            await self._failed(issuer, db, str(exc))
            return None
        try:
            ident = await db.run(_map_user, issuer.cfg, claims)
        except _Refused as exc:
            await self._failed(issuer, db, str(exc))
            return None
        self._remember(digest, ident, float(claims["exp"]))
        return ident

    # -- signature and claims ----------------------------------------------------------------------------------
    async def _check(self, issuer: _Issuer, token: str, header: dict[str, Any]) -> dict[str, Any]:
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise _Refused(f"signature algorithm {alg!r} not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _Refused("malformed kid")
        await self._ensure_metadata(issuer)
        jwk = self._pick_key(issuer, kid, alg)
        if jwk is None and kid is not None:
            # an unknown kid may be a freshly rotated key: refetch the JWKS once (rate-limited in _fetch_jwks)
            with contextlib.suppress(_Refused):
                await self._fetch_jwks(issuer, force=True)
            jwk = self._pick_key(issuer, kid, alg)
        if jwk is None:
            raise _Refused(f"no key {kid!r} for {alg} in the issuer's JWKS" if kid else
                           f"no single {alg} key in the issuer's JWKS and the token names none")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg)
        except jwt.PyJWTError as exc:
            raise _Refused(f"key {kid!r} unusable for {alg}: {exc}") from None
        assert issuer.discovery is not None
        try:
            return jwt.decode(token, key, algorithms=[alg], audience=issuer.cfg.audience,
                              issuer=issuer.discovery["issuer"], leeway=LEEWAY,
                              options={"require": ["exp", "iat", "iss", "aud", "sub"], "verify_signature": True})
        except jwt.ExpiredSignatureError:
            raise _Refused("token expired") from None
        except jwt.InvalidAudienceError:
            raise _Refused(f"token audience is not {issuer.cfg.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise _Refused("token issuer does not match the discovery document") from None
        except jwt.ImmatureSignatureError:
            raise _Refused("token not yet valid (nbf/iat in the future)") from None
        except jwt.InvalidSignatureError:
            raise _Refused("bad signature") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _Refused(f"token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise _Refused(f"invalid token: {exc}") from None

    @staticmethod
    def _pick_key(issuer: _Issuer, kid: str | None, alg: str) -> dict[str, Any] | None:
        family = "EC" if alg.startswith("ES") else "RSA"
        usable = [k for k in issuer.jwks if k.get("kty") == family and k.get("use", "sig") == "sig"
                  and k.get("alg") in (None, alg)]
        if kid is not None:
            return next((k for k in usable if k.get("kid") == kid), None)
        # no kid: acceptable only when the choice is unambiguous
        return usable[0] if len(usable) == 1 else None

    # -- fetching ----------------------------------------------------------------------------------------------
    async def _ensure_metadata(self, issuer: _Issuer) -> None:
        fresh = time.monotonic() - METADATA_TTL
        if issuer.discovery is not None and issuer.discovery_at > fresh and issuer.jwks_at > fresh:
            return
        try:
            await self._fetch_jwks(issuer, force=False)
        except _Refused:
            if issuer.discovery is None or not issuer.jwks:
                raise
            # the issuer is down but its keys were known: keep verifying with them until it is back

    async def _fetch_jwks(self, issuer: _Issuer, force: bool) -> None:
        async with issuer.lock:
            t = time.monotonic()
            if not force and issuer.discovery is not None and issuer.jwks_at > t - METADATA_TTL:
                return  # another request fetched while we waited for the lock
            if force and t - issuer.jwks_at < issuer.cfg.jwks_min_refresh:
                return
            if t - issuer.failed_at < FETCH_BACKOFF:
                raise _Refused(f"issuer unavailable: {issuer.failure}")
            try:
                async with httpx.AsyncClient(verify=issuer.verify_arg(), timeout=self.http_timeout,
                                             follow_redirects=False) as http:
                    if issuer.discovery is None or issuer.discovery_at < t - METADATA_TTL:
                        issuer.discovery = await _discover(http, issuer.cfg.issuer)
                        issuer.discovery_at = t
                    issuer.jwks = await _get_jwks(http, issuer.discovery["jwks_uri"])
                    issuer.jwks_at = t
            except _Refused as exc:
                issuer.failed_at, issuer.failure = t, str(exc)
                log.warning("oidc issuer %s: %s", issuer.cfg.issuer, exc)
                raise

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _remember(self, digest: str, ident: Identity, exp: float) -> None:
        # verified once, trusted for a short while: no signature check nor database query on every request,
        # and one auth.oidc event per token rather than one per request
        self._accepted[digest] = (ident, min(exp, time.time() + CACHE_TTL))
        while len(self._accepted) > CACHE_SIZE:
            self._accepted.popitem(last=False)

    async def _failed(self, issuer: _Issuer, db: Any, reason: str) -> None:
        log.info("oidc token from %s refused: %s", issuer.cfg.issuer, reason)
        t = time.monotonic()
        if t - issuer.event_window >= 60.0:
            issuer.event_window, issuer.events_in_window = t, 0
        issuer.events_in_window += 1
        if issuer.events_in_window > FAILURE_EVENTS_PER_MINUTE:
            return  # the log line above still tells; the event table is not a sink for garbage
        await db.run(event, None, "auth.oidc.failed", None, None, None, f"{issuer.cfg.issuer}: {reason}"[:2000])


async def _get_json(http: httpx.AsyncClient, url: str, what: str) -> dict[str, Any]:
    try:
        r = await http.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise _Refused(f"cannot fetch the {what} {url}: {exc.__class__.__name__}: {exc}") from None
    if r.status_code != 200:
        raise _Refused(f"cannot fetch the {what} {url}: HTTP {r.status_code}")
    try:
        data = r.json()
    except ValueError:
        raise _Refused(f"the {what} {url} is not JSON") from None
    if not isinstance(data, dict):
        raise _Refused(f"the {what} {url} is not a JSON object")
    return data


async def _discover(http: httpx.AsyncClient, issuer: str) -> dict[str, Any]:
    """The issuer's discovery document, checked as OpenID Connect Discovery 1.0 §4.3 asks."""
    doc = await _get_json(http, _norm(issuer) + "/.well-known/openid-configuration", "discovery document")
    if not isinstance(doc.get("issuer"), str) or _norm(doc["issuer"]) != _norm(issuer):
        raise _Refused(f"the discovery document names issuer {doc.get('issuer')!r}, not {issuer!r}")
    jwks_uri = doc.get("jwks_uri")
    if not isinstance(jwks_uri, str):
        raise _Refused("the discovery document has no jwks_uri")
    parts = urlsplit(jwks_uri)
    if parts.scheme != "https" and not (parts.scheme == "http" and _is_loopback(parts.hostname or "")):
        raise _Refused(f"jwks_uri {jwks_uri!r} is not https")
    return doc


async def _get_jwks(http: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    data = await _get_json(http, url, "JWKS")
    keys = data.get("keys")
    if not isinstance(keys, list):
        raise _Refused(f"the JWKS {url} has no 'keys' list")
    # private or symmetric material in a JWKS is a broken issuer: keep public asymmetric keys only
    return [k for k in keys if isinstance(k, dict) and k.get("kty") in ("RSA", "EC") and "d" not in k]


# -- users -------------------------------------------------------------------------------------------------------

def _map_user(conn: Connection, cfg: IssuerConfig, claims: dict[str, Any]) -> Identity:
    """The user a verified token stands for (found, linked or auto-registered); :class:`_Refused` otherwise."""
    iss, sub = str(claims["iss"]), str(claims["sub"])
    subject = f"{iss}|{sub}"
    if len(subject) > SUBJECT_MAX:
        raise _Refused("subject too long")
    users = s.users
    if conn.dialect.name == "postgresql":
        # concurrent first requests of one new subject (thread pool) must not register it twice
        key = int.from_bytes(hashlib.sha256(subject.encode()).digest()[:8], "big", signed=True)
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
    rows = conn.execute(sa.select(users).where(users.c.oidc_subject == subject)).mappings().all()
    if len(rows) > 1:
        raise _Refused(f"subject {subject} is bound to {len(rows)} users")
    row = rows[0] if rows else None
    email = claims.get("email") if claims.get("email_verified") is True else None
    email = email if isinstance(email, str) and "@" in email and len(email) <= 255 else None
    if row is None and cfg.user_claim == "email":
        if email is None:
            raise _Refused(f"subject {subject}: no verified e-mail in the token (user_claim = email)")
        rows = conn.execute(sa.select(users).where(sa.func.lower(users.c.email) == email.lower())).mappings().all()
        if len(rows) > 1:
            raise _Refused(f"e-mail {email} belongs to {len(rows)} users")
        if rows:
            row = rows[0]
            if row["oidc_subject"] and row["oidc_subject"] != subject:
                # the address moved to another account at the issuer (or another issuer): not the same person
                raise _Refused(f"e-mail {email} is bound to another OIDC subject")
            conn.execute(users.update().where(users.c.uid == row["uid"]).values(oidc_subject=subject,
                                                                                 modified=now()))
            event(conn, row["uid"], "auth.oidc.link", row["uid"], detail=subject)
    if row is None:
        if not cfg.auto_register:
            raise _Refused(f"no user for subject {subject}" + (f" nor e-mail {email}" if cfg.user_claim == "email"
                                                                else "") + " (auto-registration is off)")
        row = _register(conn, cfg, claims, subject, email)
    level = UsageLevel[row["level"]]
    event(conn, row["uid"], "auth.oidc", row["uid"], detail=subject[:2000])
    iat = claims.get("iat")  # the issuer's token: void if issued before the user's tokens were revoked
    issued = float(iat) if isinstance(iat, int | float) and not isinstance(iat, bool) else now()
    return Identity(row["uid"], row["login"], level, row["usergroup"], issued=issued)


def _register(conn: Connection, cfg: IssuerConfig, claims: dict[str, Any], subject: str,
              email: str | None) -> Any:
    uid = new_uid()
    login = _free_login(conn, _login_hint(claims, email))
    t = now()
    # no password: this account logs in through its issuer only
    conn.execute(s.users.insert().values(uid=uid, owner=uid, access_rights=0x700, created=t, modified=t,
                                         login=login, password_hash=None, level=cfg.level.name, usergroup=None,
                                         email=email, oidc_subject=subject))
    event(conn, None, "user.create", uid, detail=f"{login} {cfg.level.name} (OpenID Connect)")
    event(conn, uid, "auth.oidc.register", uid, detail=subject[:2000])
    return conn.execute(sa.select(s.users).where(s.users.c.uid == uid)).mappings().one()


def _login_hint(claims: dict[str, Any], email: str | None) -> str:
    for value in (claims.get("preferred_username"), email, claims.get("sub")):
        if isinstance(value, str):
            cleaned = "".join(ch for ch in value.strip() if ch.isprintable() and ch not in ": \t/\\")
            if cleaned:
                return cleaned[:100]
    return "oidc-user"


def _free_login(conn: Connection, hint: str) -> str:
    """``hint`` or ``hint-2``, ``hint-3``…: never an existing account's login (that would be a takeover)."""
    candidate, n = hint, 1
    while conn.execute(sa.select(s.users.c.uid).where(s.users.c.login == candidate)).first() is not None:
        n += 1
        # past a few collisions someone is squatting on the name: a random suffix ends the search
        candidate = f"{hint}-{n}" if n <= 20 else f"{hint}-{new_uid()[:8]}"
    return candidate
