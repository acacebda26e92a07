"""Benchmark 6, sandbox: start overhead of the native executor (bubblewrap + cgroup) vs a bare exec, in ms.

Uses ``xwhep.worker.executors.native.measure_overhead(n)`` (mean extra milliseconds of a sandboxed
``/bin/true`` over a bare one, n runs each), imported lazily; skipped cleanly when the executor, or bubblewrap
on this machine, is not there.
"""

from __future__ import annotations

import importlib
import time

from xwhep.bench.common import Result, Settings, rnd

KEYS = ["sandbox_overhead_ms"]


def run(settings: Settings) -> Result:
    res = Result("sandbox")
    try:
        native = importlib.import_module("xwhep.worker.executors.native")
    except Exception as exc:
        return res.skip(KEYS, f"native executor not available: {type(exc).__name__}: {str(exc)[:200]}")
    measure = getattr(native, "measure_overhead", None)
    if measure is None:
        return res.skip(KEYS, "native executor has no measure_overhead(n) yet")
    executor_cls = getattr(native, "NativeExecutor", None)
    if executor_cls is not None:
        try:
            ok, why = executor_cls().available()
        except Exception as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            return res.skip(KEYS, f"native executor unavailable here: {str(why)[:200]}")
    try:
        measure(1)  # warm-up: page cache, first cgroup
        t = time.perf_counter()
        ms = float(measure(settings.sandbox_n))
        res.details["seconds"] = rnd(time.perf_counter() - t, 2)
    except Exception as exc:
        return res.skip(KEYS, f"failed: {type(exc).__name__}: {str(exc)[:200]}")
    res.details["runs"] = settings.sandbox_n
    res.values["sandbox_overhead_ms"] = rnd(ms, 2)
    print(f"  sandbox: {ms:.2f} ms over a bare exec (mean of {settings.sandbox_n})", flush=True)
    return res
