"""Benchmark 1, throughput: a bag of no-op works submitted in bulk, run by M simulated workers.

Against a real server process on SQLite and on PostgreSQL (a fresh server and database per run). The workers
register and wait in long-polls first; the clock starts with the first bulk submission (10,000 works per
request) and stops when the server has answered ``done`` to the last report. Per stage:

- submit: bag size / time of the bulk submissions;
- dispatch: works claimed / time between the first and the last claim answered;
- report: works completed / time between the first and the last report answered;
- end to end: bag size / (last ``done`` − first submission byte).

Same run: Dask distributed (``LocalCluster``, 2 worker processes, 1 thread each) on the same number of no-op
tasks (:mod:`xwhep.bench.daskbag`, in its own process), and our/Dask ratio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from xwhep.bench.common import Postgres, ProcSampler, Result, Server, Settings, Skip, percentile, rnd
from xwhep.bench.simworker import SimWorker, Stats, arun, call, login, make_pool, noop_app, register

BAG = 10_000  # the server's limit per bulk submission


async def _bag_run(srv: Server, m: int, n: int, k: int, wait: float, client: str, protocol: str,
                   observe: bool = False) -> dict[str, Any]:
    admin, worker = srv.conf("admin"), srv.conf("worker")
    ca = str(srv.ca)
    sub = make_pool(client, srv.url, ca, 2)
    pool = make_pool(client, srv.url, ca, m)  # one connection per simulated worker, as real ones have
    tasks: list[asyncio.Task[None]] = []
    watchers = None
    try:
        admin_tok = await login(sub, admin["login"], admin["password"])
        worker_tok = await login(pool, worker["login"], worker["password"])
        app = await noop_app(sub, admin_tok)
        t = time.perf_counter()
        hosts = await asyncio.gather(*(register(pool, worker_tok, f"sim-{i:05d}") for i in range(m)))
        alive_period = float((await call(pool, "POST", f"/hosts/{hosts[0][0]}/alive", {}, hosts[0][1]))["alive_period"])
        registration_s = time.perf_counter() - t
        stats = Stats()
        stop = asyncio.Event()
        finished = asyncio.Event()

        def on_done(count: int) -> None:
            if stats.done >= n:
                finished.set()

        workers = [SimWorker(pool, tok, h, k, wait, stats, on_done, protocol, alive_period) for h, tok in hosts]
        tasks = [asyncio.create_task(w.run(stop)) for w in workers]
        await asyncio.sleep(0.5)  # every worker is now idle in a long-poll
        if observe:  # a live event stream and a scrape per second (bench/observe.py), started before the clock
            from xwhep.bench.observe import observers

            watchers = await observers(srv, admin_tok, sub)
        timeout = 60.0 + n / 50.0
        with ProcSampler(srv.pid) as sampler:
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            for start in range(0, n, BAG):
                specs = [{"app": app, "args": str(i)} for i in range(start, min(n, start + BAG))]
                await call(sub, "POST", "/works", {"works": specs}, admin_tok)
            t_submitted = time.perf_counter()
            timed_out = False
            try:
                await asyncio.wait_for(finished.wait(), timeout)
            except TimeoutError:
                timed_out = True
            t_end = time.perf_counter()
            client_cpu = time.process_time() - cpu0
        stop.set()
    finally:
        if watchers is not None:
            await watchers.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sub.close()
        await pool.close()

    def rate(count: int, first: float, last: float) -> float | None:
        return rnd(count / (last - first)) if last > first else None

    lat = {name: {"p50_ms": rnd(1000 * (percentile(v, 50) or 0), 2), "p99_ms": rnd(1000 * (percentile(v, 99) or 0), 2),
                  "calls": len(v)} for name, v in stats.latency.items()}
    server_load = sampler.summary()
    out: dict[str, Any] = {
        "workers": m, "works": n, "k": k, "protocol": protocol, "done": stats.done, "timed_out": timed_out,
        "end_to_end_works_per_s": rnd(stats.done / (t_end - t0)) if stats.done else 0.0,
        "end_to_end_s": rnd(t_end - t0, 3),
        "submit_works_per_s": rate(n, t0, t_submitted),
        "dispatch_works_per_s": rate(stats.claimed, stats.first_claim, stats.last_claim),
        "report_works_per_s": rate(stats.done, stats.first_done, stats.last_done),
        "first_claim_after_submit_ms": rnd(1000 * (stats.first_claim - t0), 1),
        "latency": lat, "registration_s": rnd(registration_s, 2), "empty_polls": stats.empty_polls,
        "stale": stats.stale, "stops": stats.stops, "errors": len(stats.errors), "first_errors": stats.errors[:3],
        "server": server_load,
        "server_cpu_ms_per_work": rnd(1000 * server_load["cpu_seconds"] / max(1, stats.done), 3)
        if server_load["cpu_seconds"] is not None else None,
        "client_cpu_ms_per_work": rnd(1000 * client_cpu / max(1, stats.done), 3),
    }
    if watchers is not None:
        out["observers"] = watchers.summary()
    return out


def bag_run(settings: Settings, db: str | None, m: int, workdir: Path, observe: bool = False) -> dict[str, Any]:
    """One fresh server, one bag, M workers (``observe``: with a live event stream and scrapes, bench/observe)."""
    srv = Server(home=workdir / f"server-{m}", db=db, args=["--alive-timeout", "600"])
    srv.start()
    try:
        return arun(_bag_run(srv, m, settings.works, settings.k, settings.wait, settings.client,
                               settings.protocol, observe))  # type: ignore
    finally:
        srv.stop()


def dask_run(n: int, timeout: float = 600.0) -> dict[str, Any]:
    """Dask distributed on ``n`` no-op tasks, in its own process (see :mod:`xwhep.bench.daskbag`)."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise Skip("Dask distributed not installed (pip install 'xwhep[bench]')") from None
    try:
        proc = subprocess.run([sys.executable, "-m", "xwhep.bench.daskbag", str(n)], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise Skip(f"Dask run took over {timeout:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise Skip(f"Dask run failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run(settings: Settings, pg: Postgres) -> Result:
    res = Result("throughput")
    runs: list[dict[str, Any]] = []
    res.details["runs"] = runs
    res.details["k"] = settings.k
    res.details["client"] = settings.client
    res.details["protocol"] = settings.protocol
    headline: dict[str, float | None] = {}
    for db in settings.dbs:
        key = f"throughput_{db}_works_per_s"
        for m in settings.workers:
            try:
                url = pg.fresh_database() if db == "postgres" else None
            except Skip as exc:
                res.skip([key], str(exc))
                break
            with tempfile.TemporaryDirectory(prefix=f"xwbench-{db}-", dir=settings.workdir) as tmp:
                try:
                    out = bag_run(settings, url, m, Path(tmp))
                except Exception as exc:  # a failed run is a finding: record it and go on
                    out = {"workers": m, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            out["db"] = db
            runs.append(out)
            rate = out.get("end_to_end_works_per_s")
            res.values[f"throughput_{db}_m{m}_works_per_s"] = rate
            headline[db] = rate  # the largest M of the run is the headline
            _progress(out)
        if db in headline:
            res.values[key] = headline[db]
            if headline[db] is None:
                res.skipped[key] = "run failed: see details"
    if settings.dask:
        try:
            d = dask_run(settings.works)
            res.details["dask"] = d
            res.values["dask_tasks_per_s"] = d["tasks_per_s"]
        except Skip as exc:
            res.skip(["dask_tasks_per_s"], str(exc))
    else:
        res.skip(["dask_tasks_per_s"], "not asked for")
    ours, theirs = res.values.get("throughput_sqlite_works_per_s"), res.values.get("dask_tasks_per_s")
    if ours and theirs:
        res.values["ratio_vs_dask"] = rnd(ours / theirs, 3)
    else:
        res.skip(["ratio_vs_dask"], "needs both the SQLite and the Dask figure")
    for k in ("throughput_sqlite_works_per_s", "throughput_postgres_works_per_s"):
        if k not in res.values:
            res.skip([k], "not asked for")
    return res


def _progress(out: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):
        if "error" in out:
            print(f"  throughput {out.get('db')} M={out['workers']}: ERROR {out['error']}", flush=True)
        else:
            print(f"  throughput {out['db']} M={out['workers']}: {out['end_to_end_works_per_s']} works/s end to end "
                  f"(submit {out['submit_works_per_s']}, dispatch {out['dispatch_works_per_s']}, "
                  f"report {out['report_works_per_s']}; server CPU {out['server']['cpu_mean_pct']}%)", flush=True)
