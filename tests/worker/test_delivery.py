"""Delivering results from a real worker process: the defects of issue 13 §1, each through the real thing.

A real server process, real workers, real sandboxes; the server is stopped and started again on the same home
and port. Gate jobs (``workerproc.GATE_APP``) hold a job "in the middle" until the test opens the gate, so no test
depends on how long anything takes. Every server here has a long alive timeout unless the test is about the
reaper, so that a work given back "at once" cannot have been given back by the reaper.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import ServerProc
from sdkworker import wait_for, wait_status
from workerproc import GATE_APP, WorkerProc, put_app, release, running_task

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.timeout(180),
]

SLOW_REAPER = ["--alive-period", "0.5", "--alive-timeout", "120"]
FINAL = {"COMPLETED", "ERROR", "FAILED"}


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    """Start real workers (``workers(server, "name", pool=…, sections=…)``); all are stopped afterwards."""
    started: list[WorkerProc] = []

    def start(server: ServerProc, name: str, **kw: Any) -> WorkerProc:
        w = WorkerProc(server, tmp_path / name, **kw).start()
        started.append(w)
        w.wait_status(lambda s: bool(s.get("host")), 30, "the worker to register")
        return w

    yield start
    for w in started:
        if w.running():
            w.kill9()


def spool_report(worker: WorkerProc, task: str) -> Path:
    return worker.workdir / "spool" / task / "report.json"


def result_text(server: ServerProc, uid: str, out: Path) -> str:
    """The gate job's result.txt, from the work's result (a zip: the job also left started.txt and go)."""
    out.mkdir(parents=True, exist_ok=True)
    with server.client() as c:
        path = c.fetch_result(uid, out)
    with zipfile.ZipFile(path) as z:
        return z.read("result.txt").decode()


def status_text(worker: WorkerProc) -> str:
    out = subprocess.run([sys.executable, "-m", "xwhep.worker", "status", "--workdir", str(worker.workdir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_delivery_never_dies_when_spool_entry_vanishes(make_server: Callable[..., ServerProc],
                                                       workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    # Issue 13 §1: two threads handled one spool entry, one removed it under the other, whose upload then failed
    # with FileNotFoundError; the delivery thread caught only XwError and died: no result was delivered again.
    # Here the entry's result file vanishes for real before its upload (as under the other thread's removal).
    server = make_server(args=SLOW_REAPER)
    c = server.client()
    worker = workers(server, "w", pool=2)
    app = put_app(c, tmp_path, "gate", GATE_APP)
    uids = [str(c.submit(app, args=name)["uid"]) for name in ("one", "two")]
    tasks = {running_task(worker, uid): uid for uid in uids}
    # the old delivery thread went through the spool in this order: the first entry is the one that vanishes
    (gone_task, gone), (kept_task, kept) = sorted(tasks.items())
    server.stop()
    for task in tasks:
        release(worker, task)
    for task in tasks:
        wait_for(spool_report(worker, task).exists, 30, f"task {task}'s report in the spool")
    (worker.workdir / "spool" / gone_task / "result").unlink()
    server.start()

    # the other result is delivered; the vanished one is given up, with the reason shown, and the worker runs on
    assert wait_status(c, kept, FINAL, timeout=30) == "COMPLETED"
    assert (c.work(kept)["task"], c.work(kept)["retries"]) == (kept_task, 0)
    expected = f"finished: {'one' if kept == uids[0] else 'two'}\n"
    assert result_text(server, kept, tmp_path / "out") == expected
    st = worker.wait_status(lambda s: any(a["task"] == gone_task for a in s["abandoned"]), 30,
                            "the vanished result to be given up")
    [abandoned] = st["abandoned"]
    assert abandoned["work"] == gone and "No such file" in abandoned["reason"], abandoned
    assert f"result of work {gone} (task {gone_task}) given up" in status_text(worker)
    assert worker.running() and not spool_report(worker, gone_task).exists()
    assert c.work(gone)["status"] == "DATAREQUEST"  # promised, never to come: the worker no longer holds it

    # so the server's reaper declares that attempt LOST and the work runs again (a short alive timeout now)
    server.stop()
    server.args = ["--alive-period", "0.5", "--alive-timeout", "3"]
    server.start()
    again = running_task(worker, gone, timeout=60)
    assert again != gone_task
    release(worker, again)
    assert wait_status(c, gone, FINAL, timeout=30) == "COMPLETED"
    w = c.work(gone)
    assert w["retries"] == 1 and w["task"] == again
    assert result_text(server, gone, tmp_path / "out2") == f"finished: {'one' if gone == uids[0] else 'two'}\n"
    c.close()


def test_clean_stop_sends_aborted_reports_before_exiting(make_server: Callable[..., ServerProc],
                                                         workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    # Issue 13 §1: on SIGTERM the ABORTED reports stayed in the spool; the works sat RUNNING until the reaper
    # charged a retry. Now they are sent before the process exits: the work is PENDING at once, uncharged.
    server = make_server(args=SLOW_REAPER)
    c = server.client()
    worker = workers(server, "w", pool=1)
    uid = str(c.submit(put_app(c, tmp_path, "gate", GATE_APP), args="x")["uid"])
    task = running_task(worker, uid)
    t0 = time.monotonic()
    assert worker.stop(timeout=20) == 0
    assert time.monotonic() - t0 < 10, worker.log_tail()
    w = c.work(uid)  # right away: not after the (120 s) alive timeout
    assert (w["status"], w["retries"], w["task"]) == ("PENDING", 0, None), w
    [t] = c.tasks(uid)
    assert (t["uid"], t["status"]) == (task, "ABORTED") and "shutting down" in t["reason"], t
    assert not (worker.workdir / "spool" / task).exists()  # delivered, so dropped
    assert not (worker.workdir / "jobs" / task).exists()
    assert json.loads((worker.workdir / "status.json").read_text())["idle_reason"] == "stopped"
    c.close()


def test_clean_stop_with_the_server_down_keeps_the_report_for_the_next_start(
        make_server: Callable[..., ServerProc], workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    server = make_server(args=SLOW_REAPER)
    c = server.client()
    sections = {"worker": {"stop_timeout_s": 2}}
    worker = workers(server, "w", pool=1, sections=sections)
    uid = str(c.submit(put_app(c, tmp_path, "gate", GATE_APP), args="later")["uid"])
    task = running_task(worker, uid)
    server.stop()
    t0 = time.monotonic()
    assert worker.stop(timeout=20) == 0
    assert time.monotonic() - t0 < 2 + 5, worker.log_tail()  # gives up after stop_timeout_s
    report = json.loads(spool_report(worker, task).read_text())["report"]
    assert (report["status"], report["charge"]) == ("ABORTED", False) and "shutting down" in report["reason"]

    server.start()
    again = WorkerProc(server, worker.root, pool=1, sections=sections).start()  # same workdir: its spool
    try:
        task2 = running_task(again, uid, timeout=60)  # the report went first: the work was PENDING again
        assert task2 != task
        tasks = {t["uid"]: t for t in c.tasks(uid)}
        assert tasks[task]["status"] == "ABORTED" and c.work(uid)["retries"] == 0
        release(again, task2)
        assert wait_status(c, uid, FINAL, timeout=30) == "COMPLETED"
        assert result_text(server, uid, tmp_path / "out") == "finished: later\n"
        assert c.work(uid)["retries"] == 0
    finally:
        again.stop()
    c.close()


def test_status_shows_each_failing_delivery_and_why(make_server: Callable[..., ServerProc],
                                                    workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    server = make_server(args=SLOW_REAPER)
    c = server.client()
    worker = workers(server, "w", pool=1, sections={"worker": {"retry_max_s": 1}})
    uid = str(c.submit(put_app(c, tmp_path, "gate", GATE_APP), args="s")["uid"])
    task = running_task(worker, uid)
    server.stop()
    release(worker, task)
    st = worker.wait_status(lambda s: any(d["attempts"] >= 2 and not d["in_flight"] for d in s["deliveries"]),
                            30, "a delivery failing twice")
    [d] = st["deliveries"]
    assert (d["task"], d["work"], d["step"]) == (task, uid, "report"), d
    assert "cannot reach server" in d["last_error"], d
    assert time.time() - 1 <= d["next_retry"] <= time.time() + 2, d  # back-off capped at retry_max_s
    assert st["results_pending"] == 1 and st["idle_reason"].startswith("server unreachable"), st
    text = status_text(worker)
    assert f"report of work {uid} (task {task}) failing: server unreachable: cannot reach server" in text, text
    assert "attempt(s), next" in text

    server.start()
    assert wait_status(c, uid, FINAL, timeout=30) == "COMPLETED"
    st = worker.wait_status(lambda s: s["deliveries"] == [], 30, "the delivery to go through")
    assert st["abandoned"] == [] and "failing" not in status_text(worker)
    assert result_text(server, uid, tmp_path / "out") == "finished: s\n"
    c.close()
