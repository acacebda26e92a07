"""Benchmark 2, dispatch latency: one idle real worker; submit one work at a time; time to RUNNING and COMPLETED.

The worker is the real one, ``python -m xwhep.worker --config HOME/worker.conf --workdir DIR``, idle in its
long-poll when each work arrives (a short pause follows every completion). The app is a DEPLOYABLE
``#!/bin/sh`` ``exit 0``; one warm-up work (not counted) fills the worker's binary cache. Times come from the
server's event log (``work.transition`` to RUNNING and to COMPLETED, millisecond resolution), measured from the
moment the client starts its submission; the client only polls to learn when a work is done.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from xwhep.bench.common import Result, Server, Settings, Skip, percentile, rnd

KEYS = ["dispatch_p50_ms", "dispatch_p99_ms"]


def worker_available() -> str | None:
    """None when ``python -m xwhep.worker`` exists, else why not."""
    try:
        if importlib.util.find_spec("xwhep.worker.__main__") is None:
            return "worker not available: no `python -m xwhep.worker` yet"
    except ImportError as exc:
        return f"worker not available: {exc}"
    return None


def _ts(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _transitions(client: Any, uid: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for ev in client.events(uid):
        if ev.get("action") == "work.transition" and ev.get("target"):
            out.setdefault(str(ev["target"]), _ts(ev["time"]))
    return out


def _wait_done(client: Any, uid: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.work(uid)["status"])
        if status in ("COMPLETED", "ERROR", "FAILED"):
            return status
        if time.monotonic() > deadline:
            return status
        time.sleep(0.005)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _measure(srv: Server, tmp: Path, n: int) -> dict[str, Any]:
    from xwhep.client import Client

    client = Client.from_config(srv.home / "admin.conf")
    workdir, log = tmp / "worker", tmp / "worker.log"
    workdir.mkdir()
    proc: subprocess.Popen[bytes] | None = None
    try:
        script = tmp / "noop.sh"
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755)
        app = client.put_app("bench-noop", binaries={"linux/x86_64": script})["name"]
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "xwhep.worker", "--config", str(srv.home / "worker.conf"),
                                     "--workdir", str(workdir)], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + 60
        while not client.hosts():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-400:].strip()
                raise Skip(f"worker not available: it did not register (exit {proc.poll()}): {tail}")
            time.sleep(0.05)
        warm = client.submit(app)
        if _wait_done(client, warm["uid"], 60) != "COMPLETED":
            raise Skip(f"worker not available: the warm-up work did not complete: "
                       f"{log.read_text(errors='replace')[-400:].strip()}")
        running, completed, observed, failures = [], [], [], 0
        for _ in range(n):
            time.sleep(0.05)  # the worker is back in its long-poll
            t0 = time.time()
            w = client.submit(app)
            status = _wait_done(client, w["uid"], 30)
            t_seen = time.time()
            if status != "COMPLETED":
                failures += 1
                continue
            marks = _transitions(client, w["uid"])
            if "RUNNING" in marks and "COMPLETED" in marks:
                running.append(1000 * (marks["RUNNING"] - t0))
                completed.append(1000 * (marks["COMPLETED"] - t0))
                observed.append(1000 * (t_seen - t0))
        return {"works": n, "failures": failures,
                "running_p50_ms": rnd(percentile(running, 50)), "running_p99_ms": rnd(percentile(running, 99)),
                "completed_p50_ms": rnd(percentile(completed, 50)), "completed_p99_ms": rnd(percentile(completed, 99)),
                "client_observed_completed_p50_ms": rnd(percentile(observed, 50))}
    finally:
        if proc is not None:
            _stop(proc)
        client.close()


def run(settings: Settings) -> Result:
    res = Result("dispatch")
    why = worker_available()
    if why:
        return res.skip(KEYS, why)
    with tempfile.TemporaryDirectory(prefix="xwbench-dispatch-", dir=settings.workdir) as d:
        tmp = Path(d)
        srv = Server(home=tmp / "server")
        try:
            srv.start()
            out = _measure(srv, tmp, settings.dispatch_n)
        except Skip as exc:
            return res.skip(KEYS, str(exc))
        except Exception as exc:
            return res.skip(KEYS, f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            srv.stop()
    res.details.update(out)
    # dispatch: submission → RUNNING; the time to COMPLETED is in the details
    res.values["dispatch_p50_ms"] = out["running_p50_ms"]
    res.values["dispatch_p99_ms"] = out["running_p99_ms"]
    res.values["dispatch_completed_p50_ms"] = out["completed_p50_ms"]
    res.values["dispatch_completed_p99_ms"] = out["completed_p99_ms"]
    for k in KEYS:
        if res.values[k] is None:
            res.skipped[k] = f"no work completed ({out['failures']} failures)"
    return res
