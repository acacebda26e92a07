"""Slowing brute force: failed logins counted per account and per address over a sliding window."""

from __future__ import annotations

import time
from collections import deque


class FailureLimiter:
    """After ``limit`` failures within ``window`` seconds, a key is refused until the oldest failure ages out."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float] | None:
        q = self._fails.get(key)
        if q is None:
            return None
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._fails[key]
            return None
        return q

    def retry_after(self, key: str, now: float | None = None) -> float | None:
        """Seconds to wait before ``key`` may try again, or None when it may try now."""
        now = time.monotonic() if now is None else now
        q = self._recent(key, now)
        if q is None or len(q) < self.limit:
            return None
        return max(0.001, q[0] + self.window - now)

    def fail(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if key not in self._fails and len(self._fails) >= self.max_keys:
            # bounded memory under a flood of distinct keys: forget the stalest entries
            for stale in list(self._fails)[: self.max_keys // 10]:
                del self._fails[stale]
        self._fails.setdefault(key, deque()).append(now)

    def reset(self, key: str) -> None:
        self._fails.pop(key, None)
