"""``xwhep.Executor`` throughput: ``python -m xwhep.bench.executormap`` prints one JSON line per chunk size.

A real server process, real worker processes (``xwworker``, bubblewrap sandboxes, the worker's own python3), and
``Executor.map`` of N pure-Python calls (``x * x``) at each chunk size: calls/s end to end (submission, runs,
results read, works and data deleted), measured from the first call submitted to the last result read. The
runner app is published and the workers registered before the clock.

    python -m xwhep.bench.executormap --calls 1000 --chunksize 1 10 100 --workers 2 --pool 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from xwhep.bench.common import machine, server

STARTED = "xwhep worker started"


def square(x: int) -> int:
    """The call: as small as a call gets, so that what is measured is the path, not the work."""
    return x * x


def _start_worker(conf: Path, root: Path, pool: int) -> subprocess.Popen[str]:
    root.mkdir(parents=True)
    cfg = root / "worker.conf"
    cfg.write_text(conf.read_text() + "\n[worker]\nlong_poll_s = 2.0\n")
    os.chmod(cfg, 0o600)
    proc = subprocess.Popen([sys.executable, "-m", "xwhep.worker", "--config", str(cfg), "--workdir",
                             str(root / "work"), "--pool", str(pool)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "XW_LOG": "WARNING"})
    assert proc.stdout is not None
    started = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(STARTED):
                started.set()
        started.set()

    threading.Thread(target=read, daemon=True).start()
    if not started.wait(60) or proc.poll() is not None:
        raise RuntimeError("a worker did not start")
    return proc


def measure(calls: int, chunksizes: list[int], workers: int, pool: int, workdir: Path) -> list[dict[str, Any]]:
    import cloudpickle

    from xwhep.bridges import Executor
    from xwhep.client import Client

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job's Python cannot import this module
    out: list[dict[str, Any]] = []
    with server(workdir / "server", args=["--alive-period", "1", "--alive-timeout", "10"]) as srv:
        procs = [_start_worker(srv.home / "worker.conf", workdir / f"w{i}", pool) for i in range(workers)]
        try:
            with Client.from_config(srv.home / "admin.conf") as c:
                deadline = time.monotonic() + 60
                while len(c.hosts()) < workers:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the workers did not register")
                    time.sleep(0.1)
                with Executor(c) as warm:  # publishes the runner app; one call warms the workers' caches
                    warm.submit(square, 1).result(timeout=120)
                for chunksize in chunksizes:
                    t0 = time.perf_counter()
                    with Executor(c) as ex:
                        results = list(ex.map(square, range(calls), chunksize=chunksize))
                    took = time.perf_counter() - t0
                    assert results == [x * x for x in range(calls)]
                    out.append({"calls": calls, "chunksize": chunksize, "works": -(-calls // chunksize),
                                "workers": workers, "pool": pool, "seconds": round(took, 2),
                                "calls_per_s": round(calls / took, 1)})
        finally:
            for p in procs:
                with_signal(p, signal.SIGTERM)
    return out


def with_signal(proc: subprocess.Popen[str], sig: int) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xwhep.bench.executormap", description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--chunksize", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pool", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="xw-execbench-", dir=args.workdir))
    try:
        for row in measure(args.calls, args.chunksize, args.workers, args.pool, workdir):
            print(json.dumps({**row, "machine": machine()}), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
