"""20 parallel requesters, 2,000 works: every work dispatched exactly once (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cluster import ServerProc
from sdkworker import SdkWorker

N_WORKS = 2000
N_REQUESTERS = 20


@pytest.mark.parametrize("protocol", ["split", "sync"])
def test_every_work_dispatched_exactly_once(make_server: Callable[..., ServerProc], db_url: str | None,
                                            tmp_path: Path, protocol: str) -> None:
    """``split``: request + reports calls; ``sync``: one call per round, reports and claims in one transaction
    (on SQLite, calls of one event-loop turn also share a transaction: group commit with savepoints)."""
    srv = make_server(db=db_url)
    admin = srv.client("admin")
    prog = tmp_path / "noop.sh"
    prog.write_text("#!/bin/sh\n")
    admin.put_app("noop", binaries={"linux/x86_64": prog})
    submitted = admin.submit_bag([{"app": "noop", "args": str(i)} for i in range(N_WORKS)])
    assert len(submitted) == N_WORKS
    workers = [SdkWorker(srv.client("worker"), f"h{i}") for i in range(N_REQUESTERS)]

    def drain(w: SdkWorker) -> list[str]:
        got: list[str] = []
        done: list[dict[str, object]] = []
        while True:
            if protocol == "sync":
                reply = w.c.sync(w.host, reports=done, max=7, wait=0.2)
                assert all(r["outcome"] == "done" for r in reply["reports"])
                batch = reply["works"]
                done = []
            else:
                batch = w.take(7, wait=0.2)
            if not batch:
                return got
            for a in batch:  # half of them complete at once, so claims and reports interleave
                got.append(a["work"])
                if len(got) % 2:
                    if protocol == "sync":
                        done.append({"task": a["task"], "status": "COMPLETED", "return_code": 0})
                    else:
                        w.finish(a["task"], None)

    with ThreadPoolExecutor(N_REQUESTERS) as pool:
        results = list(pool.map(drain, workers))
    counts = Counter(uid for r in results for uid in r)
    assert sum(counts.values()) == N_WORKS, "a work was handed out twice or never"
    assert set(counts) == {w["uid"] for w in submitted}
    assert max(counts.values()) == 1
    assert sum(1 for r in results if r) > 1, "the load was not shared"
    # the server agrees: one task per work, nothing left pending
    assert admin.works(status="PENDING") == []
    statuses = Counter(w["status"] for w in admin.works())
    assert statuses["RUNNING"] + statuses["COMPLETED"] == N_WORKS
