"""The worker daemon: register, pull (long-poll), run jobs in a pool, send alive signals, deliver results.

Threads: the pull loop (main), one alive loop, one delivery loop, one thread per running job. Every wait is on
an event or a server long-poll; nothing busy-polls. While the server is unreachable, retries back off
exponentially with jitter.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from xwhep.client.sdk import Client, XwError
from xwhep.worker import job as jobmod
from xwhep.worker.activation import Policy, parse_policy
from xwhep.worker.config import WorkerConfig
from xwhep.worker.executors.base import Executor
from xwhep.worker.executors.native import NativeExecutor
from xwhep.worker.probe import probe_host
from xwhep.worker.spool import Entry, Spool
from xwhep.worker.staging import BlobCache
from xwhep.worker.tunnel import TunnelManager

log = logging.getLogger("xwhep.worker")


class Backoff:
    """Exponential back-off with full jitter, reset on success."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base, self.cap, self.n = base, cap, 0

    def next(self) -> float:
        self.n += 1
        return random.uniform(0, min(self.cap, self.base * 2 ** min(self.n, 16)))

    def reset(self) -> None:
        self.n = 0


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
        self.jobs: dict[str, jobmod.Job] = {}
        self.lock = threading.Lock()
        self.slot_free = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.deliver_now = threading.Event()
        # results handed to the pull loop: when a job ends while the pool is full, its report rides on the
        # sync call that asks for the next work (one round trip instead of two)
        self.outbox: list[Entry] = []
        self.waiting_slot = False
        self.active = True
        self.idle_reason = "starting"
        self.host: str | None = None
        self.alive_period = 30.0
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
        if state_file.exists():
            desc["uid"] = json.loads(state_file.read_text()).get("uid")
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                host = self.client.register_host(desc)
                break
            except XwError as exc:
                if exc.status is not None and exc.status < 500 and exc.status not in (401, 408, 429):
                    raise
                self._set_idle(_server_trouble(exc))
                self.stopping.wait(backoff.next())
        else:
            return
        self.host = host["uid"]
        self.alive_period = float(host.get("alive_period") or 30.0)
        self.tunnels.set_host(self.host)
        state_file.write_text(json.dumps({"uid": self.host, "server": self.cfg.client.server}))
        log.info("registered as host %s", self.host)

    def run(self) -> None:
        """Run until :meth:`shutdown` (or a signal)."""
        self.register()
        if self.host is None:
            return
        threads = [threading.Thread(target=self._alive_loop, name="xw-alive", daemon=True),
                   threading.Thread(target=self._deliver_loop, name="xw-deliver", daemon=True)]
        for t in threads:
            t.start()
        try:
            self._pull_loop()
        finally:
            self.stopping.set()
            self.deliver_now.set()
            for j in list(self.jobs.values()):
                j.stop("worker shutting down")
            for t in threads:
                t.join(timeout=10)
            self.tunnels.stop()
            self._write_status()

    def shutdown(self) -> None:
        """Stop promptly: wake the pool wait and break the long-poll in flight."""
        self.stopping.set()
        self.deliver_now.set()
        if self.lock.acquire(timeout=1):
            try:
                self.slot_free.notify_all()
            finally:
                self.lock.release()
        threading.Thread(target=self._close_http, daemon=True).start()

    def _close_http(self) -> None:
        try:
            self.client.http.close()
        except Exception:  # closing under a request in flight: that request fails, which is the point
            pass

    # -- pulling ---------------------------------------------------------------------------------------------------
    def _check_activation(self) -> bool:
        ok, reason = self.policy.is_active()
        if not ok and self.active:
            log.info("deactivated: %s", reason)
            if self.host is not None:  # tell the server first, so that a long-poll in flight hands out nothing
                try:
                    self.client.alive(self.host, list(self.jobs), [], active=False)
                except XwError as exc:
                    log.warning("could not announce the deactivation: %s", exc.message)
            for j in list(self.jobs.values()):
                j.stop(f"worker deactivated: {reason}")
        self.active = ok
        if not ok:
            self._set_idle(f"inactive: {reason}")
        return ok

    def _pull_loop(self) -> None:
        backoff = Backoff()
        assert self.host is not None
        while not self.stopping.is_set():
            if not self._check_activation():
                self.stopping.wait(self.cfg.activation_check_s)
                continue
            with self.lock:
                if len(self.jobs) >= self.cfg.pool:
                    self._set_idle("pool full", locked=True)
                    self.waiting_slot = True
                    self.slot_free.wait()
                    self.waiting_slot = False
                    if not self.outbox:
                        continue  # a slot freed up, maybe by a deactivation: check the policy again first
                free = self.cfg.pool - len(self.jobs)
                outbox, self.outbox = self.outbox, []
            if self.stopping.is_set():
                self.deliver_now.set()  # the deliver loop sends what the outbox held
                return
            try:
                if not outbox:
                    self._set_idle("waiting for matching work")
                # a report is never held back by a long-poll: with reports aboard, ask without waiting
                reply = self.client.sync(self.host, reports=[e.report for e in outbox], max=free,
                                         wait=0.0 if outbox else self.cfg.long_poll_s)
                backoff.reset()
            except Exception as exc:
                if outbox:
                    self.deliver_now.set()  # still spooled: the deliver loop retries them
                if self.stopping.is_set():
                    return
                if not isinstance(exc, XwError):
                    raise
                if exc.status == 404:  # the server forgot this host (new database): register again
                    (self.cfg.workdir / "host.json").unlink(missing_ok=True)
                    self.register()
                    continue
                self._set_idle(_server_trouble(exc))
                self.stopping.wait(backoff.next())
                continue
            settled = [self._settle(entry, out) for entry, out in zip(outbox, reply["reports"], strict=True)]
            if not all(settled):
                self.deliver_now.set()  # uploads go through the deliver loop: a big file must not stall pulling
            for a in reply["works"]:
                self._start(a)

    def _start(self, assignment: dict[str, Any]) -> None:
        j = jobmod.Job(assignment)
        with self.lock:
            self.jobs[j.task] = j
        if not self.active:
            j.stop("worker deactivated")
        threading.Thread(target=self._run_job, args=(j,), name=f"xw-job-{j.task[:8]}", daemon=True).start()
        self._write_status()

    def _fetch(self, info: dict[str, Any], tmp: Path) -> None:
        with open(tmp, "wb") as f:
            self.client.download_to(info, f)

    def _run_job(self, j: jobmod.Job) -> None:
        root = self.jobs_dir / j.task
        entry = None
        try:
            entry = jobmod.run(j, root, self.cache, self._fetch, self.executor, self.cfg, self.spool, self.tunnels)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            with self.lock:
                self.jobs.pop(j.task, None)
                aboard = entry is not None and self.waiting_slot and self.active and not self.stopping.is_set()
                if aboard:
                    assert entry is not None
                    self.outbox.append(entry)
                self.slot_free.notify_all()
            self._write_status()
        if entry is not None and not aboard:
            self._deliver(entry)
            self._write_status()

    # -- results -------------------------------------------------------------------------------------------------
    def _deliver(self, entry: Entry) -> bool:
        """Report, and upload the result if the server asks; keep the entry until the server has it."""
        assert self.host is not None
        try:
            if entry.data is None or "result" not in entry.report:
                [out] = self.client.report(self.host, [entry.report])
                if self._settle(entry, out):
                    return True
            if entry.data is not None and entry.result is not None:
                try:
                    self.client.upload(entry.data, entry.result)
                except XwError as exc:
                    if exc.status != 409:  # 409: the server already has these bytes
                        raise
                self.spool.drop(entry.task)
            return True
        except XwError as exc:
            log.warning("result of task %s not delivered yet: %s", entry.task, exc.message)
            return False

    def _settle(self, entry: Entry, out: dict[str, Any]) -> bool:
        """Act on the server's answer to a report; True when nothing is left to send."""
        if out["outcome"] == "upload":
            self.spool.set_data(entry, out["result"])
            return False
        if out["outcome"] in ("done", "stale"):
            self.spool.drop(entry.task)
            return True
        return False

    def _deliver_loop(self) -> None:
        backoff = Backoff()
        while not self.stopping.is_set():
            pending = self.spool.entries()
            if pending and all(self._deliver(e) for e in pending):
                backoff.reset()
            delay = backoff.next() if self.spool.entries() else None
            self.deliver_now.wait(delay)
            self.deliver_now.clear()

    # -- alive ----------------------------------------------------------------------------------------------------
    def _alive_loop(self) -> None:
        assert self.host is not None
        while not self.stopping.wait(self.alive_period):
            self._write_status()  # job phases (stage-in → running → stage-out) change without other notice
            if self.active:
                self._check_activation()
            with self.lock:
                running = list(self.jobs)
            held = [e.task for e in self.spool.entries() if e.data is not None]  # reported: only those can be acked
            try:
                reply = self.client.alive(self.host, running, held, active=self.active)
            except XwError as exc:
                self._set_idle(_server_trouble(exc))
                continue
            self.alive_period = float(reply.get("alive_period") or self.alive_period)
            for task, order in reply.get("tasks", {}).items():
                if order == "stop" and task in self.jobs:
                    self.jobs[task].stop("the server asked to stop", discard=True)
            for task in reply.get("ack", []):
                self.spool.drop(task)
            if reply.get("resend") or self.spool.entries():  # unreported results too (e.g. the server was down)
                self.deliver_now.set()

    # -- status ----------------------------------------------------------------------------------------------------
    def _set_idle(self, reason: str, locked: bool = False) -> None:
        if reason != self.idle_reason:
            self.idle_reason = reason
            self._write_status()

    def _write_status(self) -> None:
        jobs = [{"task": j.task, "work": j.assignment["work"], "app": j.assignment["app"]["name"],
                 "phase": j.phase, "started": j.started} for j in list(self.jobs.values())]
        status = {"host": self.host, "server": self.cfg.client.server, "pid": os.getpid(), "active": self.active,
                  "pool": self.cfg.pool, "running": jobs, "idle_reason": None if jobs else self.idle_reason,
                  "results_pending": len(list(self.spool.root.glob("*/report.json"))), "time": time.time()}
        tmp = self.cfg.workdir / f"status.json.{threading.get_ident()}.tmp"  # threads write concurrently
        tmp.write_text(json.dumps(status))
        os.replace(tmp, self.cfg.workdir / "status.json")


def _server_trouble(exc: XwError) -> str:
    """The idle reason for a failed call: "unreachable" only when no answer came (an answer says what happened,
    e.g. the server's storage is full)."""
    return f"server unreachable: {exc.message}" if exc.status is None else f"server error: {exc.message}"
