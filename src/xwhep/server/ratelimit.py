"""Slowing brute force without handing strangers a lockout: an exponential delay per key.

Logins count failures per (account, address) and, with a higher threshold, per address across accounts
(docs/decisions.md, "Login throttling"). Nothing is counted per account alone: failures from one address never
keep the account's owner out when they log in from another.
"""

from __future__ import annotations

import time


class Backoff:
    """Failures per key; the ``free``-th and each one after make the key wait, longer each time: ``base``·2^k
    seconds after the (``free`` + k)-th, at most ``cap``, counted from that failure. A key is forgotten ``forget``
    seconds after its last failure, or at once by :meth:`reset`."""

    def __init__(self, free: int, cap: float = 60.0, base: float = 1.0, forget: float = 900.0,
                 max_keys: int = 100_000) -> None:
        self.free = free
        self.cap = cap
        self.base = base
        self.forget = forget
        self.max_keys = max_keys
        self._keys: dict[str, tuple[int, float, float]] = {}  # key → (failures, last failure, wait until)

    def _live(self, key: str, now: float) -> tuple[int, float, float] | None:
        entry = self._keys.get(key)
        if entry is not None and now - entry[1] > self.forget:
            del self._keys[key]
            return None
        return entry

    def retry_after(self, key: str, now: float | None = None) -> float | None:
        """Seconds ``key`` must still wait, or None when it may try now."""
        now = time.monotonic() if now is None else now
        entry = self._live(key, now)
        if entry is None or entry[2] <= now:
            return None
        return entry[2] - now

    def fail(self, key: str, now: float | None = None) -> float:
        """Count a failure of ``key``; returns the wait it imposes (0 while failures are free)."""
        now = time.monotonic() if now is None else now
        entry = self._live(key, now)
        n = (entry[0] if entry else 0) + 1
        delay = 0.0 if n < self.free else min(self.cap, self.base * 2.0 ** min(n - self.free, 64))
        self._keys.pop(key, None)  # re-inserted last: the dict's order is the order of last failures
        if len(self._keys) >= self.max_keys:  # bounded memory under a flood of keys: forget the stalest tenth
            for stale in list(self._keys)[: max(1, self.max_keys // 10)]:
                del self._keys[stale]
        self._keys[key] = (n, now, now + delay)
        return delay

    def reset(self, key: str) -> None:
        self._keys.pop(key, None)
