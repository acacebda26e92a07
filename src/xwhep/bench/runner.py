"""``xw bench [--smoke] [--only NAME…] [--out DIR] [--workers M…]``: run the benchmarks, print and save them.

Writes ``latest.json`` after every benchmark (so an interrupted run keeps what it measured), then
``latest.md`` (the table, for bench/README.md) and ``latest.png`` (the plot), all into ``--out``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xwhep.bench import BENCHMARKS, KEYS
from xwhep.bench.common import LoadWatch, Postgres, Result, Settings, machine, now_iso

#: benchmark → the headline keys it fills
OWNS: dict[str, list[str]] = {
    "throughput": ["throughput_sqlite_works_per_s", "throughput_postgres_works_per_s", "dask_tasks_per_s",
                   "ratio_vs_dask"],
    "dispatch": ["dispatch_p50_ms", "dispatch_p99_ms"],
    "scale": ["alive_hosts", "alive_p99_ms"],
    "transfer": ["upload_ratio_vs_raw", "download_ratio_vs_raw"],
    "relay": ["relay_ratio_vs_ssh", "relay_connect_p50_ms"],
    "sandbox": ["sandbox_overhead_ms"],
    "observe": ["observe_cost_pct"],
    "vm": ["vm_overhead_ratio", "vm_job_start_s", "vm_bare_boot_s", "container_overhead_ratio", "debian_ssh_ready_s"],
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xw bench", description="Benchmark xwhep against real server processes.")
    p.add_argument("--smoke", action="store_true", help="everything small, in seconds (the test suite runs this)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=BENCHMARKS,
                   help=f"run only these: {', '.join(BENCHMARKS)}")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where latest.json/.md/.png go")
    p.add_argument("--workers", type=int, nargs="+", metavar="M", help="simulated workers per throughput run")
    p.add_argument("--works", type=int, help="no-op works in the throughput bag (default 20,000)")
    p.add_argument("--k", type=int, help="works a simulated worker asks for at once (default 8)")
    p.add_argument("--db", nargs="+", choices=["sqlite", "postgres"], help="databases for the throughput runs")
    p.add_argument("--no-dask", action="store_true", help="skip the Dask comparison")
    p.add_argument("--hosts", type=int, nargs="+", metavar="N", help="simulated hosts per alive run")
    p.add_argument("--alive-period", type=float, help="seconds between two alives of one simulated host")
    p.add_argument("--alive-rounds", type=int, help="alives each simulated host sends")
    p.add_argument("--transfer-mib", type=int, help="size of the transferred data in MiB (default 1024)")
    p.add_argument("--dispatch-works", type=int, help="works for the dispatch latency (default 200)")
    p.add_argument("--client", choices=["raw", "httpx"], help="HTTP client of the simulated workers")
    p.add_argument("--protocol", choices=["sync", "split"],
                   help="worker protocol of the simulated workers: one sync call per round (default, as xw worker "
                        "does) or the three calls request, alive, reports")
    p.add_argument("--pg-url", help="an existing PostgreSQL server (postgresql://user@host:port) instead of a "
                                    "throwaway one")
    p.add_argument("--workdir", type=Path, help="where servers and files live during the run (default: temp)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings.small() if args.smoke else Settings()
    overrides: dict[str, Any] = {"workers": args.workers, "works": args.works, "k": args.k, "dbs": args.db,
                                 "hosts": args.hosts, "alive_period": args.alive_period,
                                 "alive_rounds": args.alive_rounds, "transfer_mib": args.transfer_mib,
                                 "dispatch_n": args.dispatch_works, "client": args.client, "pg_url": args.pg_url,
                                 "protocol": args.protocol}
    for k, v in overrides.items():
        if v is not None:
            setattr(s, k, v)
    if args.no_dask:
        s.dask = False
    return s


def _runners(settings: Settings, pg: Postgres) -> dict[str, Callable[[], Result]]:
    from xwhep.bench import dispatch, observe, relay, sandbox, scale, throughput, transfer, vm

    return {"throughput": lambda: throughput.run(settings, pg), "dispatch": lambda: dispatch.run(settings),
            "scale": lambda: scale.run(settings), "transfer": lambda: transfer.run(settings),
            "relay": lambda: relay.run(settings), "sandbox": lambda: sandbox.run(settings),
            "observe": lambda: observe.run(settings),
            "vm": lambda: vm.run(settings)}


def run(settings: Settings, only: list[str] | None, out: Path, plot: bool = True) -> dict[str, Any]:
    """Run the benchmarks; return the ``latest.json`` document (also written to ``out``)."""
    from xwhep.bench import report

    chosen = [b for b in BENCHMARKS if not only or b in only]
    doc: dict[str, Any] = {"date": now_iso(), "machine": machine(), "smoke": settings.smoke}
    doc.update({k: None for k in KEYS})
    doc["skipped"] = {k: f"not run (--only {' '.join(only or [])})" for b in BENCHMARKS if b not in chosen
                      for k in OWNS[b]}
    doc["details"] = {}
    doc["seconds"] = {}
    doc["load"] = {}
    doc["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items()}
    pg = Postgres(settings.pg_url)
    runners = _runners(settings, pg)
    try:
        for name in chosen:
            print(f"[{name}]", flush=True)
            t = time.perf_counter()
            with LoadWatch() as watch:
                try:
                    res = runners[name]()
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # one broken benchmark must not lose the others
                    res = Result(name).skip(OWNS[name], f"crashed: {type(exc).__name__}: {str(exc)[:300]}")
            res.seconds = time.perf_counter() - t
            doc["load"][name] = watch.summary()
            busy = doc["load"][name]["foreign_cpu_pct"]
            if busy and busy > 20:
                print(f"  warning: other processes used {busy:.0f}% of a core during {name}: its numbers are "
                      "pessimistic", flush=True)
            for k in OWNS[name]:
                if k not in res.values:
                    res.skip([k], "not measured")
            doc.update(res.values)
            doc["skipped"].update(res.skipped)
            for k, v in res.values.items():
                if v is not None:
                    doc["skipped"].pop(k, None)
            doc["details"][name] = res.details
            doc["seconds"][name] = round(res.seconds, 1)
            report.write_json(doc, out)
    finally:
        pg.stop()
    report.write_json(doc, out)
    (out / "latest.md").write_text(report.markdown(doc))
    if plot:
        try:
            report.plot(doc, out / "latest.png")
        except ImportError as exc:
            print(f"no plot: {exc} (pip install 'xwhep[bench]')", file=sys.stderr)
    print()
    print(report.text_table(doc))
    print(f"\nwrote {out / 'latest.json'}" + ("" if not plot else f" and {out / 'latest.png'}"))
    return doc


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``xw bench`` and ``python -m xwhep.bench``."""
    args = parser().parse_args(argv)
    # SIGTERM (and SIGINT, which a shell ignores in background jobs) stop the run cleanly: servers stopped
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    settings = settings_from(args)
    with tempfile.TemporaryDirectory(prefix="xwbench-", dir=args.workdir) as tmp:
        settings.workdir = Path(tmp)
        try:
            run(settings, args.only, args.out, plot=not args.no_plot)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    return 0
