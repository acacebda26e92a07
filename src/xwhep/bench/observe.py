"""Benchmark 7, observe: what a live dashboard and a Prometheus costs the throughput.

The throughput run (:mod:`.throughput`, same bag, same M simulated workers) alternately without and with
observers: one Server-Sent Events consumer reading every event as an administrator (``GET
/api/v1/events/stream``, the web dashboard's feed: three events per work) and a Prometheus-style scrape of
``/metrics`` every second. ``observe_cost_pct`` = 1 − the median over the pairs (one run without, the next with)
of their rate ratio, in %: a pair shares the machine's mood, and one disturbed run does not decide (the means
and the server CPU per work both ways are in the details).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from xwhep.bench.common import Result, Server, Settings, rnd
from xwhep.bench.simworker import Http

PAIRS = 5  # runs of each kind, alternated (runs of the same code differ by several % here)


class Observers:
    """An event stream consumer and a scraper, in the benchmark's event loop."""

    def __init__(self, srv: Server, admin_token: str) -> None:
        self.srv, self.token = srv, admin_token
        self.metrics_token = (srv.home / "metrics.token").read_text().strip()
        self.events = 0
        self.stream_bytes = 0
        self.scrapes = 0
        self.scrape_ms: list[float] = []
        self.ended: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, pool: Http) -> None:
        opened = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._stream(opened)), asyncio.create_task(self._scrape(pool))]
        await asyncio.wait_for(opened, 30)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _stream(self, opened: asyncio.Future[None]) -> None:
        parts = urlsplit(self.srv.url)
        ctx = ssl.create_default_context(cafile=str(self.srv.ca))
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port, ssl=ctx, limit=2**20)
        try:
            writer.write(f"GET /api/v1/events/stream HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         f"Authorization: Bearer {self.token}\r\nAccept: text/event-stream\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise RuntimeError(f"event stream refused: {head[:200]!r}")
            opened.set_result(None)
            tail = b""
            while True:  # count events as a dashboard receives them (chunk framing left in: it never says "id: ")
                data = await reader.read(1 << 16)
                if not data:
                    self.ended = "closed by the server"
                    return
                self.stream_bytes += len(data)
                both = tail + data
                self.events += both.count(b"\nid: ") + (both.startswith(b"id: ") and not tail)
                tail = both[-8:]
                if b"event: end\n" in both:
                    self.ended = "ended by the server"
        finally:
            writer.close()

    async def _scrape(self, pool: Http) -> None:
        while True:
            t = time.perf_counter()
            status, body = await pool.request("GET", "/metrics", token=self.metrics_token)
            if status != 200:
                raise RuntimeError(f"/metrics answered {status}: {body[:200]!r}")
            self.scrape_ms.append(1000 * (time.perf_counter() - t))
            self.scrapes += 1
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - t)))

    def summary(self) -> dict[str, Any]:
        return {"events_received": self.events, "stream_mib": rnd(self.stream_bytes / 2**20, 2),
                "scrapes": self.scrapes, "scrape_ms_max": rnd(max(self.scrape_ms, default=0.0), 2),
                "stream_ended": self.ended}


async def observers(srv: Server, admin_token: str, pool: Http) -> Observers:
    """Start both observers (the stream is open when this returns)."""
    obs = Observers(srv, admin_token)
    await obs.start(pool)
    return obs


def run(settings: Settings) -> Result:
    from xwhep.bench.throughput import bag_run

    res = Result("observe")
    m = 8 if settings.smoke else 100
    pairs = 1 if settings.smoke else PAIRS
    runs: list[dict[str, Any]] = []
    res.details["runs"] = runs
    res.details["workers"] = m
    with tempfile.TemporaryDirectory(prefix="xwbench-observe-", dir=settings.workdir) as tmp:
        for i in range(pairs):
            for observed in (False, True):
                try:
                    out = bag_run(settings, None, m, Path(tmp) / f"{i}-{int(observed)}", observe=observed)
                except Exception as exc:  # a failed run is a finding: record it and go on
                    out = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                out["observed"] = observed
                runs.append(out)
                _progress(out)
    ok = [r for r in runs if "error" not in r and not r.get("timed_out")]
    plain = [r["end_to_end_works_per_s"] for r in ok if not r["observed"]]
    watched = [r["end_to_end_works_per_s"] for r in ok if r["observed"]]
    if not plain or not watched:
        res.skip(["observe_cost_pct"], "a run failed: see details")
        return res
    base, seen = sum(plain) / len(plain), sum(watched) / len(watched)
    ratios = sorted(w["end_to_end_works_per_s"] / p["end_to_end_works_per_s"]
                    for p, w in zip(runs[0::2], runs[1::2], strict=False)
                    if p in ok and w in ok and p["end_to_end_works_per_s"])
    if not ratios:
        res.skip(["observe_cost_pct"], "no pair of runs completed: see details")
        return res
    median = statistics.median(ratios)
    res.values["observe_cost_pct"] = rnd(100 * (1 - median), 2)
    res.details["pair_ratios"] = [rnd(r, 4) for r in ratios]
    res.details["mean_cost_pct"] = rnd(100 * (1 - seen / base), 2)
    cpu = {kind: [r["server_cpu_ms_per_work"] for r in ok if r["observed"] is kind and r["server_cpu_ms_per_work"]]
           for kind in (False, True)}
    res.details["works_per_s"] = {"without": rnd(base), "with": rnd(seen)}
    cpu_ratios = sorted(w["server_cpu_ms_per_work"] / p["server_cpu_ms_per_work"]
                        for p, w in zip(runs[0::2], runs[1::2], strict=False)
                        if p in ok and w in ok and p.get("server_cpu_ms_per_work") and w.get("server_cpu_ms_per_work"))
    if cpu_ratios:  # steadier than the rates when the machine is shared
        res.details["server_cpu_cost_pct"] = rnd(100 * (statistics.median(cpu_ratios) - 1), 2)
    if cpu[False] and cpu[True]:
        res.details["server_cpu_ms_per_work"] = {"without": rnd(sum(cpu[False]) / len(cpu[False]), 4),
                                                 "with": rnd(sum(cpu[True]) / len(cpu[True]), 4)}
    print(f"  observe: {rnd(base)} works/s without, {rnd(seen)} with an event stream + 1 scrape/s (means); cost "
          f"{res.values['observe_cost_pct']} % (median of the pairs' ratios {res.details['pair_ratios']}); server "
          f"CPU/work {res.details.get('server_cpu_ms_per_work')} (median cost "
          f"{res.details.get('server_cpu_cost_pct')} %)", flush=True)
    return res


def _progress(out: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):
        if "error" in out:
            print(f"  observe ({'with' if out['observed'] else 'without'}): ERROR {out['error']}", flush=True)
            return
        extra = f", {out['observers']}" if out.get("observers") else ""
        print(f"  observe ({'with' if out['observed'] else 'without'} observers): {out['end_to_end_works_per_s']} "
              f"works/s, server CPU {out['server_cpu_ms_per_work']} ms/work{extra}", flush=True)
