"""Durable revocation: does an identity established earlier (a token, a stream ticket) still count?

The database is the truth: a deleted user has no row, and ``users.tokens_after`` voids every token issued before
it (a password change, an administrator's reset, ``xw user revoke``). Both survive a restart. This module keeps
what the database said per user, so that the hot paths check a dict; a change made here forgets the entry (the
next check reads the row again), and changes made by other server processes sharing a PostgreSQL database arrive
through their events (:data:`ACTIONS`), read by the housekeeping loop.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from xwhep.server.auth import Identity
from xwhep.server.db import schema as s

# the events after which a process must read a user (or host) again
ACTIONS = ("user.delete", "user.password", "user.revoke", "host.delete")

_DELETED = -1.0  # cached for a user without a row


def user_epoch(conn: Any, uid: str) -> float:
    """``tokens_after`` of user ``uid`` (0 when never set), or ``_DELETED`` when there is no such user."""
    row = conn.execute(sa.select(s.users.c.tokens_after).where(s.users.c.uid == uid)).first()
    if row is None:
        return _DELETED
    return float(row[0] or 0.0)


def changed_since(conn: Any, since: float) -> list[str]:
    """Users and hosts deleted or revoked by any server process since ``since``."""
    return [u for (u,) in conn.execute(sa.select(s.events.c.object).where(
        s.events.c.action.in_(ACTIONS), s.events.c.time >= since)) if u]


class Revocations:
    """What the database said of each user recently seen (bounded by the number of users)."""

    def __init__(self) -> None:
        self._epochs: dict[str, float] = {}

    def cached(self, uid: str) -> float | None:
        """The cached epoch of ``uid``, or None when it must be read."""
        return self._epochs.get(uid)

    def remember(self, uid: str, epoch: float) -> None:
        if len(self._epochs) >= 1_000_000:  # a cache: forgetting costs one read per user
            self._epochs.clear()
        self._epochs[uid] = epoch

    def forget(self, *uids: str) -> None:
        """These changed (here or in another process): read them again at their next use."""
        for uid in uids:
            self._epochs.pop(uid, None)

    @staticmethod
    def verdict(ident: Identity, epoch: float) -> str | None:
        """Why ``ident`` no longer counts given its user's epoch; None when it still does."""
        if epoch == _DELETED:
            return "this identity was revoked: the user no longer exists"
        if ident.issued < epoch:
            return "this token was revoked (password changed or sessions ended): log in again"
        return None
