"""Benchmark 3, scale: N simulated hosts registered, then sending alive signals; server CPU, RSS, latency.

Each of the N hosts is registered for real (``POST /hosts``, concurrently over the shared connections; the
time it takes is reported). Then every host sends ``alive_rounds`` alives, one every ``alive_period`` seconds,
phases spread evenly: an open-loop load of N / period requests per second. The hosts share ``connections``
keep-alive HTTPS connections (a real host would hold its own; one process cannot hold 100,000 TLS sessions).
Latency is measured from the moment an alive was *due*, so a server that falls behind shows it (queueing in
the client counts), and also from the moment it was sent (``service``). Server CPU (% of one core) and RSS are
sampled with psutil on the server's pid.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from xwhep.bench.common import ProcSampler, Result, Server, Settings, percentile, rnd
from xwhep.bench.simworker import HttpError, arun, call, login, make_pool, register

KEYS = ["alive_hosts", "alive_p99_ms"]
TARGET_P99_MS = 100.0


async def _scale(srv: Server, n: int, period: float, rounds: int, conns: int, client: str,
                 max_lag: float = 30.0) -> dict[str, Any]:
    import psutil

    worker = srv.conf("worker")
    pool = make_pool(client, srv.url, str(srv.ca), conns)
    out: dict[str, Any] = {"hosts": n, "alive_period_s": period, "rounds": rounds, "connections": conns}
    try:
        token = await login(pool, worker["login"], worker["password"])
        hosts: list[tuple[str, str]] = [("", "")] * n  # (uid, its own token)
        errors: list[str] = []

        async def lane(j: int) -> None:
            for i in range(j, n, conns):
                hosts[i] = await register(pool, token, f"scale-{i:06d}")

        t0 = time.perf_counter()
        c0 = time.process_time()
        with ProcSampler(srv.pid) as reg_load:
            await asyncio.gather(*(lane(j) for j in range(min(conns, n))))
        reg_s = time.perf_counter() - t0
        out["registration_s"] = rnd(reg_s, 2)
        out["registrations_per_s"] = rnd(n / reg_s)
        out["registration_server"] = reg_load.summary()
        out["registration_client_cpu_pct"] = rnd(100 * (time.process_time() - c0) / reg_s)
        out["rss_after_registration_mb"] = rnd(psutil.Process(srv.pid).memory_info().rss / 2**20)

        due_lat: list[float] = []
        service_lat: list[float] = []
        inflight = asyncio.Semaphore(conns)
        tasks: set[asyncio.Task[None]] = set()

        async def one(host: tuple[str, str], due: float) -> None:
            try:
                sent = time.perf_counter()
                await call(pool, "POST", f"/hosts/{host[0]}/alive", {"tasks": [], "results": []}, host[1])
                done = time.perf_counter()
                due_lat.append(done - due)
                service_lat.append(done - sent)
            except (HttpError, OSError, asyncio.IncompleteReadError) as exc:
                errors.append(str(exc)[:200])
            finally:
                inflight.release()

        start = time.perf_counter() + 0.2
        c0 = time.process_time()
        saturated = False
        with ProcSampler(srv.pid) as load:
            for r in range(rounds):
                for i, host in enumerate(hosts):
                    due = start + (r + i / n) * period
                    delay = due - time.perf_counter()
                    if delay > 0.001:
                        await asyncio.sleep(delay)
                    elif -delay > max_lag:
                        saturated = True  # the server fell behind by more than max_lag: stop offering load
                        break
                    await inflight.acquire()
                    task = asyncio.create_task(one(host, due))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if saturated:
                    break
            if tasks:
                await asyncio.wait(list(tasks), timeout=120)
            phase = time.perf_counter() - start
        client_cpu = time.process_time() - c0
        sent = len(due_lat)
        out.update({
            "saturated": saturated, "client_cpu_pct": rnd(100 * client_cpu / phase) if phase > 0 else None,
            "alives": sent, "errors": len(errors), "first_errors": errors[:3],
            "offered_per_s": rnd(n / period), "achieved_per_s": rnd(sent / phase) if phase > 0 else None,
            "phase_s": rnd(phase, 2),
            "p50_ms": rnd(1000 * (percentile(due_lat, 50) or 0), 2),
            "p99_ms": rnd(1000 * (percentile(due_lat, 99) or 0), 2),
            "max_ms": rnd(1000 * max(due_lat), 2) if due_lat else None,
            "service_p50_ms": rnd(1000 * (percentile(service_lat, 50) or 0), 2),
            "service_p99_ms": rnd(1000 * (percentile(service_lat, 99) or 0), 2),
            "server": load.summary(),
        })
        return out
    finally:
        await pool.close()


def run(settings: Settings) -> Result:
    res = Result("scale")
    runs: list[dict[str, Any]] = []
    res.details["runs"] = runs
    for n in settings.hosts:
        with tempfile.TemporaryDirectory(prefix="xwbench-scale-", dir=settings.workdir) as d:
            timeout = max(600.0, 20 * settings.alive_period * settings.alive_rounds)
            srv = Server(home=Path(d) / "server", args=["--alive-period", str(settings.alive_period),
                                                         "--alive-timeout", str(timeout)])
            try:
                srv.start()
                out = arun(_scale(srv, n, settings.alive_period, settings.alive_rounds, settings.connections,
                                  settings.client))
            except Exception as exc:
                out = {"hosts": n, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            finally:
                srv.stop()
        runs.append(out)
        if "error" not in out:
            print(f"  scale N={n}: registration {out['registration_s']} s ({out['registrations_per_s']}/s); "
                  f"alive {out['achieved_per_s']}/s of {out['offered_per_s']}/s offered, p99 {out['p99_ms']} ms "
                  f"(service p99 {out['service_p99_ms']} ms), server CPU {out['server']['cpu_mean_pct']}%, "
                  f"RSS {out['server']['rss_max_mb']} MB", flush=True)
        else:
            print(f"  scale N={n}: ERROR {out['error']}", flush=True)
    return headline(res, runs)


def headline(res: Result, runs: list[dict[str, Any]]) -> Result:
    """``alive_hosts``: the most hosts the server kept up with (not saturated, p99 from due ≤ 100 ms; 0 if
    none); ``alive_p99_ms``: the p99 at the largest N that ran (with that N in ``alive_p99_hosts``)."""
    ok = [r for r in runs if "error" not in r and r.get("alives")]
    if not ok:
        return res.skip(KEYS, "no alive run succeeded: see details")
    kept = [r["hosts"] for r in ok if not r.get("saturated") and r["p99_ms"] <= TARGET_P99_MS]
    largest = max(ok, key=lambda r: r["hosts"])
    res.values["alive_hosts"] = max(kept, default=0)
    res.values["alive_p99_ms"] = largest["p99_ms"]
    res.values["alive_p99_hosts"] = largest["hosts"]
    res.values["alive_service_p99_ms"] = largest["service_p99_ms"]
    res.values["alive_achieved_per_s"] = largest["achieved_per_s"]
    res.values["alive_server_cpu_pct"] = largest["server"]["cpu_mean_pct"]
    res.values["alive_server_rss_mb"] = largest["server"]["rss_max_mb"]
    res.values["alive_registration_s"] = largest["registration_s"]
    for r in ok:
        res.values[f"alive_p99_ms_{r['hosts']}"] = r["p99_ms"]
    return res
