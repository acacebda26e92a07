"""``xwhep.Executor`` end to end: a real server process, two real worker processes, real bubblewrap sandboxes.

Every call runs as (part of) a work under the worker's own ``python3`` in its sandbox (the hostname there is
``xwjob``, the working directory ``/job``: the functions below return both, so a call that ran in the caller would
be caught). This module's functions reach the jobs by value (``cloudpickle.register_pickle_by_value``): the
job's Python cannot import the test module, as the unimportable-module test shows.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import socket
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from client.pygrid import PyGrid, leftovers
from sdkworker import wait_for

import xwhep
from xwhep.bridges import RemoteError, RemoteTraceback, WorkFailed
from xwhep.bridges.runnerapp import APP_PREFIX
from xwhep.client import Client

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.timeout(300),
]

cloudpickle.register_pickle_by_value(sys.modules[__name__])

NEVER = {"min_memory": 2**31 - 1}  # MB (2 PiB): no host has that much, so such works stay PENDING


# --- the functions the works run -----------------------------------------------------------------------------------

def square_where(x: int) -> tuple[int, str, str]:
    return x * x, socket.gethostname(), os.getcwd()


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad input {x}")
    return x + 1


def raise_unpicklable() -> None:
    raise ValueError(threading.Lock())  # the exception cannot be pickled in the job: only its text travels


def return_unpicklable() -> Any:
    return threading.Lock()


def where() -> str:
    return socket.gethostname()


# --- helpers -------------------------------------------------------------------------------------------------------

def submitted_works(c: Client) -> set[str]:
    return {e["object"] for e in c.events(limit=100_000) if e["action"] == "work.submit"}


def deleted_works(c: Client) -> set[str]:
    return {e["object"] for e in c.events(limit=100_000) if e["action"] == "work.delete"}


# --- tests ---------------------------------------------------------------------------------------------------------

def test_map_of_1000_calls_runs_on_real_workers_in_order_and_leaves_nothing(pygrid: PyGrid) -> None:
    c = pygrid.client
    before = submitted_works(c)
    t0 = time.monotonic()
    with xwhep.Executor(c) as ex:
        results = list(ex.map(square_where, range(1000), chunksize=10, timeout=240))
        took = time.monotonic() - t0
        label = ex.label
    assert [r[0] for r in results] == [i * i for i in range(1000)]
    assert {(r[1], r[2]) for r in results} == {("xwjob", "/job")}  # every call ran in a sandbox
    ours = submitted_works(c) - before
    assert len(ours) == 100  # ten calls per work, sent as one bag
    assert ours <= deleted_works(c)  # each deleted once its result was taken
    assert leftovers(c, label) == ([], [])  # nor the session's works, nor the function's data
    print(f"\n1,000 calls (100 works) in {took:.1f} s: {1000 / took:.0f} calls/s")


def test_remote_value_error_arrives_as_value_error_with_its_traceback(pygrid: PyGrid) -> None:
    with xwhep.Executor(pygrid.client) as ex:
        ok = ex.submit(fail_on, 1, bad=3)
        bad = ex.submit(fail_on, 3, bad=3)
        with pytest.raises(ValueError, match="bad input 3") as info:
            bad.result(timeout=60)
        assert ok.result(timeout=60) == 2
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fail_on" in cause.tb and "ValueError: bad input 3" in cause.tb
    assert info.value.remote_traceback == cause.tb  # type: ignore[attr-defined]
    assert any("raised in work xw://" in n for n in info.value.__notes__)


def test_an_exception_that_cannot_travel_arrives_as_remote_error(pygrid: PyGrid) -> None:
    with xwhep.Executor(pygrid.client) as ex:
        with pytest.raises(RemoteError) as info:
            ex.submit(raise_unpicklable).result(timeout=60)
        with pytest.raises(TypeError, match="cannot pickle") as info2:
            ex.submit(return_unpicklable).result(timeout=60)
    assert info.value.type_name == "builtins.ValueError"
    assert "in raise_unpicklable" in info.value.remote_traceback
    assert "xwhep: the return value cannot be pickled" in info2.value.__notes__


def test_chunked_map_raises_at_the_failing_call_in_order(pygrid: PyGrid) -> None:
    with xwhep.Executor(pygrid.client) as ex:
        it = ex.map(fail_on, range(20), [7] * 20, chunksize=4)
        got = [next(it) for _ in range(7)]
        with pytest.raises(ValueError, match="bad input 7"):
            next(it)
    assert got == [x + 1 for x in range(7)]


def test_submit_batches_and_futures_complete_as_completed(pygrid: PyGrid) -> None:
    with xwhep.Executor(pygrid.client) as ex:
        fs = {ex.submit(square_where, i): i for i in range(30)}
        done = {fs[f]: f.result()[0] for f in cf.as_completed(fs, timeout=120)}
    assert done == {i: i * i for i in range(30)}


def test_cancel_of_pending_futures_cancels_their_works_on_the_server(pygrid: PyGrid) -> None:
    c = pygrid.client
    ex = xwhep.Executor(c, keep=True, **NEVER)
    try:
        fs = [ex.submit(where) for _ in range(4)]
        wait_for(lambda: all(f.work for f in fs), 30, "the works to be submitted")  # type: ignore[attr-defined]
        works = [f.work for f in fs]  # type: ignore[attr-defined]
        assert {c.work(u)["status"] for u in works} == {"PENDING"}
        assert fs[0].cancel() and fs[1].cancel()
        assert fs[0].cancelled() and not fs[2].cancelled()
        wait_for(lambda: c.work(works[0])["status"] == "ERROR" and c.work(works[1])["status"] == "ERROR", 30,
                 "the cancelled works to end")
        assert "cancelled by" in c.work(works[0])["reason"]
        assert {c.work(u)["status"] for u in works[2:]} == {"PENDING"}  # the others were left alone
        done, pending = cf.wait(fs, timeout=0)  # cancelled futures count as done at once
        assert (done, pending) == ({fs[0], fs[1]}, {fs[2], fs[3]})
        ex.shutdown(wait=True, cancel_futures=True)
        assert all(f.cancelled() for f in fs)
        assert {c.work(u)["status"] for u in works} == {"ERROR"}  # kept (keep=True), each cancelled
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        c.delete_bag("session", ex.session)


def test_wall_clock_kill_fails_the_future_saying_so(pygrid: PyGrid) -> None:
    with xwhep.Executor(pygrid.client) as ex:
        f = ex.submit_with({"wallclock": 1}, time.sleep, 120)
        with pytest.raises(WorkFailed, match=r"ended FAILED: wall-clock limit exceeded \(1 s\)") as info:
            f.result(timeout=90)
    assert info.value.status == "FAILED"
    assert info.value.work.startswith("xw://")


def test_shutdown_without_waiting_cancelling_leaves_no_works_behind(pygrid: PyGrid) -> None:
    c = pygrid.client
    ex = xwhep.Executor(c)
    label = ex.label
    fs = [ex.submit(time.sleep, 0.2) for _ in range(60)]
    wait_for(lambda: any(f.running() or f.done() for f in fs), 60, "a call to start")
    ex.shutdown(wait=False, cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    assert cancelled, "some calls had not started yet"
    for f in fs:
        if not f.cancelled():
            assert f.result(timeout=60) is None  # started ones still finish
    wait_for(lambda: leftovers(c, label) == ([], []), 60, "the executor's works and data to be gone")
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(where)


def test_shutdown_before_any_call_started_deletes_the_session_at_once(pygrid: PyGrid) -> None:
    c = pygrid.client
    ex = xwhep.Executor(c, **NEVER)
    fs = [ex.submit(where) for _ in range(40)]
    payload = ex.submit(bytes.hex, os.urandom(100_000))  # one with its arguments in a data of their own
    wait_for(lambda: all(f.work for f in [*fs, payload]), 30, "the works to be submitted")  # type: ignore
    works = {f.work for f in [*fs, payload]}  # type: ignore[attr-defined]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in [*fs, payload])
    wait_for(lambda: leftovers(c, ex.label) == ([], []), 60, "the executor's works and data to be gone")
    events = c.events(limit=100_000)
    assert any(e["action"] == "session.delete" and e["object"] == ex.session for e in events)
    # gone with their session: none was cancelled one by one
    assert not [e for e in events if e["object"] in works and e.get("target") == "ERROR"]


def test_a_submission_whose_answer_was_lost_is_found_not_sent_twice(pygrid: PyGrid) -> None:
    c = pygrid.client
    with xwhep.Executor(c, **NEVER) as ex:
        works = [ex._make_work(ex._dumps(where), [((), {})], {}) for _ in range(3)]
        specs = [{"app": ex.app, "session": ex.session, "label": w.label, "args": "1 3.11 x", **NEVER}
                 for w in works]
        sent = c.submit_bag(specs[:2])  # the server carried these out, and the answer never came back
        rest = ex._recover(list(zip(works, specs, strict=True)))
        assert [w for w, _ in rest] == [works[2]]  # only the one that did not arrive goes again
        assert [w.uid for w in works[:2]] == [s["uid"] for s in sent]
        assert len(c.works(session=ex.session)) == 2
        ex.shutdown(cancel_futures=True)
    assert leftovers(c, ex.label) == ([], [])


def test_calls_survive_a_server_restart(pygrid: PyGrid) -> None:
    c = pygrid.client
    with xwhep.Executor(c) as ex:
        fs = [ex.submit(fail_on, i, bad=-1) for i in range(30)]
        wait_for(lambda: any(f.done() for f in fs), 60, "a first call to end")
        pygrid.server.kill()  # kill -9, mid-run: every thread of the executor meets a refused connection
        pygrid.server.start()
        assert [f.result(timeout=120) for f in fs] == [i + 1 for i in range(30)]
    assert leftovers(c, ex.label) == ([], [])


def test_large_arguments_travel_as_data_and_are_removed(pygrid: PyGrid) -> None:
    c = pygrid.client
    with xwhep.Executor(c) as ex:
        payload = os.urandom(200_000)  # far past what rides in a work's arguments
        assert ex.submit(bytes.hex, payload).result(timeout=60) == payload.hex()
        label = ex.label
    assert leftovers(c, label) == ([], [])


def test_interpreter_mismatch_fails_clearly_in_the_job(pygrid: PyGrid) -> None:
    with xwhep.Executor(pygrid.client) as ex:
        ex._pyver = "3.0"  # as if the caller ran Python 3.0: the job checks before unpickling anything
        with pytest.raises(RemoteError, match=r"the job's Python is 3\.\d+\.\d+ .* the caller's is 3\.0") as info:
            ex.submit(where).result(timeout=60)
    assert info.value.type_name == "interpreter"


def test_function_of_a_module_the_job_cannot_import_fails_clearly(pygrid: PyGrid) -> None:
    mod = types.ModuleType("xw_not_on_workers")
    exec("def double(x):\n    return 2 * x\n", mod.__dict__)
    sys.modules[mod.__name__] = mod  # importable here, so cloudpickle pickles it by reference
    try:
        with xwhep.Executor(pygrid.client) as ex:
            with pytest.raises(RemoteError, match=r"cannot unpickle the function.*register_pickle_by_value"):
                ex.submit(mod.double, 2).result(timeout=60)
            cloudpickle.register_pickle_by_value(mod)
            try:
                assert ex.submit(mod.double, 2).result(timeout=60) == 4  # by value, it runs
            finally:
                cloudpickle.unregister_pickle_by_value(mod)
    finally:
        del sys.modules[mod.__name__]


def test_executors_share_one_runner_app(pygrid: PyGrid) -> None:
    c = pygrid.client
    with xwhep.Executor(c) as a, xwhep.Executor(c) as b:
        assert a.app == b.app
        assert a.submit(where).result(timeout=60) == "xwjob"
    assert len([x for x in c.apps() if x["name"].startswith(APP_PREFIX)]) == 1


def test_unknown_work_option_is_refused_at_once(pygrid: PyGrid, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="wallclok"):
        xwhep.Executor(pygrid.client, wallclok=3)
