"""A real Parsl workflow on an xwhep grid (xwhep.bridges.parsl.XwhepExecutor): real server, real workers, real
sandboxes. Parsl's DataFlowKernel resolves the dependencies in this process; each ready app runs as a work.

Parsl is in the test extra; where it is missing the module skips, except in CI (CI=true), where that fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from client.pygrid import PyGrid, leftovers

try:
    import parsl
    from parsl.app.app import python_app
    from parsl.config import Config
    from parsl.dataflow.errors import DependencyError
except ImportError as exc:  # pragma: no cover - depends on the environment
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        raise RuntimeError(f"parsl is required in CI (it is in the test extra): {exc}") from exc
    pytest.skip(f"parsl is not installed: {exc}", allow_module_level=True)

from xwhep.bridges.parsl import XwhepExecutor, unwrap

pytestmark = pytest.mark.timeout(300)


@python_app
def square(x: int) -> int:
    return x * x


@python_app
def total(*xs: int) -> int:
    return sum(xs)


@python_app
def inc(x: int) -> int:
    return x + 1


@python_app
def hostname() -> str:
    import socket

    return socket.gethostname()


@python_app
def refuse(x: int) -> int:
    raise ValueError(f"refused {x}")


@python_app
def nap(seconds: float, walltime: float = 1) -> None:
    import time

    time.sleep(seconds)


@pytest.fixture
def workflow(pygrid: PyGrid, tmp_path: Path) -> Iterator[XwhepExecutor]:
    ex = XwhepExecutor(label="xw", client=pygrid.client)
    dfk = parsl.load(Config(executors=[ex], run_dir=str(tmp_path / "runinfo"), retries=0,
                            initialize_logging=False))
    try:
        yield ex
    finally:
        if not dfk.cleanup_called:  # a test may have ended the workflow itself, to look at what it left
            dfk.cleanup()
            parsl.clear()


def test_a_parsl_workflow_with_dependencies_runs_as_xwhep_works(pygrid: PyGrid,
                                                               workflow: XwhepExecutor) -> None:
    squares = [square(i) for i in range(6)]
    summed = total(*squares)  # waits on the six
    chained = inc(inc(summed))  # a chain on top
    where = hostname()
    assert summed.result(timeout=240) == sum(i * i for i in range(6))
    assert chained.result(timeout=240) == 57
    assert where.result(timeout=240) == "xwjob"  # it ran in a sandbox, not in this process
    bad = refuse(3)
    after_bad = inc(bad)
    with pytest.raises(ValueError, match="refused 3"):
        bad.result(timeout=240)
    with pytest.raises(DependencyError):
        after_bad.result(timeout=240)
    assert workflow.executor is not None
    label = workflow.executor.label
    parsl.dfk().cleanup()  # the workflow's end shuts the executor down: nothing of it stays on the server
    parsl.clear()
    assert leftovers(pygrid.client, label) == ([], [])


def test_walltime_becomes_the_works_wall_clock(workflow: XwhepExecutor) -> None:
    from xwhep.bridges import WorkFailed

    fut = nap(60, walltime=1)
    with pytest.raises(WorkFailed, match=r"wall-clock limit exceeded \(1 s\)"):
        fut.result(timeout=120)


def test_parsl_wrappers_are_taken_off() -> None:
    from parsl.app.errors import wrap_error
    from parsl.app.python import timeout

    def f(x: int) -> int:
        return x

    assert unwrap(wrap_error(f)) == (f, None)
    assert unwrap(timeout(wrap_error(f), 2.5)) == (f, 2.5)
    assert unwrap(f) == (f, None)
