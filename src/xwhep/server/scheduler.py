"""The scheduler's in-memory index of PENDING works, grouped into match classes.

The database stays the truth: claiming is a compare-and-set (``UPDATE … WHERE status='PENDING'``), so a work
is never handed to two hosts even with several server processes. The index only makes matching cheap: works of
one bag share one :class:`~xwhep.core.matching.WorkProfile` (a class), matched once per host, and the pick is
fair across owners (fewest running first), then by rank, then FIFO.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from xwhep.core.expressions import rank_of
from xwhep.core.matching import HostProfile, WorkProfile, matches


@dataclass
class MatchClass:
    cid: int
    profile: WorkProfile
    rank: str | None
    heap: list[tuple[int, str]] = field(default_factory=list)  # (submission id, work uid)


@dataclass
class Entry:
    cid: int
    seq: int
    replica_set: str | None


class Scheduler:
    """Pending works by class; all methods run on the event loop thread (no locks needed)."""

    def __init__(self) -> None:
        self._classes: dict[tuple[Any, ...], MatchClass] = {}
        self._by_cid: dict[int, MatchClass] = {}
        self._entries: dict[str, Entry] = {}
        self._match_cache: dict[tuple[int, str, int], tuple[bool, float]] = {}
        self.running: Counter[str] = Counter()  # owner → works running now
        self.replica_hosts: defaultdict[str, set[str]] = defaultdict(set)
        self._event = asyncio.Event()
        self._next_cid = 0
        self.closing = False

    # -- index maintenance ----------------------------------------------------------------------------------
    def add(self, uid: str, seq: int, profile: WorkProfile, rank: str | None, replica_set: str | None) -> None:
        """A work became PENDING."""
        self.add_many(profile, rank, [(uid, seq, replica_set)])

    def add_many(self, profile: WorkProfile, rank: str | None, works: list[tuple[str, int, str | None]]) -> None:
        """Works of one profile and rank became PENDING: (uid, submission id, replica set) each. The class is
        looked up once (a bag of 10,000 arrives this way)."""
        key = (*profile.key(), rank)
        cls = self._classes.get(key)
        if cls is None:
            self._next_cid += 1
            cls = MatchClass(self._next_cid, profile, rank)
            self._classes[key] = cls
            self._by_cid[cls.cid] = cls
        entries, heap, cid = self._entries, cls.heap, cls.cid
        for uid, seq, replica_set in works:
            if uid not in entries:
                heapq.heappush(heap, (seq, uid))
                entries[uid] = Entry(cid, seq, replica_set)

    def discard(self, uid: str) -> None:
        """A work left PENDING some other way (deleted, cancelled): forget it lazily."""
        self._entries.pop(uid, None)

    def close(self) -> None:
        """The server is shutting down: long-polls return at once from now on."""
        self.closing = True
        self.notify()

    def notify(self) -> None:
        """Wake every long-polling request."""
        ev, self._event = self._event, asyncio.Event()
        ev.set()

    async def wait(self, timeout: float) -> None:
        """Wait until new works arrive or ``timeout`` passes."""
        if self.closing:
            return
        ev = self._event
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, uid: str) -> bool:
        return uid in self._entries

    def forget_host(self, host_uid: str) -> None:
        """The host re-registered: its cached match results no longer hold."""
        for key in [k for k in self._match_cache if k[1] == host_uid]:
            del self._match_cache[key]

    # -- picking --------------------------------------------------------------------------------------------
    def _fit(self, cls: MatchClass, host: HostProfile, version: int) -> tuple[bool, float]:
        key = (cls.cid, host.uid, version)
        hit = self._match_cache.get(key)
        if hit is None:
            ok = matches(cls.profile, host)
            hit = (ok, rank_of(cls.rank, host.as_cel()) if ok and cls.rank else 0.0)
            if len(self._match_cache) > 200_000:
                self._match_cache.clear()
            self._match_cache[key] = hit
        return hit

    def _head(self, cls: MatchClass) -> int | None:
        heap = cls.heap
        while heap:
            seq, uid = heap[0]
            entry = self._entries.get(uid)
            if entry is not None and entry.cid == cls.cid and entry.seq == seq:
                return seq
            heapq.heappop(heap)  # stale: claimed, deleted or re-added elsewhere
        return None

    def pick(self, host: HostProfile, k: int, version: int = 0,
             hold: dict[str, tuple[MatchClass, int, str | None]] | None = None) -> list[str]:
        """Take up to ``k`` works for ``host`` out of the index (the caller claims them in the database).

        With ``hold``, what :meth:`put_back` needs is recorded there: a claim that fails (bad input in the same
        call, a rolled-back transaction) returns its works to the index without a rebuild from the database."""
        owners: defaultdict[str, list[tuple[float, MatchClass]]] = defaultdict(list)
        for cls in list(self._by_cid.values()):
            if self._head(cls) is None:
                self._drop(cls)
                continue
            ok, rank = self._fit(cls, host, version)
            if ok:
                owners[cls.profile.owner].append((rank, cls))
        taken: list[str] = []
        skipped: list[tuple[MatchClass, tuple[int, str]]] = []
        extra: Counter[str] = Counter()
        sets_taken: set[str] = set()
        while len(taken) < k and owners:
            # one owner and one class is the common case (a bag): no comparisons to make
            owner = next(iter(owners)) if len(owners) == 1 else min(
                owners, key=lambda o: (self.running[o] + extra[o], min(self._head(c) or 0 for _, c in owners[o])))
            candidates = owners[owner]
            rank, cls = candidates[0] if len(candidates) == 1 else min(
                candidates, key=lambda rc: (-rc[0], self._head(rc[1]) or 0))
            seq = self._head(cls)
            if seq is None:
                candidates.remove((rank, cls))
                if not candidates:
                    del owners[owner]
                continue
            item = heapq.heappop(cls.heap)
            entry = self._entries[item[1]]
            rset = entry.replica_set
            if rset and (rset in sets_taken or host.uid in self.replica_hosts.get(rset, ())):
                skipped.append((cls, item))  # replicas of one work go to distinct hosts
                continue
            if rset:
                sets_taken.add(rset)
            del self._entries[item[1]]
            taken.append(item[1])
            if hold is not None:
                hold[item[1]] = (cls, item[0], rset)
            extra[owner] += 1
        for cls, item in skipped:
            heapq.heappush(cls.heap, item)
        return taken

    def put_back(self, hold: dict[str, tuple[MatchClass, int, str | None]]) -> None:
        """Return picked works whose claim did not happen. Harmless if one was claimed after all: claiming is a
        compare-and-set, so a work already RUNNING in the database is simply not claimed twice."""
        for uid, (cls, seq, rset) in hold.items():
            self.add(uid, seq, cls.profile, cls.rank, rset)
        if hold:
            self.notify()

    def _drop(self, cls: MatchClass) -> None:
        self._by_cid.pop(cls.cid, None)
        for key, value in list(self._classes.items()):
            if value is cls:
                del self._classes[key]
                break

    def stats(self) -> dict[str, int]:
        return {"pending": len(self._entries), "classes": len(self._by_cid),
                "running": sum(self.running.values())}
