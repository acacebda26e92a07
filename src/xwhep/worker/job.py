"""One assignment from stage-in to a spooled report: fetch inputs (cached, verified), run, pack the result."""

from __future__ import annotations

import logging
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xwhep.worker.config import WorkerConfig
from xwhep.worker.executors.base import Executor, ExecutorError, JobOutcome, JobSpec, RunningJob
from xwhep.worker.packing import PackingError, pack_results, snapshot
from xwhep.worker.spool import Entry, Spool
from xwhep.worker.staging import BlobCache, StagingError, copy_or_link_into, safe_extract_zip
from xwhep.worker.tunnel import TunnelError, TunnelManager

Fetch = Callable[[dict[str, Any], Path], None]
log = logging.getLogger("xwhep.worker.jobs")


@dataclass
class Job:
    """A running assignment, as the daemon and ``xw worker status`` see it."""

    assignment: dict[str, Any]
    started: float = field(default_factory=time.time)
    phase: str = "stage-in"
    running: RunningJob | None = None
    stop_reason: str | None = None
    discard: bool = False  # the server said stop: the attempt no longer counts, report nothing
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_phase: Callable[[str], None] | None = None  # told of each phase change (the daemon's status)

    @property
    def task(self) -> str:
        return str(self.assignment["task"])

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        if self.on_phase is not None:
            self.on_phase(self.task)

    def stop(self, reason: str, discard: bool = False) -> None:
        """End the job at once (from any thread)."""
        with self.lock:
            self.stop_reason = self.stop_reason or reason
            self.discard = self.discard or discard
            running = self.running
        if running is not None:
            running.stop(reason)


def _place(cache: BlobCache, fetch: Fetch, info: dict[str, Any], dest: Path, executable: bool = False) -> None:
    with cache.use(info["sha256"], info.get("size"), lambda tmp: fetch(info, tmp)) as blob:
        copy_or_link_into(blob, dest, executable=executable)


def _unzip(cache: BlobCache, fetch: Fetch, info: dict[str, Any], dest: Path, cfg: WorkerConfig) -> None:
    with cache.use(info["sha256"], info.get("size"), lambda tmp: fetch(info, tmp)) as blob:
        safe_extract_zip(blob, dest, cfg.zip_max_mb << 20, cfg.zip_max_files)


def _safe_name(name: str, fallback: str) -> str:
    base = Path(name or fallback).name
    return base if base not in ("", ".", "..") else fallback


def stage_in(job: Job, root: Path, cache: BlobCache, fetch: Fetch, cfg: WorkerConfig) -> tuple[JobSpec, Any]:
    """Prepare the job dir: app binary, dirin (unzipped safely), base dirin last, stdin; build the job spec."""
    a = job.assignment
    jobdir = root / "job"
    logdir = root / "log"
    for d in (jobdir, logdir):
        d.mkdir(parents=True, exist_ok=True)
    app = a["app"]
    argv: list[str]
    args = shlex.split(a.get("args") or "")
    binary = app.get("binary")
    if binary:
        name = _safe_name(binary.get("name") or app["name"], "app")
        if binary.get("platform") == "java" or name.endswith(".jar"):
            _place(cache, fetch, binary, jobdir / name)
            argv = ["java", "-jar", f"/job/{name}", *args]
        else:
            _place(cache, fetch, binary, jobdir / name, executable=True)
            argv = [f"/job/{name}", *args]
    elif app["type"] == "SHARED":
        argv = [app["name"], *args]
    else:
        raise StagingError(f"app {app['name']} has no binary for this host and is not shared here")
    if a.get("dirin"):
        _unzip(cache, fetch, a["dirin"], jobdir, cfg)
    if app.get("base_dirin"):  # last, so that the application's base files win (XWHEP)
        _unzip(cache, fetch, app["base_dirin"], jobdir, cfg)
    stdin = None
    if a.get("stdin"):
        stdin = root / "stdin"
        _place(cache, fetch, a["stdin"], stdin)
    env = {**(app.get("env") or {}), **(a.get("env") or {})}
    memory = cfg.job_memory_mb
    if memory is None:
        import psutil

        memory = max(64, (psutil.virtual_memory().total >> 20) // max(1, cfg.pool))
    spec = JobSpec(jobdir=jobdir, logdir=logdir, argv=argv, env=env, stdin=stdin,
                   wallclock=float(a["wallclock"]) if a.get("wallclock") else None, memory_mb=memory,
                   cpu_quota=cfg.job_cpu, max_procs=cfg.job_max_procs)
    return spec, snapshot(jobdir)


def run(job: Job, root: Path, cache: BlobCache, fetch: Fetch, executor: Executor, cfg: WorkerConfig,
        spool: Spool, tunnels: TunnelManager | None = None) -> Entry | None:
    """Run one assignment to the end and spool its report; None when the server told us to drop it (what it
    left in the spool is then removed by the daemon, the entry's next owner)."""
    report: dict[str, Any] = {"task": job.task}
    result_path = None
    a = job.assignment
    app = (a.get("app") or {}).get("name")
    fields = {"task": job.task, "work": a.get("work"), "app": app}
    log.info("job start: task %s work %s app %s", job.task, a.get("work"), app, extra={"fields": fields})
    try:
        spec, snap = stage_in(job, root, cache, fetch, cfg)
        if a.get("listen_ports") or a.get("forward_addresses"):  # the job runs under its tunnel forwarder
            if tunnels is None:
                raise TunnelError("this worker runs no tunnels")
            spec = tunnels.wrap(job.task, a["work"], root, spec, a.get("listen_ports"), a.get("forward_addresses"))
        with job.lock:
            if job.stop_reason:
                raise _Stopped(job.stop_reason)
            job.running = executor.start(spec)
        job.set_phase("running")
        outcome: JobOutcome = job.running.wait()
        job.set_phase("stage-out")
        report.update(status=outcome.status, return_code=outcome.return_code, reason=outcome.reason or None)
        if outcome.status == "COMPLETED":
            packed = pack_results(spec.jobdir, snap, spec.stdout_path, spec.stderr_path,
                                  spool.dir_for(job.task) / "result")
            if packed is not None:
                name = packed.files[0] if not packed.zipped else "result.zip"
                report["result"] = {"sha256": packed.sha256, "size": packed.size, "name": Path(name).name,
                                    "type": "zip" if packed.zipped else "bin"}
                result_path = packed.path
    except _Stopped as stop:
        report.update(status="ABORTED", reason=str(stop))
    except (StagingError, ExecutorError, PackingError, TunnelError) as exc:
        report.update(status="ERROR", reason=f"{type(exc).__name__.replace('Error', '').lower()}: {exc}")
    except Exception as exc:  # the client failed to fetch an input, disk full, …: the work can run elsewhere
        report.update(status="ABORTED", reason=f"worker failure: {exc}")
    if tunnels is not None:
        tunnels.release(job.task)  # the job is gone: end its streams
    seconds = time.time() - job.started
    log.info("job end: task %s work %s app %s status %s rc %s after %.2f s%s", job.task, a.get("work"), app,
             report.get("status"), report.get("return_code"), seconds,
             f" ({report['reason']})" if report.get("reason") else "",
             extra={"fields": {**fields, "status": report.get("status"), "rc": report.get("return_code"),
                               "seconds": round(seconds, 3), "reason": report.get("reason")}})
    if job.discard:
        return None
    if report.get("status") == "ABORTED" and job.stop_reason:
        report["charge"] = False  # stopped by the volunteer's policy or a shutdown: not the work's fault
    return spool.commit(job.task, {k: v for k, v in report.items() if v is not None}, result_path,
                        str(job.assignment.get("work") or "") or None)


class _Stopped(Exception):
    pass
