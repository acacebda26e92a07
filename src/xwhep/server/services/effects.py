"""What a committed transaction changes outside the database: the scheduler index, counters, blobs.

Transactions collect effects; the async caller applies them only after the commit succeeded, so memory
never runs ahead of the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xwhep.core.matching import WorkProfile
from xwhep.server.state import ServerState


class Deltas(dict[str, int]):
    """Changes of a count per key, 0 when absent (a Counter without its construction cost: an Effects is made for
    every call of the hot path)."""

    def __missing__(self, key: str) -> int:
        return 0

    def add(self, other: dict[str, int]) -> None:
        for key, delta in other.items():
            self[key] += delta


@dataclass
class Effects:
    pending: list[tuple[str, int, WorkProfile, str | None, str | None]] = field(default_factory=list)
    discard: list[str] = field(default_factory=list)
    running: Deltas = field(default_factory=Deltas)  # owner → change in running works
    tasks_started: dict[str, tuple[str, str]] = field(default_factory=dict)  # task → (work, host)
    tasks_ended: list[str] = field(default_factory=list)
    replica_hosts: list[tuple[str, str]] = field(default_factory=list)  # (replica set, host)
    blobs: list[str] = field(default_factory=list)  # sha256 of blobs to free

    def merge(self, other: Effects) -> Effects:
        """Add ``other``'s effects to these (one transaction doing several things)."""
        self.pending += other.pending
        self.discard += other.discard
        self.running.add(other.running)
        self.tasks_started.update(other.tasks_started)
        self.tasks_ended += other.tasks_ended
        self.replica_hosts += other.replica_hosts
        self.blobs += other.blobs
        return self

    def apply(self, st: ServerState) -> None:
        sched = st.scheduler
        for uid in self.discard:
            sched.discard(uid)
        run: list[tuple[str, int, str | None]] = []
        for i, (uid, seq, profile, rank, rset) in enumerate(self.pending):  # runs of one profile: one class lookup
            run.append((uid, seq, rset))
            nxt = self.pending[i + 1] if i + 1 < len(self.pending) else None
            if nxt is None or nxt[2] is not profile or nxt[3] != rank:
                sched.add_many(profile, rank, run)
                run = []
        for owner, delta in self.running.items():
            sched.running[owner] += delta
            if sched.running[owner] <= 0:
                del sched.running[owner]
        for rset, host in self.replica_hosts:
            sched.replica_hosts[rset].add(host)
        live = st.liveness
        if self.tasks_started:
            live.active_tasks.update(self.tasks_started)
            st.metrics.dispatched.inc(len(self.tasks_started))
        if self.tasks_ended:
            st.metrics.tasks_ended.inc(len(self.tasks_ended))
        for task in self.tasks_ended:
            live.active_tasks.pop(task, None)
            live.tasks.pop(task, None)
        for sha in self.blobs:
            st.store.delete(sha)
        if self.pending:
            sched.notify()
        if self.pending or self.discard or self.running or self.tasks_ended:
            st.work_changes.notify()
