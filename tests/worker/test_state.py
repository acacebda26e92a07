"""The worker's state machine (pure): scenarios, then random event sequences checked against its rules.

The rules (issue 13 §1): one owner per spool entry — no two actions in flight on one task, an entry never dropped
while an action on it is in flight (an upload above all); every finished result is eventually delivered or
acknowledged once the server answers; a failure is retried with back-off, never the end of anything.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xwhep.worker.state import (
    MAX_REFUSED,
    Action,
    ActivationChanged,
    AliveFailed,
    AliveReplied,
    Dropped,
    DropSpool,
    Event,
    Failure,
    JobFinished,
    Log,
    Op,
    Phase,
    Recovered,
    Register,
    Registered,
    RegisterFailed,
    SendAlive,
    Spooled,
    StartJob,
    StopJob,
    StopRequested,
    Sync,
    SyncFailed,
    SyncReplied,
    Tick,
    Upload,
    UploadDone,
    UploadFailed,
    WorkerState,
)

SHA = "ab" * 32


def work(task: str) -> dict[str, Any]:
    return {"task": task, "work": f"w-{task}", "app": {"name": "a"}}


def done_report(task: str, result: bool = True) -> dict[str, Any]:
    rep: dict[str, Any] = {"task": task, "status": "COMPLETED", "return_code": 0}
    if result:
        rep["result"] = {"sha256": SHA, "size": 3, "name": "r", "type": "bin"}
    return rep


def only(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


class Driver:
    """A WorkerState fed by hand, with a clock."""

    def __init__(self, pool: int = 2, **kw: Any) -> None:
        self.s = WorkerState(pool, long_poll=20.0, alive_period=10.0, retry_base=0.5, retry_max=8.0,
                             rng=random.Random(7), **kw)
        self.now = 0.0

    def __call__(self, ev_type: type, *args: Any, **kw: Any) -> list[Action]:
        return self.s.handle(ev_type(*args, now=self.now, **kw))

    def at(self, t: float) -> Driver:
        self.now = t
        return self

    def start(self, host: str = "h1") -> list[Action]:
        return self(Registered, host, 10.0)

    def pull(self, acts: list[Action]) -> Sync:
        [sync] = [a for a in only(acts, Sync) if a.max > 0 or a.wait > 0]
        return sync

    def running(self, *tasks: str) -> Sync:
        """Start and hand out ``tasks``; return the next pulling sync."""
        acts = self.start()
        sync = self.pull(acts)
        acts = self(SyncReplied, sync.sync, {}, tuple(work(t) for t in tasks))
        assert [a.task for a in only(acts, StartJob)] == list(tasks)
        return self.pull(acts) if self.s._free() else None  # type: ignore[return-value]


# -- scenarios ------------------------------------------------------------------------------------------------------

def test_first_pull_is_a_long_poll_for_the_free_slots() -> None:
    d = Driver(pool=3)
    sync = d.pull(d.start())
    assert (sync.max, sync.wait, sync.reports, sync.active) == (3, 20.0, (), True)


def test_report_rides_on_the_sync_that_asks_for_more_work() -> None:
    d = Driver(pool=1)
    assert d.running("t1") is None  # pool full: nothing asked
    acts = d(JobFinished, "t1", done_report("t1", result=False))
    [sync] = only(acts, Sync)
    assert sync.tasks == ["t1"] and sync.max == 1 and sync.wait == 0.0  # a report is never held by a long-poll
    acts = d(SyncReplied, sync.sync, {"t1": {"outcome": "done"}}, (work("t2"),))
    assert only(acts, DropSpool) == [DropSpool("t1")]
    assert only(acts, StartJob) == [StartJob("t2", work("t2"))]


def test_report_during_a_long_poll_goes_at_once_on_its_own() -> None:
    d = Driver(pool=2)
    poll = d.running("t1")
    assert poll.wait == 20.0
    acts = d(JobFinished, "t1", done_report("t1"))
    [rep] = only(acts, Sync)
    assert rep.tasks == ["t1"] and rep.max == 0 and rep.wait == 0.0


def test_reports_wait_for_a_quick_sync_in_flight_and_go_with_the_next_request() -> None:
    d = Driver(pool=2)
    d.running("t1", "t2")
    acts = d(JobFinished, "t1", done_report("t1", result=False))
    quick = d.pull(acts)
    assert quick.wait == 0.0
    assert only(d(JobFinished, "t2", done_report("t2", result=False)), Sync) == []  # held: the reply is near
    acts = d(SyncReplied, quick.sync, {"t1": {"outcome": "done"}}, ())
    nxt = d.pull(acts)
    assert nxt.tasks == ["t2"] and nxt.max == 2


def test_ack_during_an_upload_waits_for_the_upload_to_end() -> None:
    # the race: the alive loop dropped the entry under the upload; here the drop waits for its outcome
    d = Driver(pool=1)
    d.running("t1")
    sync = only(d(JobFinished, "t1", done_report("t1"), "/spool/t1/result"), Sync)[0]
    acts = d(SyncReplied, sync.sync, {"t1": {"outcome": "upload", "result": "d1"}}, ())
    assert only(acts, Upload) == [Upload("t1", "d1", "/spool/t1/result")]
    alive = only(d.at(10)(Tick), SendAlive)[0]
    assert alive.results == ("t1",)
    acts = d(AliveReplied, alive.alive, ack=("t1",))
    assert only(acts, DropSpool) == [] and d.s.entries["t1"].drop_wanted
    acts = d(AliveReplied, alive.alive, resend={"t1": "d1"})  # a resend meanwhile starts no second upload
    assert only(acts, Upload) == []
    acts = d(UploadFailed, "t1", "connection reset")
    assert only(acts, DropSpool) == [DropSpool("t1")]
    assert only(d(Dropped, "t1"), Action) == [] and d.s.entries == {}


def test_failed_upload_is_retried_with_growing_jittered_back_off() -> None:
    d = Driver(pool=1)
    d.running("t1")
    sync = only(d(JobFinished, "t1", done_report("t1"), "/r"), Sync)[0]
    d(SyncReplied, sync.sync, {"t1": {"outcome": "upload", "result": "d1"}}, ())
    delays = []
    for _ in range(6):
        d(UploadFailed, "t1", "HTTP 503")
        e = d.s.entries["t1"]
        delays.append(e.next_try - d.now)
        assert only(d.at(e.next_try - 0.01)(Tick), Upload) == []  # not before its time
        assert only(d.at(e.next_try)(Tick), Upload) == [Upload("t1", "d1", "/r")]
    assert d.s.entries["t1"].attempts == 6 and d.s.entries["t1"].last_error == "HTTP 503"
    caps = [min(8.0, 0.5 * 2 ** n) for n in range(6)]
    assert all(c / 2 <= x <= c for x, c in zip(delays, caps, strict=True)), delays
    assert len(set(delays)) == 6  # jittered


def test_unreadable_result_is_given_up_not_retried_forever() -> None:
    d = Driver(pool=1)
    d.running("t1")
    sync = only(d(JobFinished, "t1", done_report("t1"), "/r"), Sync)[0]
    d(SyncReplied, sync.sync, {"t1": {"outcome": "upload", "result": "d1"}}, ())
    acts = d(UploadFailed, "t1", "result file unreadable: No such file", Failure.LOCAL)
    assert only(acts, DropSpool) == [DropSpool("t1")]
    assert [a.task for a in d.s.abandoned] == ["t1"] and "No such file" in d.s.abandoned[0].reason
    d(Dropped, "t1")
    alive = only(d.at(10)(Tick), SendAlive)[0]
    assert alive.results == ()  # no longer listed: the server's reaper declares the task LOST and reruns it


def test_upload_to_data_the_server_no_longer_has_reports_again() -> None:
    d = Driver(pool=1)
    d.running("t1")
    sync = only(d(JobFinished, "t1", done_report("t1"), "/r"), Sync)[0]
    d(SyncReplied, sync.sync, {"t1": {"outcome": "upload", "result": "d1"}}, ())
    d(UploadFailed, "t1", "no data d1 (HTTP 404)", Failure.GONE)
    e = d.s.entries["t1"]
    assert (e.phase, e.data, e.attempts) == (Phase.REPORT, None, 1)
    again = only(d.at(e.next_try)(Tick), Sync)
    assert [s.tasks for s in again] == [["t1"]]
    acts = d(SyncReplied, again[0].sync, {"t1": {"outcome": "stale"}}, ())
    assert only(acts, DropSpool) == [DropSpool("t1")]


def test_server_that_forgot_the_host_gets_a_new_registration() -> None:
    d = Driver(pool=1)
    poll = d.running("t1") or d.pull(d(JobFinished, "t1", done_report("t1", result=False)))
    acts = d(SyncFailed, poll.sync, "h1", "no host h1 (HTTP 404)", Failure.HOST)
    assert only(acts, Register) == [Register(forget=True)]
    assert d.s.host is None and only(d(Tick), Sync) == []  # nothing is sent for an unknown host
    acts = d(SyncFailed, 999, "h1", "late 404 of a call made before", Failure.HOST)
    assert only(acts, Register) == []  # one registration at a time
    acts = d(Registered, "h2", 10.0)
    [sync] = only(acts, Sync)
    assert sync.host == "h2" and sync.tasks == ["t1"]  # the failed report goes again at once


def test_failed_registration_backs_off() -> None:
    d = Driver()
    d.start()
    d(AliveFailed, 0, "h1", "HTTP 404", Failure.HOST)
    [reg] = only(d(Tick), Register) or [None]
    assert reg is None or reg == Register(True)
    d(RegisterFailed, "cannot reach server")
    wake = d.s.next_wakeup()
    assert wake is not None and wake > d.now
    assert only(d.at(wake)(Tick), Register) == [Register(True)]


def test_alive_reply_after_an_outage_wakes_everything_backed_off() -> None:
    d = Driver(pool=1)
    d.running("t1")
    sync = only(d(JobFinished, "t1", done_report("t1", result=False)), Sync)[0]
    down = "server unreachable: cannot reach server"  # as the daemon words a call that got no answer
    for _ in range(5):  # the server is down: the report backs off
        d(SyncFailed, sync.sync, "h1", down, Failure.SERVER)
        sync = only(d.at(d.s.entries["t1"].next_try)(Tick), Sync)[0]
    d(SyncFailed, sync.sync, "h1", down, Failure.SERVER)
    assert d.s.entries["t1"].next_try > d.now + 1
    assert d.s.idle_reason().startswith("server unreachable")
    alive = only(d.at(d.s.next_alive)(Tick), SendAlive)
    if not alive:  # the report's retry came first
        return
    acts = d(AliveReplied, alive[0].alive, report=("t1",))
    assert [s.tasks for s in only(acts, Sync)] == [["t1"]]  # the server is back: at once, not after the back-off


def test_alive_failures_never_back_off_beyond_the_period() -> None:
    d = Driver()
    d.start()
    for _ in range(10):
        [alive] = only(d.at(d.s.next_alive)(Tick), SendAlive)
        d(AliveFailed, alive.alive, "h1", "cannot reach server")
        assert d.s.next_alive == d.now + 10.0


def test_stop_order_discards_the_job() -> None:
    d = Driver(pool=1)
    d.running("t1")
    alive = only(d.at(10)(Tick), SendAlive)[0]
    assert alive.tasks == ("t1",)
    acts = d(AliveReplied, alive.alive, orders={"t1": "stop"})
    assert only(acts, StopJob) == [StopJob("t1", "the server asked to stop", discard=True)]
    acts = d(JobFinished, "t1", None)
    assert only(acts, DropSpool) == [DropSpool("t1")] and only(acts, Sync)[0].tasks == []


def test_deactivation_stops_jobs_tells_the_server_and_reports_uncharged() -> None:
    d = Driver(pool=2)
    d.running("t1")
    acts = d(ActivationChanged, False, "paused by /p")
    assert only(acts, StopJob) == [StopJob("t1", "worker deactivated: paused by /p")]
    [alive] = only(acts, SendAlive)
    assert alive.active is False and alive.tasks == ("t1",)
    report = {"task": "t1", "status": "ABORTED", "reason": "worker deactivated: paused by /p", "charge": False}
    [sync] = only(d(JobFinished, "t1", report), Sync)
    assert sync.reports == (report,) and (sync.max, sync.wait, sync.active) == (0, 0.0, False)
    assert d.s.idle_reason() == "inactive: paused by /p"


def test_works_handed_out_while_deactivating_are_given_back_uncharged() -> None:
    d = Driver(pool=2)
    poll = d.pull(d.start())
    d(ActivationChanged, False, "outside time windows")
    acts = d(SyncReplied, poll.sync, {}, (work("t9"),))
    assert only(acts, StartJob) == []
    [sync] = only(acts, Sync)
    assert sync.reports[0]["status"] == "ABORTED" and sync.reports[0]["charge"] is False


def test_sigterm_stops_jobs_sends_their_reports_keeps_uploads_and_settles() -> None:
    d = Driver(pool=3)
    poll = d.running("t1", "t2")
    sync = only(d(JobFinished, "t2", done_report("t2"), "/r2"), Sync)[0]
    d(SyncReplied, sync.sync, {"t2": {"outcome": "upload", "result": "d2"}}, ())
    d(UploadFailed, "t2", "HTTP 502")  # t2's upload waits for its retry
    acts = d(StopRequested)
    assert only(acts, StopJob) == [StopJob("t1", "worker shutting down")]
    [alive] = only(acts, SendAlive)
    assert alive.active is False
    assert not d.s.settled()
    aborted = {"task": "t1", "status": "ABORTED", "reason": "worker shutting down", "charge": False}
    [rep] = only(d(JobFinished, "t1", aborted), Sync)
    assert rep.reports == (aborted,) and rep.max == 0
    d(AliveReplied, alive.alive)
    d(SyncReplied, rep.sync, {"t1": {"outcome": "done"}}, ())
    d(Dropped, "t1")
    assert not d.s.settled()  # the long-poll in flight could still hand out a work
    d(SyncReplied, poll.sync, {}, ())  # the server ends it at once for a host that said "inactive"
    # the upload is not retried during a stop: it stays spooled for the next start
    assert only(d.at(100)(Tick), Upload) == [] and d.s.settled()
    assert list(d.s.entries) == ["t2"]


def test_stop_with_the_server_down_is_not_settled() -> None:
    d = Driver(pool=1)
    d.running("t1")
    d(StopRequested)
    aborted = {"task": "t1", "status": "ABORTED", "reason": "worker shutting down", "charge": False}
    [rep] = only(d(JobFinished, "t1", aborted), Sync)
    d(SyncFailed, rep.sync, "h1", "cannot reach server")
    assert not d.s.settled()  # the I/O layer's deadline ends the wait; the report stays spooled


def test_refused_report_goes_alone_then_is_given_up() -> None:
    d = Driver(pool=2)
    d.running("t1", "t2")
    d(JobFinished, "t1", done_report("t1", result=False))
    quick = [s for s in d.s.syncs]
    assert quick
    d(JobFinished, "t2", done_report("t2", result=False))
    acts = d(SyncFailed, quick[-1], "h1", "status: bad (HTTP 400)", Failure.REFUSED)
    # the batch failed as a whole; from now on the refused report goes alone and blocks no other
    syncs = only(acts, Sync) + only(d.at(d.s.entries["t1"].next_try)(Tick), Sync)
    alone = [s for s in syncs if s.tasks == ["t1"]]
    assert alone and all(len(s.tasks) == 1 or "t1" not in s.tasks for s in syncs)
    sid = alone[0].sync
    for _ in range(MAX_REFUSED - 1):
        acts = d(SyncFailed, sid, "h1", "status: bad (HTTP 400)", Failure.REFUSED)
        if "t1" not in d.s.entries or d.s.entries["t1"].phase == Phase.DROP:
            break
        sid = next(s for s in only(d.at(d.s.entries["t1"].next_try)(Tick), Sync) if s.tasks == ["t1"]).sync
    assert d.s.entries["t1"].phase == Phase.DROP
    assert [a.task for a in d.s.abandoned] == ["t1"] and "refused" in d.s.abandoned[0].reason


def test_results_of_a_former_run_are_reported_after_registration() -> None:
    d = Driver(pool=1)
    d(Recovered, (Spooled("t0", "w0", done_report("t0"), "/spool/t0/result"),))
    acts = d.start()
    [sync] = only(acts, Sync)
    assert sync.tasks == ["t0"] and sync.max == 1
    [alive] = only(acts, SendAlive)  # held results: an alive at once, so the server says what it still wants
    assert alive.results == ("t0",)


def test_nothing_is_started_twice_on_a_duplicate_assignment() -> None:
    d = Driver(pool=2)
    poll = d.running("t1")
    acts = d(SyncReplied, poll.sync, {}, (work("t1"),))
    assert only(acts, StartJob) == [] and any(isinstance(a, Log) for a in acts)


def test_next_wakeup_names_the_earliest_due_retry() -> None:
    d = Driver(pool=1)
    d.running("t1")
    sync = only(d(JobFinished, "t1", done_report("t1", result=False)), Sync)[0]
    d(SyncFailed, sync.sync, "h1", "cannot reach server")
    assert d.s.next_wakeup() == min(d.s.entries["t1"].next_try, d.s.next_alive)


# -- random event sequences ------------------------------------------------------------------------------------

class Pick:
    """The simulator's choices: from hypothesis (shrinkable) or from a seeded RNG (a long cooperative run)."""

    def __init__(self, data: st.DataObject | None = None, rng: random.Random | None = None) -> None:
        self.data, self.rng = data, rng

    def choice(self, seq: list[Any]) -> Any:
        if self.data is not None:
            return self.data.draw(st.sampled_from(seq))
        assert self.rng is not None
        return self.rng.choice(seq)

    def integer(self, lo: int, hi: int) -> int:
        return int(self.choice(list(range(lo, hi + 1))))

    def boolean(self) -> bool:
        return bool(self.choice([False, True]))

    def subset(self, seq: tuple[str, ...] | list[str]) -> list[str]:
        return [x for x in seq if self.boolean()]

@dataclass
class Sim:
    """Drives a WorkerState as the I/O layer does, keeping its own record of what is in flight per task and
    checking every action against it (independently of the state's own bookkeeping)."""

    pool: int
    s: WorkerState = field(init=False)
    now: float = 0.0
    inflight: dict[str, str] = field(default_factory=dict)
    syncs: dict[int, Sync] = field(default_factory=dict)
    alive: SendAlive | None = None
    registering: bool = False
    discard: set[str] = field(default_factory=set)
    results: dict[str, bool] = field(default_factory=dict)  # finished task → has a result
    delivered: set[str] = field(default_factory=set)  # the server has it (done, uploaded)
    released: set[str] = field(default_factory=set)  # the server said it does not want it (stale, ack)
    host_n: int = 1
    task_n: int = 0

    def __post_init__(self) -> None:
        self.s = WorkerState(self.pool, long_poll=20.0, alive_period=5.0, retry_base=0.5, retry_max=4.0,
                             rng=random.Random(3))
        self.feed(Registered("h1", 5.0, now=0.0))

    def feed(self, ev: Event) -> None:
        for a in self.s.handle(ev):
            self.take(a)
        self.check()

    def take(self, a: Action) -> None:
        def own(task: str, op: str) -> None:
            assert task not in self.inflight, f"{op} on {task} while {self.inflight.get(task)} is in flight"
            self.inflight[task] = op

        if isinstance(a, StartJob):
            own(a.task, "job")
        elif isinstance(a, Sync):
            for t in a.tasks:
                own(t, "report")
            if a.max or a.wait:
                assert not any(s.max or s.wait for s in self.syncs.values()), "two pulling syncs in flight"
            self.syncs[a.sync] = a
        elif isinstance(a, Upload):
            own(a.task, "upload")
        elif isinstance(a, DropSpool):
            own(a.task, "drop")
        elif isinstance(a, SendAlive):
            assert self.alive is None, "two alives in flight"
            self.alive = a
        elif isinstance(a, StopJob):
            assert self.inflight.get(a.task) == "job", f"stop of {a.task} which runs no job"
            if a.discard:
                self.discard.add(a.task)
        elif isinstance(a, Register):
            assert not self.registering, "two registrations in flight"
            self.registering = True

    def check(self) -> None:
        mine = {t: e.op.value for t, e in self.s.entries.items() if e.op is not None}
        assert mine == self.inflight
        assert sum(1 for op in self.inflight.values() if op == "job") <= self.pool
        for t, e in self.s.entries.items():
            if e.phase == Phase.UPLOAD:
                assert e.data and e.result, t

    def release(self, task: str) -> None:
        self.inflight.pop(task, None)

    # -- the environment's moves ----------------------------------------------------------------------------------
    def moves(self) -> list[str]:
        m = ["tick", "activation"]
        if self.syncs:
            m += ["sync_ok", "sync_fail"]
        if any(op == "job" for op in self.inflight.values()):
            m.append("job_end")
        if self.alive:
            m += ["alive_ok", "alive_fail"]
        if any(op == "upload" for op in self.inflight.values()):
            m += ["upload_ok", "upload_fail"]
        if any(op == "drop" for op in self.inflight.values()):
            m.append("dropped")
        if self.registering:
            m += ["register_ok", "register_fail"]
        if not self.s.stopping:
            m.append("stop")
        return m

    def move(self, name: str, pick: Pick, cooperative: bool = False) -> None:
        getattr(self, "m_" + name)(pick, cooperative)

    def m_tick(self, pick: Pick, coop: bool) -> None:
        wake = self.s.next_wakeup()
        if coop and wake is not None:
            self.now = max(self.now, wake)
        else:
            self.now += pick.choice([0.1, 1.0, 5.0, 30.0])
        self.feed(Tick(now=self.now))

    def m_activation(self, pick: Pick, coop: bool) -> None:
        active = True if coop else pick.boolean()
        self.feed(ActivationChanged(active, "policy", now=self.now))

    def m_stop(self, pick: Pick, coop: bool) -> None:
        self.feed(StopRequested(now=self.now))

    def m_sync_ok(self, pick: Pick, coop: bool) -> None:
        sid = pick.choice(sorted(self.syncs))
        sync = self.syncs.pop(sid)
        outcomes = {}
        for rep in sync.reports:
            t = rep["task"]
            self.release(t)
            has = "result" in rep
            choices = ["upload"] if has and t not in self.delivered else ["done"]
            if not coop:
                choices += ["stale", "missing", "done"]
            o = pick.choice(choices)
            if o == "missing":
                continue
            outcomes[t] = {"outcome": o, "result": f"d-{t}"} if o == "upload" else {"outcome": o}
            if o == "done":
                self.delivered.add(t)
            elif o == "stale":
                self.released.add(t)
        works = []
        if sync.max and not coop:
            for _ in range(pick.integer(0, sync.max)):
                self.task_n += 1
                works.append(work(f"t{self.task_n}"))
        self.feed(SyncReplied(sid, outcomes, tuple(works), now=self.now))

    def m_sync_fail(self, pick: Pick, coop: bool) -> None:
        sid = pick.choice(sorted(self.syncs))
        sync = self.syncs.pop(sid)
        for t in sync.tasks:
            self.release(t)
        kind = pick.choice(list(Failure))
        host = sync.host if pick.boolean() else "h-old"
        self.feed(SyncFailed(sid, host, "boom", kind, now=self.now))

    def m_job_end(self, pick: Pick, coop: bool) -> None:
        task = pick.choice(sorted(t for t, op in self.inflight.items() if op == "job"))
        self.release(task)
        if task in self.discard:
            self.feed(JobFinished(task, None, now=self.now))
            return
        has = pick.boolean()
        self.results[task] = has
        self.feed(JobFinished(task, done_report(task, has), f"/spool/{task}/result" if has else None,
                              now=self.now))

    def m_alive_ok(self, pick: Pick, coop: bool) -> None:
        a = self.alive
        assert a is not None
        self.alive = None
        orders = {t: pick.choice(["continue", "stop"]) if not coop else "continue" for t in a.tasks}
        if coop:  # a truthful server: acks what it has, asks for the rest
            ack = tuple(t for t in a.results if t in self.delivered)
            resend = {t: f"d-{t}" for t in a.results if t not in self.delivered and self.results.get(t)}
            report = tuple(t for t in a.results if t not in self.delivered and t not in resend)
        else:
            ack = tuple(pick.subset(a.results))
            rest = [t for t in a.results if t not in ack]
            resend = {t: f"d-{t}" for t in pick.subset(rest)}
            report = tuple(t for t in rest if t not in resend)
            self.released.update(ack)
        self.feed(AliveReplied(a.alive, orders, ack, resend, report, 5.0, now=self.now))

    def m_alive_fail(self, pick: Pick, coop: bool) -> None:
        a = self.alive
        assert a is not None
        self.alive = None
        kind = pick.choice([Failure.SERVER, Failure.HOST])
        self.feed(AliveFailed(a.alive, a.host, "boom", kind, now=self.now))

    def m_upload_ok(self, pick: Pick, coop: bool) -> None:
        task = pick.choice(sorted(t for t, op in self.inflight.items() if op == "upload"))
        self.release(task)
        self.delivered.add(task)
        self.feed(UploadDone(task, now=self.now))

    def m_upload_fail(self, pick: Pick, coop: bool) -> None:
        task = pick.choice(sorted(t for t, op in self.inflight.items() if op == "upload"))
        self.release(task)
        kind = pick.choice(list(Failure))
        self.feed(UploadFailed(task, "boom", kind, now=self.now))

    def m_dropped(self, pick: Pick, coop: bool) -> None:
        task = pick.choice(sorted(t for t, op in self.inflight.items() if op == "drop"))
        self.release(task)
        self.feed(Dropped(task, now=self.now))

    def m_register_ok(self, pick: Pick, coop: bool) -> None:
        self.registering = False
        self.host_n += 1
        self.feed(Registered(f"h{self.host_n}", 5.0, now=self.now))

    def m_register_fail(self, pick: Pick, coop: bool) -> None:
        self.registering = False
        self.feed(RegisterFailed("boom", now=self.now))


PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def cooperate(sim: Sim, rng: random.Random, done: Any) -> None:
    """From now on the server answers every call truthfully, the policy stays active and jobs end."""
    pick = Pick(rng=rng)
    for _ in range(5000):
        if done():
            return
        moves = [m for m in sim.moves() if m.endswith(("_ok", "job_end", "dropped", "tick"))]
        if not sim.s.active:
            moves.append("activation")
        sim.move(rng.choice(moves), pick, cooperative=True)


@PROPERTY
@given(st.data(), st.integers(1, 4))
def test_random_events_never_give_an_entry_two_owners(data: st.DataObject, pool: int) -> None:
    sim = Sim(pool)
    pick = Pick(data)
    for _ in range(data.draw(st.integers(1, 120))):
        sim.move(pick.choice(sim.moves()), pick)


@PROPERTY
@given(st.data(), st.integers(1, 4), st.integers(0, 2**32))
def test_every_finished_result_is_delivered_once_the_server_answers(data: st.DataObject, pool: int,
                                                                   seed: int) -> None:
    sim = Sim(pool)
    pick = Pick(data)
    for _ in range(data.draw(st.integers(1, 80))):
        sim.move(pick.choice([m for m in sim.moves() if m != "stop"]), pick)
    cooperate(sim, random.Random(seed), lambda: not sim.s.entries and not sim.inflight and not sim.syncs)
    assert sim.s.entries == {}, {t: (e.phase, e.op, e.attempts) for t, e in sim.s.entries.items()}
    given_up = {a.task for a in sim.s.abandoned}
    for task in sim.results:
        assert task in sim.delivered | sim.released | given_up, task


@PROPERTY
@given(st.data(), st.integers(0, 2**32))
def test_a_stop_settles_once_the_server_answers(data: st.DataObject, seed: int) -> None:
    sim = Sim(3)
    pick = Pick(data)
    for _ in range(data.draw(st.integers(1, 60))):
        sim.move(pick.choice([m for m in sim.moves() if m != "stop"]), pick)
    sim.feed(StopRequested(now=sim.now))
    cooperate(sim, random.Random(seed), sim.s.settled)
    assert sim.s.settled()
    kept = (Phase.UPLOAD,) if sim.s.host else (Phase.UPLOAD, Phase.REPORT)  # for the next start
    assert not sim.s.running and all(e.phase in kept for e in sim.s.entries.values())
    assert all(op == "upload" for op in sim.inflight.values())


@pytest.mark.parametrize("kind", list(Failure))
def test_every_failure_kind_is_survived(kind: Failure) -> None:
    d = Driver(pool=1)
    d.running("t1")
    sync = only(d(JobFinished, "t1", done_report("t1"), "/r"), Sync)[0]
    d(SyncFailed, sync.sync, "h1", "boom", kind)
    e = d.s.entries["t1"]
    assert e.op is None and e.phase == Phase.REPORT and e.attempts == 1 and e.last_error == "boom"
    assert e.error_kind == kind and d.s.in_flight("t1") is None and e.op != Op.DROP
