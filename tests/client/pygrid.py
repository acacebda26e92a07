"""The grid of the Python bridges' tests (xwhep.Executor, Parsl): a real server and two real workers.

Shared by tests/client/test_executor.py and test_parsl.py through the ``pygrid`` fixture (tests/client/conftest.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cluster import ServerProc
from workerproc import WorkerProc

from xwhep.client import Client

FAST = ["--alive-period", "0.5", "--alive-timeout", "3"]
POOLS = (2, 3)


@dataclass
class PyGrid:
    server: ServerProc
    client: Client
    workers: list[WorkerProc] = field(default_factory=list)


def start_grid(root: Path) -> PyGrid:
    server = ServerProc(home=root / "server", args=FAST).start()
    grid = PyGrid(server, server.client())
    try:
        for i, pool in enumerate(POOLS):
            grid.workers.append(WorkerProc(server, root / f"w{i}", pool=pool).start())
        for w in grid.workers:
            w.wait_status(lambda s: bool(s.get("host")), 30, "the worker to register")
    except BaseException:
        stop_grid(grid)
        raise
    return grid


def stop_grid(grid: PyGrid) -> None:
    for w in grid.workers:
        w.stop()
    grid.client.close()
    grid.server.stop()


def leftovers(c: Client, label: str) -> tuple[list[str], list[str]]:
    """The works and data of an executor still on the server (all carry its label)."""
    works = [w["uid"] for w in c.works() if (w.get("label") or "").startswith(label)]
    datas = [d["uid"] for d in c.datas() if d["name"].startswith(label)]
    return works, datas
