"""The dashboard's read-only summaries: counts, history, a host's record, a work's logs, each with the caller's
rights (on SQLite and PostgreSQL: the history's bucketing is dialect-specific SQL)."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import ServerProc
from sdkworker import SdkWorker

from xwhep.client import Client, XwError
from xwhep.server.services import logs

PASSWORD = "a long enough password"


def _grid(srv: ServerProc, tmp: Path) -> tuple[Client, Client, Client, str]:
    admin = srv.client()
    for name in ("alice", "bob"):
        admin.create_user(name, password=PASSWORD)
    script = tmp / "app.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    admin.put_app("statsapp", binaries={"linux/x86_64": script}, access_rights="0x755")
    alice = Client(srv.url, ca=str(srv.ca), login="alice", password=PASSWORD)
    bob = Client(srv.url, ca=str(srv.ca), login="bob", password=PASSWORD)
    return admin, alice, bob, "statsapp"


def test_summaries_count_only_what_the_caller_may_read(make_server: Callable[..., ServerProc], db_url: str | None,
                                                       tmp_path: Path) -> None:
    srv = make_server(db_url)
    admin, alice, bob, app = _grid(srv, tmp_path)
    group = alice.create_bag("group", "alice-bag")
    mine = alice.submit_bag([{"app": app, "args": str(i), "group": group["uid"], "label": "in-bag"} for i in range(3)]
                            + [{"app": app, "label": "loose"} for _ in range(2)])
    bob.submit(app, label="bobs")
    w = SdkWorker(admin, "statshost")
    mine_uids = {x["uid"] for x in mine}
    taken = [a for a in w.take(6) if a["work"] in mine_uids]
    while len(taken) < 3:
        taken += [a for a in w.take(6) if a["work"] in mine_uids]
    w.finish(taken[0]["task"])
    w.finish(taken[1]["task"])
    w.finish(taken[2]["task"], status="ERROR", rc=1, reason="boom")

    sa = alice._json("GET", "/stats")
    assert sa["total"] == 5
    assert sa["works"].get("COMPLETED") == 2 and sa["works"].get("ERROR") == 1
    [bag] = [b for b in sa["bags"] if b["uid"] == group["uid"]]
    assert bag["total"] == 3 and bag["kind"] == "group" and bag["label"] == "alice-bag"
    sb = bob._json("GET", "/stats")
    assert sb["total"] == 1 and not sb["works"].get("COMPLETED")
    assert all(b["uid"] != group["uid"] for b in sb["bags"])
    assert alice._json("GET", "/stats", params={"group": group["uid"]})["total"] == 3
    by_label = alice._json("GET", "/stats", params={"by": "label"})["labels"]
    assert {x["label"]: x["total"] for x in by_label} == {"in-bag": 3, "loose": 2}
    assert admin._json("GET", "/stats")["total"] == 6

    h = alice._json("GET", "/stats/history", params={"window": 600, "step": 5})
    assert len(h["times"]) == 120 and h["times"][1] - h["times"][0] == 5
    last = {st: v[-1] for st, v in h["status"].items()}
    assert {k: v for k, v in last.items() if v} == {k: v for k, v in sa["works"].items() if v}
    assert all(v[0] == 0 for v in h["status"].values())  # ten minutes ago none of these works existed
    assert sum(h["finished"]["COMPLETED"]) == 2 and sum(h["finished"]["ERROR"]) == 1
    hb = bob._json("GET", "/stats/history", params={"window": 600, "step": 5})
    assert sum(hb["finished"]["COMPLETED"]) == 0 and sum(v[-1] for v in hb["status"].values()) == 1
    day = alice._json("GET", "/stats/history", params={"window": 86400, "step": 1})
    assert day["step"] == 87 and len(day["times"]) <= 1000  # at most 1,000 buckets: the step used says so
    assert sum(day["finished"]["COMPLETED"]) == 2
    with pytest.raises(XwError) as bad:
        alice._json("GET", "/stats/history", params={"window": 600, "step": 0.5})
    assert bad.value.status == 400 and bad.value.field == "step"

    rec = admin._json("GET", f"/hosts/{w.host}/stats")
    assert rec["done"] == 2 and rec["failed"] == 1 and len(rec["recent"]) >= 3
    for other in (alice, bob):  # not their host: no record, no existence
        with pytest.raises(XwError) as refused:
            other._json("GET", f"/hosts/{w.host}/stats")
        assert refused.value.status == 404

    pending = alice.submit(app, label="later")["uid"]
    assert alice._json("GET", f"/works/{pending}/logs")["note"] == "no result yet"
    with pytest.raises(XwError) as refused:
        bob._json("GET", f"/works/{pending}/logs")
    assert refused.value.status == 404
    t = alice._json("GET", "/stats/tunnels")
    assert t == {"proxies": [], "works": []}
    assert "relay" in admin._json("GET", "/stats/tunnels")


def test_logs_pick_the_captured_streams_and_keep_their_end(tmp_path: Path) -> None:
    result = tmp_path / "r.zip"
    with zipfile.ZipFile(result, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("stdout.txt", "the job's own file\n")  # the job wrote a stdout.txt itself
        zf.writestr("out/data.bin", b"\0" * 10)
        zf.writestr("xw-stdout.txt", "x" * (logs.TAIL + 100) + "THE END\n")  # the captured stream moved aside
        zf.writestr("stderr.txt", "warning\n")
    out = logs.read({"work": "w", "status": "COMPLETED", "result": "d", "type": "zip", "name": "result.zip"}, result)
    assert out["stdout"]["name"] == "xw-stdout.txt"
    assert out["stdout"]["text"].endswith("THE END\n") and len(out["stdout"]["text"]) == logs.TAIL
    assert out["stdout"]["truncated"] is True
    assert out["stderr"] == {"name": "stderr.txt", "text": "warning\n", "size": 8, "truncated": False}
    assert [f["name"] for f in out["files"]] == ["stdout.txt", "out/data.bin", "xw-stdout.txt", "stderr.txt"]
    lone = tmp_path / "blob"
    lone.write_text("only stderr\n")
    one = logs.read({"work": "w", "status": "COMPLETED", "result": "d", "type": "txt", "name": "stderr.txt"}, lone)
    assert one["stderr"]["text"] == "only stderr\n" and one["stdout"] is None
    other = logs.read({"work": "w", "status": "COMPLETED", "result": "d", "type": "bin", "name": "out.txt"}, lone)
    assert other["stdout"] is None and other["stderr"] is None and other["files"][0]["name"] == "out.txt"
