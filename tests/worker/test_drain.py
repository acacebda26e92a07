"""Acceptance of issue 13 §1 with real processes: bags of short works drain on three real workers (pools 3, 3
and 2), also while the server is killed -9 again and again and once kept down; 0 lost, 0 wrong, 0 duplicate.

The issue's run was 1,000 works of 0.05-0.3 s; here a few hundred (the same shape, sized for CI on 2 cores). Each
work sleeps for its own time (from its arguments) and writes its index, so every result can be checked. A stall
(the defect: counts frozen for good) fails at once: no work may go more than ``STALL_S`` without another one
ending, except while the test itself keeps the server down.
"""

from __future__ import annotations

import collections
import hashlib
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import ServerProc
from workerproc import WorkerProc, drain, put_app

from xwhep.client import Client

pytestmark = [pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")]

POOLS = (3, 3, 2)
STALL_S = 20.0  # far above any work (0.3 s) and any back-off of a worker (retry_max_s below)
SHORT = """#!/bin/sh
sleep "$2"
echo "work $1" > out.txt
"""


def expected(i: int) -> str:
    return hashlib.sha256(f"work {i}\n".encode()).hexdigest()


@pytest.fixture
def three_workers(tmp_path: Path) -> Iterator[Callable[..., list[WorkerProc]]]:
    started: list[WorkerProc] = []

    def start(server: ServerProc, **sections: Any) -> list[WorkerProc]:
        for i, pool in enumerate(POOLS):
            w = WorkerProc(server, tmp_path / f"w{i}", pool=pool, sections={"worker": dict(sections)}).start()
            started.append(w)
        for w in started:
            w.wait_status(lambda s: bool(s.get("host")), 30, "the worker to register")
        return started

    yield start
    for w in started:
        w.stop()


def submit(c: Client, tmp: Path, n: int, seed: int) -> tuple[dict[str, int], float]:
    """A bag of ``n`` works sleeping 0.05-0.3 s each; returns uid → index and the total sleep."""
    app = put_app(c, tmp, "short", SHORT)
    rnd = random.Random(seed)
    sleeps = [round(rnd.uniform(0.05, 0.3), 2) for _ in range(n)]
    out = c.submit_bag([{"app": app, "args": f"{i} {s}"} for i, s in enumerate(sleeps)])
    return {w["uid"]: i for i, w in enumerate(out)}, sum(sleeps)


def check_bag(c: Client, index: dict[str, int], tmp: Path) -> None:
    """0 lost (all COMPLETED), 0 wrong (each result is its own work's), 0 duplicate (one completion each)."""
    works = {uid: c.work(uid) for uid in index}
    lost = {uid: w["status"] for uid, w in works.items() if w["status"] != "COMPLETED"}
    assert not lost, f"{len(lost)} work(s) not COMPLETED: {list(lost.items())[:5]}"
    wrong = [uid for uid, w in works.items() if w.get("result_sha256") != expected(index[uid])]
    assert not wrong, f"{len(wrong)} wrong result(s), e.g. {works[wrong[0]]}"
    tmp.mkdir(parents=True, exist_ok=True)
    for uid in list(index)[:: max(1, len(index) // 10)]:  # and the bytes themselves, for a sample
        assert c.fetch_result(uid, tmp).read_text() == f"work {index[uid]}\n"
    completions = collections.Counter(e["object"] for e in c.events(limit=100_000)
                                      if e["action"] == "work.transition" and e["target"] == "COMPLETED")
    twice = {uid: n for uid, n in completions.items() if uid in index and n != 1}
    assert not twice and all(uid in completions for uid in index), f"completed twice: {twice}"
    done_tasks = collections.Counter(t["work"] for uid in index for t in c.tasks(uid) if t["status"] == "COMPLETED")
    assert set(done_tasks.values()) == {1} and len(done_tasks) == len(index)


@pytest.mark.timeout(300)
def test_hundreds_of_short_works_drain_on_three_workers(make_server: Callable[..., ServerProc],
                                                        three_workers: Callable[..., list[WorkerProc]],
                                                        tmp_path: Path) -> None:
    server = make_server(args=["--alive-period", "1", "--alive-timeout", "10"])
    c = server.client()
    workers = three_workers(server)
    index, total_sleep = submit(c, tmp_path, 400, seed=13)
    t0 = time.monotonic()
    # a bound from the work: its sleep spread over the slots, four times over, plus 0.1 s per work of overhead
    bound = 4 * total_sleep / sum(POOLS) + 0.1 * len(index)
    drain(c, list(index), STALL_S, bound)
    took = time.monotonic() - t0
    check_bag(c, index, tmp_path / "out")
    assert all(w.running() for w in workers)
    print(f"\n{len(index)} works drained in {took:.1f} s (bound {bound:.0f} s)")
    c.close()


@pytest.mark.timeout(300)
def test_bag_survives_server_kill9_and_an_outage(db_url: str | None, make_server: Callable[..., ServerProc],
                                                 three_workers: Callable[..., list[WorkerProc]],
                                                 tmp_path: Path) -> None:
    alive_timeout = 10.0
    retry_cap = 1.5  # the workers' back-off cap; the outage below is longer than both
    server = make_server(db=db_url, args=["--alive-period", "0.5", "--alive-timeout", str(alive_timeout)])
    c = server.client()
    workers = three_workers(server, retry_max_s=retry_cap)
    index, _ = submit(c, tmp_path, 240, seed=1)
    uids = list(index)
    port = server.port

    def completed() -> int:
        return sum(1 for w in c.works() if w["uid"] in index and w["status"] == "COMPLETED")

    def kill_when(fraction: float) -> None:
        target = int(fraction * len(uids))
        drain_until = time.monotonic() + 120
        while completed() < target:
            assert time.monotonic() < drain_until, f"stalled before {target} completions"
            time.sleep(0.1)
        server.kill()

    for fraction in (0.15, 0.3, 0.45):  # killed -9 mid-bag, started again at once
        kill_when(fraction)
        server.start()
        assert server.port == port
    kill_when(0.6)  # and once kept down: past the alive timeout and the workers' back-off cap
    down = time.monotonic()

    def backed_off() -> bool:  # a report already failed four times: its back-off reached the cap
        for w in workers:
            st = w.wait_status(lambda s: True, 5)
            if any(d["attempts"] >= 4 for d in st["deliveries"]):
                return True
        return False

    while not backed_off():
        assert time.monotonic() - down < 60, "no delivery failed while the server was down"
        time.sleep(0.2)
    outage = alive_timeout + 2  # the 60 s, scaled: still longer than the alive timeout
    time.sleep(max(0.0, outage - (time.monotonic() - down)))  # the outage itself, not a synchronisation
    assert all(w.running() for w in workers), "a worker exited while the server was down"
    server.start()
    restarted = time.monotonic()
    drain(c, uids, STALL_S, 2 * alive_timeout)
    took = time.monotonic() - restarted
    assert took <= 2 * alive_timeout
    check_bag(c, index, tmp_path / "out")
    assert all(w.running() for w in workers)
    print(f"\ndrained {took:.1f} s after the last restart (bound {2 * alive_timeout:.0f} s)")
    c.close()
