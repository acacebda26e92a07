"""The worker's state: every task's life on this worker, as a pure state machine.

:class:`WorkerState` takes events (a server reply, a job that ended, an alive acknowledgement, a failed call, the
clock) and returns the actions the I/O layer (:mod:`xwhep.worker.daemon`) must run; the I/O layer feeds their
outcomes back as events. Nothing here does I/O, starts threads or reads a clock: time comes in with each event
(``now``, monotonic seconds) and the back-off jitter from an injected :class:`random.Random`. After Dask's
``WorkerState.handle_stimulus``.

A task's life on a worker::

    RUNNING ──job ended──▶ REPORT ──"upload"──▶ UPLOAD ──uploaded──▶ DROP ──spool removed──▶ (gone)
       │ discarded           │ "done"/"stale"/ack    │ ack / data gone / result unreadable
       └────────────────────▶└──────────────────────▶└─────────────────▶ DROP

Exactly one owner per task's spool entry: an entry has at most one action in flight (:attr:`Entry.op`: the job,
a report, an upload or the removal), and nothing else is started on it until that action's outcome comes back.
An acknowledgement that arrives while an action is in flight is remembered (:attr:`Entry.drop_wanted`) and acted
on when the outcome arrives, so an entry is never removed under an upload. A failed report or upload is kept
with its reason, its attempt count and the time of its next try (exponential back-off with jitter); any
successful server reply wakes the entries that failed because of the server.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "AbandonedEntry", "Action", "ActivationChanged", "AliveFailed", "AliveReplied", "DropSpool", "Dropped",
    "Entry", "Event", "Failure", "JobFinished", "Log", "Op", "Phase", "Recovered", "Register", "RegisterFailed",
    "Registered", "SendAlive", "Spooled", "StartJob", "StopJob", "StopRequested", "Sync", "SyncFailed",
    "SyncReplied", "Tick", "Upload", "UploadDone", "UploadFailed", "WorkerState",
]

MAX_UPLOADS = 4  # result uploads in flight at once
MAX_REFUSED = 5  # a report or upload the server refused this many times is given up
ABANDONED_KEPT = 20  # entries given up on, kept for `xw worker status`


class Phase(StrEnum):
    """Where a task is in its life on this worker."""

    RUNNING = "running"  # the job runs (stage-in, execution, packing); its thread owns the spool entry
    REPORT = "report"  # finished: the report is to be sent (or being sent)
    UPLOAD = "upload"  # the server asked for the result's bytes
    DROP = "drop"  # nothing left to send: the spool entry is to be removed


class Op(StrEnum):
    """The one action in flight on an entry."""

    JOB = "job"
    REPORT = "report"
    UPLOAD = "upload"
    DROP = "drop"


class Failure(StrEnum):
    """Why a call failed, as far as what to do next is concerned."""

    SERVER = "server"  # unreachable, timeout, 5xx, refused for now: back off and try again
    HOST = "host"  # the server does not know this host (e.g. a new database): register again, then retry
    REFUSED = "refused"  # the server refused the call (4xx): retried alone, given up after MAX_REFUSED tries
    GONE = "gone"  # the upload's data no longer exists: report again to learn what the server wants
    LOCAL = "local"  # the result cannot be read here any more: give it up (the server will declare it LOST)


# -- events -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Event:
    """Something that happened; ``now`` is the monotonic time it was seen."""

    now: float


@dataclass(frozen=True)
class Registered(Event):
    """The server accepted the host (at start, or again after it forgot it)."""

    host: str
    alive_period: float


@dataclass(frozen=True)
class RegisterFailed(Event):
    reason: str


@dataclass(frozen=True)
class Spooled:
    """A finished task found in the spool at start (its report not delivered by a former run)."""

    task: str
    work: str | None
    report: dict[str, Any]
    result: str | None


@dataclass(frozen=True)
class Recovered(Event):
    entries: tuple[Spooled, ...]


@dataclass(frozen=True)
class SyncReplied(Event):
    """The reply to :class:`Sync` ``sync``: an outcome per report (by task) and the works handed out."""

    sync: int
    outcomes: dict[str, dict[str, Any]]
    works: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class SyncFailed(Event):
    sync: int
    host: str
    reason: str
    kind: Failure = Failure.SERVER


@dataclass(frozen=True)
class JobFinished(Event):
    """A job's thread ended: ``report`` is None when the job was discarded (nothing to report)."""

    task: str
    report: dict[str, Any] | None
    result: str | None = None


@dataclass(frozen=True)
class AliveReplied(Event):
    """The reply to :class:`SendAlive` ``alive``: per running task continue/stop, and for held results ``ack``
    (the server has it or no longer wants it), ``resend`` (task → data to upload to) and ``report`` (never got
    the report)."""

    alive: int
    orders: dict[str, str] = field(default_factory=dict)
    ack: tuple[str, ...] = ()
    resend: dict[str, str] = field(default_factory=dict)
    report: tuple[str, ...] = ()
    alive_period: float | None = None


@dataclass(frozen=True)
class AliveFailed(Event):
    alive: int
    host: str
    reason: str
    kind: Failure = Failure.SERVER


@dataclass(frozen=True)
class UploadDone(Event):
    task: str


@dataclass(frozen=True)
class UploadFailed(Event):
    task: str
    reason: str
    kind: Failure = Failure.SERVER


@dataclass(frozen=True)
class Dropped(Event):
    """The spool entry of ``task`` is gone."""

    task: str


@dataclass(frozen=True)
class ActivationChanged(Event):
    active: bool
    reason: str


@dataclass(frozen=True)
class StopRequested(Event):
    """A clean stop (SIGTERM): stop the jobs, send their reports, take no more work."""


@dataclass(frozen=True)
class Tick(Event):
    """Time passed (a deadline of :meth:`WorkerState.next_wakeup` came)."""


# -- actions ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Register:
    """Register the host again; ``forget``: drop the remembered host uid first (the server does not know it)."""

    forget: bool = True


@dataclass(frozen=True)
class StartJob:
    task: str
    assignment: dict[str, Any]


@dataclass(frozen=True)
class StopJob:
    """End a running job; ``discard``: the server no longer wants it, report nothing."""

    task: str
    reason: str
    discard: bool = False


@dataclass(frozen=True)
class Sync:
    """One ``POST /hosts/{host}/sync``: ``reports`` of finished tasks, up to ``max`` new works, waiting up to
    ``wait`` s for some (a long-poll only when nothing is reported)."""

    sync: int
    host: str
    reports: tuple[dict[str, Any], ...]
    max: int
    wait: float
    active: bool

    @property
    def tasks(self) -> list[str]:
        return [str(r["task"]) for r in self.reports]


@dataclass(frozen=True)
class SendAlive:
    alive: int
    host: str
    tasks: tuple[str, ...]
    results: tuple[str, ...]
    active: bool


@dataclass(frozen=True)
class Upload:
    task: str
    data: str
    path: str


@dataclass(frozen=True)
class DropSpool:
    task: str


@dataclass(frozen=True)
class Log:
    level: int
    text: str


Action = Register | StartJob | StopJob | Sync | SendAlive | Upload | DropSpool | Log


# -- the state ----------------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One task on this worker, from its assignment to the removal of its spool entry."""

    task: str
    work: str | None
    phase: Phase
    op: Op | None = None
    report: dict[str, Any] | None = None
    result: str | None = None  # the packed result's path (just a value here)
    data: str | None = None  # the server's data uid to upload the result to
    attempts: int = 0  # failed tries of the current step (report or upload)
    last_error: str | None = None
    error_kind: Failure | None = None
    next_try: float = 0.0
    drop_wanted: bool = False  # acknowledged while an action was in flight
    stop_sent: bool = False


@dataclass(frozen=True)
class AbandonedEntry:
    task: str
    work: str | None
    reason: str
    at: float


class WorkerState:
    """Every task's life on this worker, the host's registration, pulling and alive signals (see the module)."""

    def __init__(self, pool: int, long_poll: float = 20.0, alive_period: float = 30.0, retry_base: float = 0.5,
                 retry_max: float = 30.0, rng: random.Random | None = None) -> None:
        self.pool = pool
        self.long_poll = long_poll
        self.alive_period = alive_period
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.rng = rng or random.Random(0)
        self.entries: dict[str, Entry] = {}
        self.abandoned: list[AbandonedEntry] = []
        self.host: str | None = None
        self.registering = True  # the I/O layer registers before the first event
        self.register_failures = 0
        self.next_register = 0.0
        self.active = True
        self.inactive_reason = ""
        self.stopping = False
        self.pulling: int | None = None  # the sync that asks for work, if in flight
        self.pull_wait = 0.0
        self.pull_failures = 0
        self.next_pull = 0.0
        self.syncs: dict[int, list[str]] = {}  # sync in flight → the tasks it reports
        self.alive_inflight: int | None = None
        self.next_alive = 0.0
        self.alive_soon = False  # send the next alive as soon as the one in flight is answered
        self.stop_announced = False
        self.last_error: str | None = None  # the last failure of a call to the server, until one succeeds
        self._seq = 0
        self._now = 0.0
        self._out: list[Action] = []

    # -- queries (for the I/O layer and `xw worker status`) -----------------------------------------------------
    @property
    def running(self) -> list[str]:
        """Tasks whose job runs."""
        return [t for t, e in self.entries.items() if e.phase == Phase.RUNNING]

    @property
    def held(self) -> list[str]:
        """Finished tasks whose result or report the server may still want (listed in alive signals)."""
        return [t for t, e in self.entries.items() if e.phase in (Phase.REPORT, Phase.UPLOAD)]

    def in_flight(self, task: str) -> Op | None:
        e = self.entries.get(task)
        return e.op if e else None

    def deliveries(self) -> list[Entry]:
        """Finished tasks not delivered yet, failing ones included."""
        return [e for e in self.entries.values() if e.phase in (Phase.REPORT, Phase.UPLOAD)]

    def idle_reason(self) -> str:
        """Why the worker runs nothing (or no more), in a few words."""
        if self.stopping:
            return "stopping"
        if not self.active:
            return f"inactive: {self.inactive_reason}"
        if self.host is None:  # the failures' reasons say what went wrong (daemon.server_trouble)
            return self.last_error or "registering"
        if self.pull_failures and self.last_error:
            return self.last_error
        if len(self.running) >= self.pool:
            return "pool full"
        return "waiting for matching work"

    def settled(self) -> bool:
        """Stopping, and nothing more to do before the process may exit: no job runs, every report was
        answered, and no call that could hand out work or change a spool entry is in flight."""
        if not self.stopping or self.pulling is not None or self.alive_inflight is not None:
            return False
        # with no host (the server forgot it), reports cannot go: they stay spooled for the next start
        waiting = (Phase.RUNNING,) if self.host is None else (Phase.RUNNING, Phase.REPORT)
        return not any(e.phase in waiting or e.op in (Op.REPORT, Op.DROP) for e in self.entries.values())

    def next_wakeup(self) -> float | None:
        """The earliest time at which :class:`Tick` would make something happen (None: only events will)."""
        times: list[float] = []
        if self.host is None:  # nothing can be sent before the host is registered again
            if not self.registering and not self.stopping:
                times.append(self.next_register)
            return min(times) if times else None
        if self.alive_inflight is None and not self.stop_announced:
            times.append(self.next_alive)
        if self.pulling is None and self._may_pull() and self._free() > 0:
            times.append(self.next_pull)
        for e in self.entries.values():
            if e.op is None and (e.phase == Phase.REPORT or (e.phase == Phase.UPLOAD and not self.stopping)):
                times.append(e.next_try)
        return min(times) if times else None

    # -- the one entry point ----------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        """Apply ``event`` and return the actions to run, in order."""
        self._now = event.now
        self._out = []
        handler = getattr(self, "_on_" + type(event).__name__, None)
        if handler is not None:
            handler(event)
        self._pump()
        out, self._out = self._out, []
        return out

    # -- handlers -----------------------------------------------------------------------------------------------
    def _on_Registered(self, ev: Registered) -> None:
        self.host = ev.host
        self.alive_period = ev.alive_period or self.alive_period
        self.registering = False
        self.register_failures = 0
        # an alive at once when results are held (the server says which it still wants), else one period on
        self.next_alive = ev.now if self.held else ev.now + self.alive_period
        self._server_ok()

    def _on_RegisterFailed(self, ev: RegisterFailed) -> None:
        self.registering = False
        self.register_failures += 1
        self.next_register = ev.now + self._backoff(self.register_failures)
        self.last_error = ev.reason
        self._log(logging.WARNING, f"registration failed: {ev.reason}")

    def _on_Recovered(self, ev: Recovered) -> None:
        for s in ev.entries:
            if s.task not in self.entries:
                self.entries[s.task] = Entry(s.task, s.work, Phase.REPORT, report=dict(s.report), result=s.result,
                                             next_try=ev.now)

    def _on_SyncReplied(self, ev: SyncReplied) -> None:
        if self.pulling == ev.sync:
            self.pulling = None
        tasks = self.syncs.pop(ev.sync, [])
        self._server_ok()
        for task in tasks:
            e = self.entries.get(task)
            if e is None or e.op != Op.REPORT:
                continue
            e.op = None
            out = ev.outcomes.get(task)
            if out is None:
                self._failed(e, "the server's reply has no outcome for this report", Failure.SERVER)
            else:
                self._report_outcome(e, out)
        for a in ev.works:
            self._assigned(a)

    def _on_SyncFailed(self, ev: SyncFailed) -> None:
        if self.pulling == ev.sync:
            self.pulling = None
            self.pull_failures += 1
            self.next_pull = ev.now + self._backoff(self.pull_failures)
        self.last_error = ev.reason
        tasks = self.syncs.pop(ev.sync, [])
        for task in tasks:
            e = self.entries.get(task)
            if e is not None and e.op == Op.REPORT:
                e.op = None
                if e.drop_wanted:
                    e.phase = Phase.DROP
                elif ev.kind == Failure.REFUSED and len(tasks) == 1 and e.attempts + 1 >= MAX_REFUSED:
                    self._abandon(e, f"the server refused its report {MAX_REFUSED} times: {ev.reason}")
                else:
                    # refused in a batch: each goes alone from now on, so that one bad report blocks no other
                    self._failed(e, ev.reason, ev.kind)
        if ev.kind == Failure.HOST:
            self._host_lost(ev.host)

    def _on_JobFinished(self, ev: JobFinished) -> None:
        e = self.entries.get(ev.task)
        if e is None or e.op != Op.JOB:
            self._log(logging.ERROR, f"task {ev.task}: a job ended that this worker did not run")
            return
        e.op = None
        if ev.report is None:
            e.phase = Phase.DROP
            return
        e.phase, e.report, e.result, e.next_try = Phase.REPORT, dict(ev.report), ev.result, ev.now
        if e.drop_wanted:
            e.phase = Phase.DROP

    def _on_AliveReplied(self, ev: AliveReplied) -> None:
        if self.alive_inflight == ev.alive:
            self.alive_inflight = None
            if ev.alive_period:
                self.alive_period = ev.alive_period
            self.next_alive = ev.now if self.alive_soon else ev.now + self.alive_period
        self._server_ok()
        for task, order in ev.orders.items():
            e = self.entries.get(task)
            if order == "stop" and e is not None and e.phase == Phase.RUNNING and not e.stop_sent:
                e.stop_sent = True
                self._out.append(StopJob(task, "the server asked to stop", discard=True))
        for task in ev.ack:
            e = self.entries.get(task)
            if e is None or e.phase not in (Phase.REPORT, Phase.UPLOAD):
                continue
            if e.op is None:
                e.phase = Phase.DROP
            else:
                e.drop_wanted = True  # acted on when the action in flight comes back
        for task, data in ev.resend.items():
            e = self.entries.get(task)
            if e is not None and e.op is None and e.phase in (Phase.REPORT, Phase.UPLOAD) and e.result:
                if e.phase == Phase.REPORT or e.data != data:
                    e.attempts, e.last_error, e.error_kind = 0, None, None
                e.phase, e.data, e.next_try = Phase.UPLOAD, data, ev.now
        for task in ev.report:
            e = self.entries.get(task)
            if e is not None and e.op is None and e.phase == Phase.REPORT:
                e.next_try = ev.now

    def _on_AliveFailed(self, ev: AliveFailed) -> None:
        if self.alive_inflight == ev.alive:
            self.alive_inflight = None
            # no back-off: an alive every period is what keeps the tasks from being declared LOST, and the
            # first one to get through after a server restart wakes everything else
            self.next_alive = ev.now if self.alive_soon else ev.now + self.alive_period
        self.last_error = ev.reason
        if ev.kind == Failure.HOST:
            self._host_lost(ev.host)

    def _on_UploadDone(self, ev: UploadDone) -> None:
        e = self.entries.get(ev.task)
        if e is None or e.op != Op.UPLOAD:
            return
        e.op = None
        e.phase = Phase.DROP

    def _on_UploadFailed(self, ev: UploadFailed) -> None:
        e = self.entries.get(ev.task)
        if e is None or e.op != Op.UPLOAD:
            return
        e.op = None
        if e.drop_wanted:
            e.phase = Phase.DROP
        elif ev.kind == Failure.LOCAL:
            self._abandon(e, ev.reason)
        elif ev.kind == Failure.REFUSED and e.attempts + 1 >= MAX_REFUSED:
            self._abandon(e, f"the server refused the upload {MAX_REFUSED} times: {ev.reason}")
        elif ev.kind == Failure.GONE:
            e.phase, e.data = Phase.REPORT, None
            self._failed(e, ev.reason, ev.kind)
        else:
            self._failed(e, ev.reason, ev.kind)

    def _on_Dropped(self, ev: Dropped) -> None:
        e = self.entries.get(ev.task)
        if e is not None and e.op == Op.DROP:
            del self.entries[ev.task]

    def _on_ActivationChanged(self, ev: ActivationChanged) -> None:
        self.inactive_reason = "" if ev.active else ev.reason
        if ev.active == self.active:
            return
        self.active = ev.active
        self._log(logging.INFO, f"{'activated' if ev.active else 'deactivated'}: {ev.reason}")
        if not ev.active:
            self._stop_jobs(f"worker deactivated: {ev.reason}")
            self._alive_now()  # tell the server at once: a long-poll in flight must hand out nothing

    def _on_StopRequested(self, ev: StopRequested) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._stop_jobs("worker shutting down")
        self._alive_now()  # "inactive" ends the server's long-poll for this host at once

    # -- helpers ------------------------------------------------------------------------------------------------
    def _assigned(self, a: dict[str, Any]) -> None:
        task = str(a["task"])
        if task in self.entries:
            self._log(logging.ERROR, f"task {task} assigned twice: ignored")
            return
        work = str(a.get("work")) if a.get("work") else None
        if self.stopping or not self.active:
            # handed out while the stop or deactivation was on its way: given back at once, not charged
            why = "worker shutting down" if self.stopping else f"worker deactivated: {self.inactive_reason}"
            report = {"task": task, "status": "ABORTED", "reason": why, "charge": False}
            self.entries[task] = Entry(task, work, Phase.REPORT, report=report, next_try=self._now)
            return
        self.entries[task] = Entry(task, work, Phase.RUNNING, op=Op.JOB)
        self._out.append(StartJob(task, a))

    def _report_outcome(self, e: Entry, out: dict[str, Any]) -> None:
        outcome = out.get("outcome")
        if e.drop_wanted or outcome == "done":
            e.phase = Phase.DROP
        elif outcome == "stale":
            self._log(logging.INFO, f"task {e.task}: the server no longer wants it ({out.get('message')})")
            e.phase = Phase.DROP
        elif outcome == "upload" and out.get("result"):
            if e.result is None:
                self._abandon(e, "the server asks for a result this task does not have")
                return
            e.phase, e.data, e.next_try = Phase.UPLOAD, str(out["result"]), self._now
            e.attempts, e.last_error, e.error_kind = 0, None, None
        else:
            self._failed(e, f"unexpected report outcome {outcome!r}", Failure.SERVER)

    def _failed(self, e: Entry, reason: str, kind: Failure) -> None:
        e.attempts += 1
        e.last_error, e.error_kind = reason, kind
        e.next_try = self._now + self._backoff(e.attempts)
        what = "upload" if e.phase == Phase.UPLOAD else "report"
        self._log(logging.WARNING, f"task {e.task}: {what} failed (attempt {e.attempts}): {reason}; "
                                   f"next try in {e.next_try - self._now:.1f} s")

    def _abandon(self, e: Entry, reason: str) -> None:
        self._log(logging.ERROR, f"task {e.task}: result given up: {reason}")
        e.phase = Phase.DROP
        self.abandoned.append(AbandonedEntry(e.task, e.work, reason, self._now))
        del self.abandoned[:-ABANDONED_KEPT]

    def _stop_jobs(self, reason: str) -> None:
        for t, e in self.entries.items():
            if e.phase == Phase.RUNNING and not e.stop_sent:
                e.stop_sent = True
                self._out.append(StopJob(t, reason, discard=False))

    def _alive_now(self) -> None:
        if self.alive_inflight is None:
            self.next_alive = self._now
        else:
            self.alive_soon = True

    def _host_lost(self, host: str) -> None:
        if self.host is None or host != self.host:  # a call made for a former registration
            return
        self._log(logging.WARNING, f"the server does not know host {host} (new database?): registering again")
        self.host = None
        self.registering = False
        self.next_register = self._now

    def _server_ok(self) -> None:
        """A call succeeded: what failed because of the server may go again now."""
        self.last_error = None
        if self.pull_failures:
            self.pull_failures = 0
            self.next_pull = self._now
        for e in self.entries.values():
            if e.op is None and e.error_kind in (Failure.SERVER, Failure.HOST) and e.next_try > self._now:
                e.next_try = self._now

    def _backoff(self, n: int) -> float:
        cap = min(self.retry_max, self.retry_base * 2.0 ** min(n - 1, 30))
        return cap * self.rng.uniform(0.5, 1.0)

    def _free(self) -> int:
        return self.pool - len(self.running)

    def _may_pull(self) -> bool:
        return self.active and not self.stopping and self.host is not None

    def _next_id(self) -> int:
        self._seq += 1
        return self._seq

    def _log(self, level: int, text: str) -> None:
        self._out.append(Log(level, text))

    def _pump(self) -> None:
        """Start whatever is due now (called after every event)."""
        now = self._now
        out = self._out
        if self.host is None and not self.registering and not self.stopping and now >= self.next_register:
            self.registering = True
            out.append(Register(forget=True))
        for e in self.entries.values():
            if e.op is None and e.phase == Phase.DROP:
                e.op = Op.DROP
                out.append(DropSpool(e.task))
        if self.host is None:
            return
        host = self.host
        if not self.stopping:  # a stop sends reports, not result bytes: those stay spooled for the next start
            uploading = sum(1 for e in self.entries.values() if e.op == Op.UPLOAD)
            for e in self.entries.values():
                if uploading >= MAX_UPLOADS:
                    break
                if e.op is None and e.phase == Phase.UPLOAD and e.next_try <= now:
                    assert e.data is not None and e.result is not None
                    e.op = Op.UPLOAD
                    uploading += 1
                    out.append(Upload(e.task, e.data, e.result))
        ready = [e for e in self.entries.values() if e.op is None and e.phase == Phase.REPORT and e.next_try <= now]
        alone = [e for e in ready if e.error_kind == Failure.REFUSED]
        ready = [e for e in ready if e.error_kind != Failure.REFUSED]
        free = self._free()
        active = self.active and not self.stopping
        if self.pulling is None and self._may_pull() and now >= self.next_pull and (free > 0 or ready):
            # the hot path: reports and the request for more work in one call; a long-poll only when nothing
            # is reported, so a report is never held back
            self.pulling = sid = self._next_id()
            self.pull_wait = 0.0 if ready else self.long_poll
            out.append(self._sync(sid, host, ready, free, self.pull_wait, active))
        elif ready and (self.pulling is None or self.pull_wait > 0):
            # a long-poll is in flight, or pulling is off (inactive, stopping, backing off): report on its own;
            # with a quick sync in flight, its reply sends them with the next request instead
            out.append(self._sync(self._next_id(), host, ready, 0, 0.0, active))
        for e in alone:  # refused before: alone, so that the server's refusal names this one report
            out.append(self._sync(self._next_id(), host, [e], 0, 0.0, active))
        if self.alive_inflight is None and now >= self.next_alive and not self.stop_announced:
            self.alive_inflight = aid = self._next_id()
            self.alive_soon = False
            self.stop_announced = self.stopping
            out.append(SendAlive(aid, host, tuple(self.running), tuple(self.held), active))
            self.next_alive = float("inf")  # set again by the reply

    def _sync(self, sid: int, host: str, ready: list[Entry], k: int, wait: float, active: bool) -> Sync:
        for e in ready:
            e.op = Op.REPORT
        self.syncs[sid] = [e.task for e in ready]
        return Sync(sid, host, tuple(e.report or {"task": e.task} for e in ready), k, wait, active)
