"""The workers' one-call round trip ``/hosts/{uid}/sync`` (reports + alive + request in one transaction), served
below FastAPI by the fast path: life cycle, long-poll, deactivation and bad input, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cluster import ServerProc
from sdkworker import SdkWorker, wait_status

from xwhep.client import Client, XwError


def _noop(admin: Client, tmp: Path) -> None:
    prog = tmp / "noop.sh"
    prog.write_text("#!/bin/sh\n")
    admin.put_app("noop", binaries={"linux/x86_64": prog})


def _transitions(admin: Client, uid: str) -> list[tuple[str, str]]:
    return [(e["source"], e["target"]) for e in admin.events(uid) if e["action"] in ("work.submit", "work.transition")]


def test_round_trips_report_and_claim_in_one_call(make_server: Callable[..., ServerProc], db_url: str | None,
                                                  tmp_path: Path) -> None:
    srv = make_server(db=db_url)
    admin = srv.client("admin")
    _noop(admin, tmp_path)
    w = SdkWorker(srv.client("worker"))
    bag = admin.submit_bag([{"app": "noop", "args": str(i)} for i in range(5)])
    first = w.c.sync(w.host, max=2)
    assert first["reports"] == [] and len(first["works"]) == 2
    running = [a["task"] for a in first["works"]]
    # report both and ask for three more, in one call
    second = w.c.sync(w.host, reports=[{"task": t, "status": "COMPLETED", "return_code": 0} for t in running],
                      max=3)
    assert [r["outcome"] for r in second["reports"]] == ["done", "done"]
    assert len(second["works"]) == 3
    done = {a["work"] for a in first["works"]}
    assert {x["uid"] for x in admin.works(status="COMPLETED")} == done
    assert {a["work"] for a in second["works"]}.isdisjoint(done)
    # alive in the same call: running tasks continue, an unknown one is told to stop
    third = w.c.sync(w.host, tasks=[a["task"] for a in second["works"]] + ["00000000-0000-4000-8000-000000000000"])
    assert third["works"] == [] and third["reports"] == []
    assert list(third["tasks"].values()).count("continue") == 3
    assert third["tasks"]["00000000-0000-4000-8000-000000000000"] == "stop"
    # the same report again is idempotent; a failure and a result upload go through the state graph
    a, b, c = second["works"]
    out = w.c.sync(w.host, reports=[
        {"task": running[0], "status": "COMPLETED", "return_code": 0},
        {"task": a["task"], "status": "FAILED", "return_code": 2, "reason": "boom"},
        {"task": b["task"], "status": "COMPLETED", "return_code": 0,
         "result": {"sha256": hashlib.sha256(b"out\n").hexdigest(), "size": 4, "name": "out.txt"}}],
        tasks=[c["task"]])
    assert [r["outcome"] for r in out["reports"]] == ["done", "done", "upload"]
    assert out["tasks"] == {c["task"]: "continue"}
    assert admin.work(a["work"])["status"] == "FAILED"
    assert admin.work(b["work"])["status"] == "DATAREQUEST"
    f = tmp_path / "out"
    f.write_bytes(b"out\n")
    w.c.upload(out["reports"][2]["result"], f)
    held = w.c.sync(w.host, results=[b["task"]])
    assert held["ack"] == [b["task"]]
    assert _transitions(admin, first["works"][0]["work"]) == [(None, "PENDING"), ("PENDING", "RUNNING"),
                                                              ("RUNNING", "COMPLETED")]
    assert len({x["uid"] for x in bag}) == 5


def test_long_poll_wakes_on_submission_and_reports_are_not_held(make_server: Callable[..., ServerProc],
                                                                tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client("admin")
    _noop(admin, tmp_path)
    w = SdkWorker(srv.client("worker"))
    got: dict[str, Any] = {}
    entered = threading.Event()

    def poll() -> None:
        entered.set()
        got.update(w.c.sync(w.host, max=1, wait=30))

    t = threading.Thread(target=poll)
    t.start()
    entered.wait()
    work = admin.submit("noop")
    t.join(timeout=25)
    assert not t.is_alive(), "the long-poll did not return when a matching work arrived"
    [a] = got["works"]
    assert a["work"] == work["uid"]
    # a report with max > 0 and nothing pending: committed before the long-poll waits
    reporter: dict[str, Any] = {}
    rt = threading.Thread(target=lambda: reporter.update(w.c.sync(
        w.host, reports=[{"task": a["task"], "status": "COMPLETED", "return_code": 0}], max=1, wait=30)))
    rt.start()
    try:
        wait_status(admin, work["uid"], {"COMPLETED"}, timeout=20)
        assert rt.is_alive(), "the call should still be waiting for new works"
        nxt = admin.submit("noop")
        rt.join(timeout=25)
        assert not rt.is_alive()
        assert reporter["reports"] == [{"task": a["task"], "outcome": "done"}]
        assert [x["work"] for x in reporter["works"]] == [nxt["uid"]]
    finally:
        rt.join(timeout=30)


def test_inactive_worker_gets_nothing(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client("admin")
    _noop(admin, tmp_path)
    work = admin.submit("noop")
    w = SdkWorker(srv.client("worker"))
    out = w.c.sync(w.host, active=False, max=4, wait=0.2)
    assert out["works"] == []
    assert admin.work(work["uid"])["status"] == "PENDING"
    [a] = w.c.sync(w.host, max=4)["works"]
    assert a["work"] == work["uid"]


def _post(client: Client, path: str, content: bytes, token: bool = True) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **(client._auth_header() if token else {})}
    r = client.http.post(client.base + path, content=content, headers=headers)
    return r.status_code, r.json()


BAD_BODIES = [
    (b"{not json", "body"),
    (b"[]", "body"),
    (b'{"max": -1}', "max"),
    (b'{"max": 1, "wait": "soon"}', "wait"),
    (b'{"reports": [{"status": "COMPLETED"}]}', "reports.0.task"),
    (b'{"reports": [{"task": "01a241e3-30b6-722c-98f0-60fc86015b41", "bogus": 1}]}', "reports.0.bogus"),
    (b'{"reports": [{"task": "not-a-uid"}]}', "reports.0.task"),
    (b'{"tasks": "abc"}', "tasks"),
]


def test_bad_sync_bodies_name_the_field(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    w = SdkWorker(srv.client("worker"))
    for body, field in BAD_BODIES:
        code, out = _post(w.c, f"/hosts/{w.host}/sync", body)
        assert code == 400, (body, out)
        assert out["field"] == field and field in out["error"], (body, out)


def test_sync_refuses_strangers_and_oversized_bodies(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client("admin")
    _noop(admin, tmp_path)
    w = SdkWorker(srv.client("worker"))
    code, out = _post(w.c, f"/hosts/{w.host}/sync", b"{}", token=False)
    assert code == 401 and "authentication required" in out["error"]
    code, out = _post(w.c, "/hosts/00000000-0000-4000-8000-000000000000/sync", b"{}")
    assert code == 404
    admin.submit("noop")
    # another worker identity cannot drive this host, take its works or report for it: 404, no existence leak
    admin.create_user("worker2", "worker2-password", "WORKER_USER")
    other = Client(srv.url, ca=str(srv.ca), login="worker2", password="worker2-password")
    code, out = _post(other, f"/hosts/{w.host}/sync", b'{"max": 1}')
    assert code == 404 and w.host in out["error"]
    # over the JSON body limit (64 MiB): refused while reading, before anything is parsed
    code, out = _post(w.c, f"/hosts/{w.host}/sync", b'{"tasks": ["' + b"a" * (65 << 20) + b'"]}')
    assert code == 413 and "over" in out["error"]
    # the same errors through the SDK: one readable message
    with pytest.raises(XwError) as err:
        w.c.sync("00000000-0000-4000-8000-000000000000")
    assert err.value.status == 404
    # nothing above took the pending work
    assert len(admin.works(status="PENDING")) == 1


def test_sync_is_in_the_openapi_schema(make_server: Callable[..., ServerProc]) -> None:
    srv = make_server()
    c = srv.client("admin")
    spec = c.http.get(c.server + "/openapi.json").json()
    assert "post" in spec["paths"]["/api/v1/hosts/{uid}/sync"]


def test_a_refused_call_loses_no_work(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    """Works picked for a call that is then refused (a malformed report in the same call) go straight back to
    the scheduler: the next call gets them, without waiting for a rebuild of the index."""
    srv = make_server()
    admin = srv.client("admin")
    _noop(admin, tmp_path)
    first, second = admin.submit_bag([{"app": "noop"}, {"app": "noop"}])
    w = SdkWorker(srv.client("worker"))
    [a] = w.c.sync(w.host, max=1)["works"]
    bad = b'{"max": 1, "reports": [{"task": "%s", "status": "DONE"}]}' % a["task"].encode()
    code, out = _post(w.c, f"/hosts/{w.host}/sync", bad)
    assert code == 400 and out["field"] == "reports.0.status", out
    other = second if a["work"] == first["uid"] else first
    assert admin.work(other["uid"])["status"] == "PENDING"
    assert admin.work(a["work"])["status"] == "RUNNING"  # the refused report changed nothing either
    [b] = w.c.sync(w.host, max=1)["works"]
    assert b["work"] == other["uid"]
