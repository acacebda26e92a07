"""Whole work life cycles through the SDK acting as a worker, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import ServerProc
from sdkworker import SdkWorker, wait_status

from xwhep.client import Client, XwError


def _app(admin: Client, tmp: Path, name: str = "echo") -> str:
    prog = tmp / "prog.sh"
    prog.write_text("#!/bin/sh\necho hello\n")
    return str(admin.put_app(name, binaries={"linux/x86_64": prog})["uid"])


def _events(admin: Client, uid: str) -> list[tuple[str, str]]:
    return [(e["source"], e["target"]) for e in admin.events(uid) if e["action"] in ("work.submit", "work.transition")]


def test_full_cycle_with_result(make_server: Callable[..., ServerProc], db_url: str | None, tmp_path: Path) -> None:
    srv = make_server(db=db_url)
    admin = srv.client("admin")
    worker = SdkWorker(srv.client("worker"))
    _app(admin, tmp_path)
    work = admin.submit("echo", args="a b", label="lc")
    assert work["status"] == "PENDING" and work["uri"].startswith("xw://")
    [a] = worker.take(5, wait=2)
    assert a["work"] == work["uid"] and a["args"] == "a b" and a["app"]["binary"]["platform"] == "linux/x86_64"
    assert admin.work(work["uid"])["status"] == "RUNNING"
    assert worker.alive([a["task"]])["tasks"][a["task"]] == "continue"
    out = worker.finish(a["task"], b"hello\n", rc=3, tmp=tmp_path, upload=False)
    assert out["outcome"] == "upload"
    assert admin.work(work["uid"])["status"] == "DATAREQUEST"
    # the server asks again for the missing result in the alive reply
    assert worker.alive([], [a["task"]])["resend"] == {a["task"]: out["result"]}
    f = tmp_path / "res"
    f.write_bytes(b"hello\n")
    worker.c.upload(out["result"], f)
    w = admin.work(work["uid"])
    assert w["status"] == "COMPLETED" and w["return_code"] == 3 and w["result"] == out["result"]
    assert worker.alive([], [a["task"]])["ack"] == [a["task"]]
    # completion is idempotent: the same report again changes nothing
    again = worker.finish(a["task"], b"hello\n", rc=3, tmp=tmp_path)
    assert again["outcome"] == "done"
    assert _events(admin, work["uid"]) == [(None, "PENDING"), ("PENDING", "RUNNING"), ("RUNNING", "DATAREQUEST"),
                                           ("DATAREQUEST", "COMPLETED")]
    got = admin.fetch_result(work["uid"], tmp_path)
    assert got.read_bytes() == b"hello\n"


def test_lost_then_pending_then_error(make_server: Callable[..., ServerProc], db_url: str | None,
                                      tmp_path: Path) -> None:
    srv = make_server(db=db_url, args=["--alive-timeout", "1", "--alive-period", "0.5"])
    admin = srv.client("admin")
    _app(admin, tmp_path)
    work = admin.submit("echo", max_retries=1)
    silent = SdkWorker(srv.client("worker"), "silent")
    [a] = silent.take(1, wait=2)
    # the host falls silent: the reaper turns the task LOST and the work back to PENDING, retry 1
    wait_status(admin, work["uid"], {"PENDING"})
    w = admin.work(work["uid"])
    assert w["retries"] == 1
    # the stale attempt is refused and told to stop
    assert silent.alive([a["task"]])["tasks"][a["task"]] == "stop"
    assert silent.finish(a["task"], None)["outcome"] == "stale"
    [b] = silent.take(1, wait=2)
    assert b["trial"] == 2
    wait_status(admin, work["uid"], {"ERROR"})  # silent again, past max retries
    w = admin.work(work["uid"])
    assert "max retries" in w["reason"]
    moves = _events(admin, work["uid"])
    assert ("RUNNING", "LOST") in moves and ("LOST", "PENDING") in moves and ("LOST", "ERROR") in moves
    tasks = admin.tasks(work["uid"])
    assert [t["status"] for t in tasks] == ["LOST", "LOST"]


def test_alive_keeps_task(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server(args=["--alive-timeout", "1.5", "--alive-period", "0.3"])
    admin = srv.client("admin")
    _app(admin, tmp_path)
    work = admin.submit("echo")
    w = SdkWorker(srv.client("worker"))
    [a] = w.take(1, wait=2)
    reaped = SdkWorker(srv.client("worker"), "other")
    other = admin.submit("echo")
    [b] = reaped.take(1, wait=2)
    assert b["work"] == other["uid"]
    # keep one task alive while the other falls silent; the silent one proves the reaper ran meanwhile
    import time

    deadline = time.monotonic() + 20
    while admin.work(other["uid"])["status"] != "PENDING":
        assert w.alive([a["task"]])["tasks"][a["task"]] == "continue"
        assert time.monotonic() < deadline, "the reaper never ran"
        time.sleep(0.3)  # the alive period
    assert admin.work(work["uid"])["status"] == "RUNNING"
    assert w.finish(a["task"], None)["outcome"] == "done"
    assert admin.work(work["uid"])["status"] == "COMPLETED"


def test_replicas_go_to_distinct_hosts(make_server: Callable[..., ServerProc], db_url: str | None,
                                       tmp_path: Path) -> None:
    srv = make_server(db=db_url)
    admin = srv.client("admin")
    _app(admin, tmp_path)
    master = admin.submit("echo", replicas=3)
    ws = [SdkWorker(srv.client("worker"), f"h{i}") for i in range(3)]
    first = ws[0].take(5, wait=1)
    assert len(first) == 1, "one host gets one replica only"
    seconds = ws[1].take(5, wait=1)
    thirds = ws[2].take(5, wait=1)
    assert len(seconds) == 1 and len(thirds) == 1
    assert len({first[0]["work"], seconds[0]["work"], thirds[0]["work"]}) == 3
    by_work = {x["work"]: (w, x) for w, x in zip(ws, [first[0], seconds[0], thirds[0]], strict=True)}
    mw, ma = by_work.pop(master["uid"])
    assert mw.finish(ma["task"], None)["outcome"] == "done"
    assert admin.work(master["uid"])["status"] == "REPLICATING"
    for w, x in by_work.values():
        w.finish(x["task"], None)
    assert admin.work(master["uid"])["status"] == "COMPLETED"


def test_abort_requeues_and_failed_is_final(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client("admin")
    _app(admin, tmp_path)
    work = admin.submit("echo", wallclock=5, max_retries=1)
    w = SdkWorker(srv.client("worker"))
    [a] = w.take(1, wait=1)
    # the volunteer took the machine back: requeued, no retry charged
    w.c.report(w.host, [{"task": a["task"], "status": "ABORTED", "reason": "worker deactivated", "charge": False}])
    w2 = admin.work(work["uid"])
    assert w2["status"] == "PENDING" and w2["retries"] == 0
    [a2] = w.take(1, wait=1)
    assert a2["trial"] == 2, "every attempt has its own trial number"
    # a failure on the worker's side counts against max retries
    w.finish(a2["task"], None, status="ABORTED", reason="worker failure: disk full")
    assert admin.work(work["uid"])["retries"] == 1
    [b] = w.take(1, wait=1)
    w.finish(b["task"], None, status="FAILED", reason="wall-clock limit exceeded (5 s)")
    w3 = admin.work(work["uid"])
    assert w3["status"] == "FAILED" and "wall-clock" in w3["reason"]
    assert ("ABORTED", "PENDING") in _events(admin, work["uid"])


def test_unavailable_until_input_arrives(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client("admin")
    _app(admin, tmp_path)
    f = tmp_path / "in.txt"
    f.write_bytes(b"input\n")
    import hashlib

    d = admin.create_data("in.txt", f.stat().st_size, hashlib.sha256(b"input\n").hexdigest())
    work = admin.submit("echo", stdin=d["uid"])
    assert work["status"] == "UNAVAILABLE"
    w = SdkWorker(srv.client("worker"))
    assert w.take(1) == []
    admin.upload(d["uid"], f)
    assert admin.work(work["uid"])["status"] == "PENDING"
    [a] = w.take(1, wait=1)
    assert a["stdin"]["sha256"] == hashlib.sha256(b"input\n").hexdigest()
    # the worker may download what its task needs
    out = tmp_path / "got"
    w.c.download(a["stdin"]["uid"], out)
    assert out.read_bytes() == b"input\n"


def test_illegal_transition_and_stale(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client("admin")
    _app(admin, tmp_path)
    work = admin.submit("echo")
    w = SdkWorker(srv.client("worker"))
    [a] = w.take(1, wait=1)
    w.finish(a["task"], None)
    with pytest.raises(XwError) as err:
        admin.cancel(work["uid"])  # COMPLETED is final
    assert err.value.status == 409 and "COMPLETED" in err.value.message
    # another host cannot report this task
    intruder = SdkWorker(srv.client("worker"), "intruder")
    assert intruder.finish(a["task"], None)["outcome"] == "stale"


def test_aborts_are_bounded_by_max_retries(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client("admin")
    _app(admin, tmp_path)
    work = admin.submit("echo", max_retries=2)
    w = SdkWorker(srv.client("worker"))
    for _ in range(3):
        [a] = w.take(1, wait=1)
        w.finish(a["task"], None, status="ABORTED", reason="worker failure: cannot fetch input")
    final = admin.work(work["uid"])
    assert final["status"] == "ERROR" and "max retries" in final["reason"] and "cannot fetch" in final["reason"]
    assert w.take(1) == []
