"""Who is calling: password hashing (argon2id), login tokens (short-lived JWT), the request's actor."""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from xwhep.core.model import UsageLevel
from xwhep.core.rights import Actor

_HASHER = PasswordHasher()
TOKEN_TTL = 3600
_ALG = "HS256"


def hash_password(password: str) -> str:
    """An argon2id hash: the password cannot be recovered from it."""
    return _HASHER.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    if not stored:
        return False
    try:
        return _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class Identity:
    """The authenticated caller of one request."""

    uid: str
    login: str
    level: UsageLevel
    usergroup: str | None
    x509_serial: int | None = None  # set when proven by a certificate: its revocation ends the token at once
    via: str | None = None  # the MANDATED_USER acting on this user's behalf (X-Xw-On-Behalf-Of), if any
    host: str | None = None  # the one host this identity speaks for (a host token: services/hostkeys.py)
    issued: float = 0.0  # when the credential was issued: tokens older than the user's tokens_after are void

    @property
    def actor(self) -> Actor:
        return Actor(self.uid, self.level, self.usergroup)

    @property
    def is_admin(self) -> bool:
        return self.level >= UsageLevel.SUPER_USER

    @property
    def is_worker(self) -> bool:
        return self.level in (UsageLevel.WORKER_USER, UsageLevel.VWORKER_USER)


class Tokens:
    """Issue and check bearer tokens signed with the server's secret."""

    def __init__(self, secret: bytes, ttl: int = TOKEN_TTL) -> None:
        self.secret = secret
        self.ttl = ttl
        self._verified: dict[str, tuple[Identity, float]] = {}  # token → (identity, expiry)

    def issue(self, ident: Identity, ttl: int | None = None) -> tuple[str, int]:
        """A token for ``ident`` and its lifetime in seconds (``ttl``, e.g. a certificate's remaining life, or the
        default)."""
        ttl = self.ttl if ttl is None else ttl
        # iat to the microsecond: a password change voids the tokens issued before it, not those of the same second
        now = time.time()
        claims: dict[str, object] = {"sub": ident.uid, "login": ident.login, "lvl": ident.level.name,
                                     "grp": ident.usergroup, "iat": now, "exp": int(now) + ttl, "iss": "xwhep"}
        if ident.x509_serial is not None:
            claims["x5s"] = f"{ident.x509_serial:x}"  # hex: serials are up to 159 bits, too big for JSON numbers
        if ident.host is not None:
            claims["hst"] = ident.host
        return jwt.encode(claims, self.secret, algorithm=_ALG), ttl

    def check(self, token: str) -> Identity | None:
        hit = self._verified.get(token)
        if hit is not None:  # verified before and not expired: skip the signature check (hot paths)
            if time.time() < hit[1]:
                return hit[0]
            del self._verified[token]
        found = self._decode(token)
        if found is None:
            return None
        if len(self._verified) >= 250_000:  # bounded (every host has its own token): forget all, it is a cache
            self._verified.clear()
        self._verified[token] = found
        return found[0]

    def _decode(self, token: str) -> tuple[Identity, float] | None:
        try:
            claims = jwt.decode(token, self.secret, algorithms=[_ALG], issuer="xwhep",
                                options={"require": ["exp", "sub", "iat"]})
        except jwt.PyJWTError:
            return None
        serial = None
        if "x5s" in claims:
            try:
                serial = int(claims["x5s"], 16)
            except (TypeError, ValueError):
                return None
        host = claims.get("hst")
        if host is not None and not isinstance(host, str):
            return None
        ident = Identity(claims["sub"], claims.get("login", ""), UsageLevel[claims["lvl"]], claims.get("grp"), serial,
                         host=host, issued=float(claims.get("iat") or 0.0))
        return ident, float(claims["exp"])
