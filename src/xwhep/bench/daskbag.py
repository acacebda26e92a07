"""Dask's side of the throughput benchmark: ``python -m xwhep.bench.daskbag N`` prints one JSON line.

A ``LocalCluster`` of 2 worker processes with 1 thread each (the machine's shape for our server and workers),
started before the clock; then N no-op tasks (``client.map(noop, range(N), pure=False)``) and a gather of
their results. Runs in its own process so that Dask's worker processes and event loops never mix with the
benchmark runner's.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def noop(i: int) -> int:
    """The task: nothing."""
    return i


def measure(n: int, processes: int = 2) -> dict[str, Any]:
    import dask
    import distributed

    with distributed.LocalCluster(n_workers=processes, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=40) as cluster, \
            distributed.Client(cluster) as client:
        client.wait_for_workers(processes, timeout=120)
        t0 = time.perf_counter()
        futures = client.map(noop, range(n), pure=False)
        t_submitted = time.perf_counter()
        results = client.gather(futures)
        t_end = time.perf_counter()
        assert len(results) == n
        return {"tasks": n, "processes": processes, "tasks_per_s": round(n / (t_end - t0), 1),
                "submit_s": round(t_submitted - t0, 3), "end_to_end_s": round(t_end - t0, 3),
                "dask": dask.__version__, "distributed": distributed.__version__}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if args else 20_000
    print(json.dumps(measure(n)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
