"""Each host its own identity: a key issued at registration, and host tokens bound to one host uid.

Volunteers all log in with the same worker credential (worker.conf); that credential may only *register* a host.
Registration answers with the host's own key (shown once; the server keeps its sha256) and a token bound to that
host. Everything a host does afterwards — sync, alive, reports, its tasks' data, result uploads, its tunnels — needs
a token bound to that very host, and the server accepts a task's data, alives, reports and uploads only from the
host the task was given to. A host renews its token with its key (``POST /auth/host``); deleting the host (or its
owner) revokes it at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from xwhep.core.model import UsageLevel
from xwhep.server.auth import Identity
from xwhep.server.db import schema as s
from xwhep.server.services import common as c

# what a host token may call: its host's protocol and tunnels (stream tickets, relay joins), its tasks' data, itself
_HOST_SCOPE = re.compile(r"/api/v1/(?:hosts/[^/]+(?:/.*)?|datas/[^/]+/content|relay/[^/]+|me|version|health)")


def new_key() -> str:
    """A fresh host key: 256 random bits."""
    return secrets.token_urlsafe(32)


def digest(key: str) -> str:
    """What the server stores of a key (the key has full entropy: a plain hash is enough, no slow KDF needed)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_matches(stored: str | None, key: object) -> bool:
    """Constant-time check of ``key`` against a stored digest."""
    if not stored or not isinstance(key, str) or not key or len(key) > 256:
        return False
    return hmac.compare_digest(stored, digest(key))


def in_scope(path: str) -> bool:
    """May a host token call ``path``?"""
    return _HOST_SCOPE.fullmatch(path) is not None


def host_identity(conn: Connection, host_uid: str, key: object) -> Identity | None:
    """The identity a host proves with its key (its owner's, bound to the host); None for an unknown host, a wrong
    key, or a host whose owner no longer exists (one answer for all: no oracle)."""
    row = conn.execute(sa.select(s.hosts.c.owner, s.hosts.c.key_hash).where(s.hosts.c.uid == host_uid)).first()
    if row is None or not key_matches(row[1], key):
        return None
    user = conn.execute(sa.select(s.users.c.login, s.users.c.level, s.users.c.usergroup)
                        .where(s.users.c.uid == row[0])).first()
    if user is None:
        return None
    c.event(conn, row[0], "auth.host", host_uid)
    return Identity(row[0], user[0], UsageLevel[user[1]], user[2], host=host_uid, issued=c.now())


def bound(ident: Identity, host_uid: str) -> Identity:
    """``ident`` (who registered the host) as a host identity of ``host_uid``."""
    return Identity(ident.uid, ident.login, ident.level, ident.usergroup, ident.x509_serial, host=host_uid,
                    issued=c.now())
