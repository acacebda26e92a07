"""The worker daemon: the I/O layer around :class:`~xwhep.worker.state.WorkerState`.

The state decides; this module only runs its actions (server calls, jobs, spool removals) and feeds their
outcomes back as events. One thread, the core loop (:meth:`Worker.run`), owns the state and every decision: it
takes events from one queue, hands them to the state and starts the actions it returns. The calls run on a small
pool of daemon threads, each job on a thread of its own, the activation policy on another; none of them touches
the state or the spool on its own account, and each turns every exception into a failure event (logged, backed
off, retried by the state). Only a clean stop ends the loop.

Speed: a finished job's report rides on the ``sync`` call that asks for the next works (one round trip); a
long-poll is only made when nothing is to be reported, and a report that comes while one is in flight goes at once
on a call of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xwhep.client.sdk import Client, XwError
from xwhep.fsutil import write_atomic
from xwhep.worker import job as jobmod
from xwhep.worker.activation import Always, Policy, parse_policy
from xwhep.worker.config import WorkerConfig
from xwhep.worker.executors.base import Executor
from xwhep.worker.executors.native import NativeExecutor
from xwhep.worker.probe import probe_host
from xwhep.worker.spool import Spool
from xwhep.worker.staging import BlobCache
from xwhep.worker.state import (
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
from xwhep.worker.tunnel import TunnelManager

log = logging.getLogger("xwhep.worker")

IO_THREADS = 12  # server calls in flight at once: a long-poll, an alive, reports, uploads, spool removals


class Backoff:
    """Exponential back-off with full jitter, reset on success (registration)."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base, self.cap, self.n = base, cap, 0

    def next(self) -> float:
        self.n += 1
        return random.uniform(0, min(self.cap, self.base * 2 ** min(self.n, 16)))

    def reset(self) -> None:
        self.n = 0


@dataclass(frozen=True)
class JobPhase(Event):
    """A job moved on (stage-in → running → stage-out): only the status file changes."""

    task: str


def classify(exc: BaseException, not_found: Failure = Failure.HOST) -> tuple[str, Failure]:
    """What a failed call means for what comes next; ``not_found``: what a 404 means for this call."""
    if isinstance(exc, XwError):
        s = exc.status
        if s is None or s >= 500 or s in (401, 403, 408, 425, 429):
            return server_trouble(exc), Failure.SERVER
        if s == 404:
            return exc.message, not_found
        return exc.message, Failure.REFUSED
    return f"{type(exc).__name__}: {exc}", Failure.SERVER


def server_trouble(exc: XwError) -> str:
    """What went wrong with the server, in a few words: "unreachable" only when no answer came (an answer says
    what happened, e.g. that the server's storage is full)."""
    return f"server unreachable: {exc.message}" if exc.status is None else f"server error: {exc.message}"


class _Pool:
    """Daemon threads running callables: a call hung on a dead server must never keep the process alive."""

    def __init__(self, n: int, name: str) -> None:
        self.q: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        for i in range(n):
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn: Callable[[], None]) -> None:
        self.q.put(fn)

    def _run(self) -> None:
        while True:
            fn = self.q.get()
            try:
                fn()
            except BaseException:  # each action reports its own failures; this is the last resort
                log.exception("worker I/O action failed")


class Worker:
    def __init__(self, cfg: WorkerConfig, executor: Executor | None = None) -> None:
        self.cfg = cfg
        self.client = Client(cfg.client.server, ca=cfg.client.ca, login=cfg.client.login,
                             password=cfg.client.password, token=cfg.client.token, cert=cfg.client.cert,
                             key=cfg.client.key)
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.workdir, 0o700)
        self.jobs_dir = cfg.workdir / "jobs"
        shutil.rmtree(self.jobs_dir, ignore_errors=True)  # leftovers of a killed run: those attempts are LOST
        self.jobs_dir.mkdir()
        self.cache = BlobCache(cfg.workdir / "cache", cfg.cache_mb << 20)
        self.spool = Spool(cfg.workdir / "spool")
        self.executor = executor or NativeExecutor()
        self.policy: Policy = parse_policy(cfg.activation)
        self.state = WorkerState(cfg.pool, long_poll=cfg.long_poll_s, retry_max=cfg.retry_max_s,
                                 rng=random.Random())
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()  # put() is safe from signal handlers
        self.jobs: dict[str, jobmod.Job] = {}  # the core loop's: jobs started and not yet finished
        self.io: _Pool | None = None
        self.stopping = threading.Event()
        self.stop_deadline: float | None = None
        self.force = threading.Event()
        self.host: str | None = None
        self.alive_period = 30.0
        self.idle_reason = "starting"
        self._status_text = ""
        self.tunnels = TunnelManager(self.client, cfg.client.ca, incoming=cfg.incoming)  # jobs' listen/forward ports

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def description(self) -> dict[str, Any]:
        desc = probe_host(self.cfg.workdir)
        desc.update(pool=self.cfg.pool, incoming=self.cfg.incoming, packages=self.cfg.packages,
                    datas=self.cfg.datas, project=self.cfg.project)
        ok, _ = self.executor.available() if hasattr(self.executor, "available") else (True, "")
        if not ok:
            raise SystemExit("bubblewrap (bwrap) is required for the native executor; install it")
        return desc

    def register(self) -> None:
        state_file = self.cfg.workdir / "host.json"
        desc = self.description()
        saved = json.loads(state_file.read_text()) if state_file.exists() else {}
        self.client.unbind_host()  # registration is the user's (worker.conf) business; the key proves the host
        if saved.get("uid") and saved.get("key"):  # the same host again: its own key proves it
            desc.update(uid=saved["uid"], key=saved["key"])
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                host = self.client.register_host(desc)
                break
            except XwError as exc:
                if exc.status is not None and exc.status < 500 and exc.status not in (401, 408, 429):
                    raise
                self._set_idle(server_trouble(exc))
                self.stopping.wait(backoff.next())
        else:
            return
        key = host.get("key") or desc.get("key")
        self.client.bind_host(host, key)  # from now on the worker speaks as this host only
        self.host = host["uid"]
        self.alive_period = float(host.get("alive_period") or 30.0)
        self.tunnels.set_host(self.host)
        write_atomic(state_file, json.dumps({"uid": self.host, "key": key, "server": self.cfg.client.server}), 0o600)
        log.info("registered as host %s", self.host)

    def run(self) -> None:
        """Run until :meth:`shutdown` (or a signal): register, then the core loop."""
        self.register()
        if self.host is None:
            return
        self.io = _Pool(IO_THREADS, "xw-io")
        if not isinstance(self.policy, Always):
            ok, reason = self._policy_check()  # before the first request: an inactive worker takes no work
            self._post(ActivationChanged(ok, reason, now=time.monotonic()))
            threading.Thread(target=self._activation_loop, args=((ok, reason),), name="xw-activation",
                             daemon=True).start()
        self._post(Registered(self.host, self.alive_period, now=time.monotonic()))
        spooled = tuple(Spooled(e.task, e.work, e.report, str(e.result) if e.result else None)
                        for e in self.spool.entries())
        if spooled:
            log.info("%d result(s) from a former run to deliver", len(spooled))
            self._post(Recovered(spooled, now=time.monotonic()))
        try:
            self._loop()
        finally:
            self.stopping.set()
            for j in list(self.jobs.values()):  # past the stop deadline: whatever still runs is killed
                j.stop("worker shutting down")
            self.tunnels.stop()
            self._write_status(final=True)
            self._close_http()

    def shutdown(self) -> None:
        """Stop cleanly: jobs are stopped and their reports sent (for ``stop_timeout_s`` at most, else they stay
        spooled for the next start). A second call stops at once. Safe from a signal handler."""
        if self.stopping.is_set():
            self.force.set()
            self.events.put(Tick(now=time.monotonic()))
            return
        self.stopping.set()
        self.stop_deadline = time.monotonic() + self.cfg.stop_timeout_s
        self.events.put(StopRequested(now=time.monotonic()))

    def _close_http(self) -> None:
        try:
            self.client.http.close()
        except Exception:  # closing under a request in flight: that request fails, which is the point
            pass

    # -- the core loop ---------------------------------------------------------------------------------------------
    def _post(self, ev: Event) -> None:
        self.events.put(ev)

    def _loop(self) -> None:
        while not self.force.is_set():
            now = time.monotonic()
            if self.stop_deadline is not None:
                if self.state.settled():
                    log.info("stopped cleanly")
                    return
                if now >= self.stop_deadline:
                    left = len(self.state.deliveries())
                    log.warning("stop: gave up waiting for the server; %d result(s) stay spooled", left)
                    return
            wake = self.state.next_wakeup()
            timeout = None if wake is None else max(0.0, wake - now)
            if self.stop_deadline is not None:
                timeout = max(0.0, min(timeout if timeout is not None else 1e9, self.stop_deadline - now))
            try:
                batch = [self.events.get(timeout=timeout)]
            except queue.Empty:
                batch = [Tick(now=time.monotonic())]
            while len(batch) < 256:  # whatever else is queued goes in the same round (one status write)
                try:
                    batch.append(self.events.get_nowait())
                except queue.Empty:
                    break
            for ev in batch:
                try:
                    self._feed(ev)
                except Exception:  # a bug must not end the worker: log it, the next event goes on
                    log.exception("worker: handling %s failed", type(ev).__name__)
            self._write_status()

    def _feed(self, ev: Event) -> None:
        if isinstance(ev, JobFinished):
            self.jobs.pop(ev.task, None)
        for action in self.state.handle(ev):
            try:
                self._start(action)
            except Exception as exc:
                log.exception("worker: starting %s failed", type(action).__name__)
                self._failed(action, exc)

    def _start(self, a: Action) -> None:
        """Start one action; its outcome comes back as an event."""
        assert self.io is not None
        if isinstance(a, Log):
            log.log(a.level, "%s", a.text)
        elif isinstance(a, StartJob):
            j = jobmod.Job(a.assignment, on_phase=self._phase_changed)
            self.jobs[j.task] = j
            threading.Thread(target=self._run_job, args=(j,), name=f"xw-job-{j.task[:8]}", daemon=True).start()
        elif isinstance(a, StopJob):
            running = self.jobs.get(a.task)
            if running is not None:
                running.stop(a.reason, discard=a.discard)
        elif isinstance(a, Sync):
            self.io.submit(lambda: self._sync(a))
        elif isinstance(a, SendAlive):
            self.io.submit(lambda: self._alive(a))
        elif isinstance(a, Upload):
            self.io.submit(lambda: self._upload(a))
        elif isinstance(a, DropSpool):
            self.io.submit(lambda: self._drop(a))
        elif isinstance(a, Register):
            self.io.submit(lambda: self._register_again(a))

    def _failed(self, a: Action, exc: BaseException) -> None:
        """An action could not even start: its outcome is a failure, so the state retries it."""
        reason = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if isinstance(a, StartJob):
            self._post(JobFinished(a.task, {"task": a.task, "status": "ABORTED", "reason": f"worker failure: "
                                            f"{reason}"}, now=now))
        elif isinstance(a, Sync):
            self._post(SyncFailed(a.sync, a.host, reason, now=now))
        elif isinstance(a, SendAlive):
            self._post(AliveFailed(a.alive, a.host, reason, now=now))
        elif isinstance(a, Upload):
            self._post(UploadFailed(a.task, reason, now=now))
        elif isinstance(a, DropSpool):
            self._post(Dropped(a.task, now=now))
        elif isinstance(a, Register):
            self._post(RegisterFailed(reason, now=now))

    # -- actions (on the I/O threads) ------------------------------------------------------------------------------
    def _sync(self, a: Sync) -> None:
        try:
            reply = self.client.sync(a.host, reports=list(a.reports), max=a.max, wait=a.wait, active=a.active)
            outcomes = {t: o for t, o in zip(a.tasks, reply.get("reports") or [], strict=False)}
            works = tuple(reply.get("works") or ())
        except Exception as exc:
            reason, kind = classify(exc)
            self._post(SyncFailed(a.sync, a.host, reason, kind, now=time.monotonic()))
            return
        self._post(SyncReplied(a.sync, outcomes, works, now=time.monotonic()))

    def _alive(self, a: SendAlive) -> None:
        try:
            reply = self.client.alive(a.host, list(a.tasks), list(a.results), active=a.active)
            ev = AliveReplied(a.alive, dict(reply.get("tasks") or {}), tuple(reply.get("ack") or ()),
                              dict(reply.get("resend") or {}), tuple(reply.get("report") or ()),
                              float(reply.get("alive_period") or 0) or None, now=time.monotonic())
        except Exception as exc:
            reason, kind = classify(exc)
            self._post(AliveFailed(a.alive, a.host, reason, kind, now=time.monotonic()))
            return
        self._post(ev)

    def _upload(self, a: Upload) -> None:
        try:
            self.client.upload(a.data, Path(a.path))
        except XwError as exc:
            if exc.status == 409:  # the server already has these bytes
                self._post(UploadDone(a.task, now=time.monotonic()))
                return
            reason, kind = classify(exc, not_found=Failure.GONE)
            self._post(UploadFailed(a.task, reason, kind, now=time.monotonic()))
            return
        except OSError as exc:  # the result file cannot be read (removed, disk error): no retry can help
            self._post(UploadFailed(a.task, f"result file unreadable: {exc}", Failure.LOCAL, now=time.monotonic()))
            return
        except Exception as exc:
            reason, kind = classify(exc)
            self._post(UploadFailed(a.task, reason, kind, now=time.monotonic()))
            return
        self._post(UploadDone(a.task, now=time.monotonic()))

    def _drop(self, a: DropSpool) -> None:
        try:
            self.spool.drop(a.task)
        finally:
            self._post(Dropped(a.task, now=time.monotonic()))

    def _register_again(self, a: Register) -> None:
        try:
            if a.forget:  # the server forgot this host (new database): register as a new one
                (self.cfg.workdir / "host.json").unlink(missing_ok=True)
                self.host = None
            self.register()
        except (Exception, SystemExit) as exc:
            self._post(RegisterFailed(f"{type(exc).__name__}: {exc}", now=time.monotonic()))
            return
        if self.host is None:
            self._post(RegisterFailed("stopping", now=time.monotonic()))
        else:
            self._post(Registered(self.host, self.alive_period, now=time.monotonic()))

    # -- jobs and activation ---------------------------------------------------------------------------------------
    def _fetch(self, info: dict[str, Any], tmp: Path) -> None:
        with open(tmp, "wb") as f:
            self.client.download_to(info, f)

    def _run_job(self, j: jobmod.Job) -> None:
        root = self.jobs_dir / j.task
        report: dict[str, Any] | None = None
        result = None
        try:
            entry = jobmod.run(j, root, self.cache, self._fetch, self.executor, self.cfg, self.spool, self.tunnels)
            if entry is not None:
                report, result = entry.report, entry.result
        except BaseException as exc:  # e.g. the spool commit failed: the server must still hear of the task
            log.exception("task %s: the job failed in the worker", j.task)
            if not j.discard:
                report = {"task": j.task, "status": "ABORTED", "reason": f"worker failure: {exc}"}
        finally:
            shutil.rmtree(root, ignore_errors=True)
            self._post(JobFinished(j.task, report, str(result) if result else None, now=time.monotonic()))

    def _phase_changed(self, task: str) -> None:
        self._post(JobPhase(task, now=time.monotonic()))

    def _policy_check(self) -> tuple[bool, str]:
        try:
            return self.policy.is_active()
        except Exception as exc:  # a broken probe must not run jobs against the volunteer's wishes
            log.exception("activation check failed")
            return False, f"activation check failed: {exc}"

    def _activation_loop(self, last: tuple[bool, str]) -> None:
        while not self.stopping.wait(self.cfg.activation_check_s):
            now = self._policy_check()
            if now != last:
                last = now
                self._post(ActivationChanged(now[0], now[1], now=time.monotonic()))

    # -- status ----------------------------------------------------------------------------------------------------
    def _set_idle(self, reason: str) -> None:
        """Registration's own note; written here only before the core loop runs (then the loop writes)."""
        if reason != self.idle_reason:
            self.idle_reason = reason
            if self.io is None:
                self._write_status()

    def _write_status(self, final: bool = False) -> None:
        st = self.state
        mono, wall = time.monotonic(), time.time()
        jobs = [{"task": j.task, "work": j.assignment["work"], "app": j.assignment["app"]["name"],
                 "phase": j.phase, "started": j.started} for j in list(self.jobs.values())]
        deliveries = []
        for e in st.deliveries():
            failing = e.op is None and e.attempts > 0
            deliveries.append({
                "task": e.task, "work": e.work, "step": "upload" if e.phase == Phase.UPLOAD else "report",
                "in_flight": e.op is not None, "attempts": e.attempts, "last_error": e.last_error,
                "next_retry": round(wall + max(0.0, e.next_try - mono), 3) if failing else None})
        if final:
            idle = "stopped"
        elif self.io is None:
            idle = self.idle_reason
        else:
            idle = st.idle_reason()
        status: dict[str, Any] = {
            "host": self.host, "server": self.cfg.client.server, "pid": os.getpid(), "active": st.active,
            "pool": self.cfg.pool, "running": jobs, "idle_reason": None if jobs else idle,
            "results_pending": len(deliveries), "deliveries": deliveries,
            "abandoned": [{"task": a.task, "work": a.work, "reason": a.reason, "at": round(wall - (mono - a.at), 3)}
                          for a in st.abandoned]}
        text = json.dumps(status)
        if text == self._status_text:
            return
        self._status_text = text
        status["time"] = wall
        tmp = self.cfg.workdir / f"status.json.{threading.get_ident()}.tmp"  # registration writes from its thread
        with contextlib.suppress(OSError):  # a full disk must not stop the worker; the next write tries again
            tmp.write_text(json.dumps(status))
            os.replace(tmp, self.cfg.workdir / "status.json")
