"""What every benchmark shares: real server processes, a throwaway PostgreSQL, machine facts, statistics."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

READY = "xwhep server ready at "
Number = float | int | None


class Skip(Exception):
    """A benchmark (or part of it) cannot run here; the message is the reason recorded in ``latest.json``."""


@dataclass
class Result:
    """What one benchmark hands back: headline values (``None`` when skipped), reasons, and details."""

    name: str
    values: dict[str, Number] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # headline key → reason
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def skip(self, keys: Sequence[str], reason: str) -> Result:
        for k in keys:
            self.values[k] = None
            self.skipped[k] = reason
        return self


# -- server processes ----------------------------------------------------------------------------------------------

@dataclass
class Server:
    """A real ``python -m xwhep.server`` process on loopback (as tests/cluster.py starts them)."""

    home: Path
    db: str | None = None
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    _drain: threading.Thread | None = None
    output: list[str] = field(default_factory=list)

    @property
    def ca(self) -> Path:
        return self.home / "pki" / "ca.pem"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def conf(self, name: str = "admin") -> dict[str, Any]:
        """A client config the server wrote (``admin`` or ``worker``): server, ca, login, password."""
        return tomllib.loads((self.home / f"{name}.conf").read_text())

    def start(self, timeout: float = 90.0) -> Server:
        """Start and block until the ready line (or fail with the server's output)."""
        cmd = [sys.executable, "-m", "xwhep.server", "--home", str(self.home), "--port", "0", *self.args]
        if self.db:
            cmd += ["--db", self.db]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        timer = threading.Timer(timeout, self._kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                self.output.append(line)
                if line.startswith(READY):
                    self.url = line[len(READY):].split()[0]
                    break
            else:
                raise RuntimeError("server did not start:\n" + "".join(self.output[-30:]))
        finally:
            timer.cancel()
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()
        return self

    def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            del self.output[:-200]

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- PostgreSQL ----------------------------------------------------------------------------------------------------

def _pgserver_module() -> ModuleType:
    """tests/pgserver.py of the source tree (a throwaway PostgreSQL server), loaded by path."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "tests" / "pgserver.py"
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location("xwhep_bench_pgserver", candidate)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # its dataclasses look their module up there
            spec.loader.exec_module(module)
            return module
    raise Skip("PostgreSQL: tests/pgserver.py not found (run from a source checkout, or pass --pg-url)")


class Postgres:
    """A PostgreSQL server for the run: the one of ``--pg-url`` or a throwaway one; a fresh database per use."""

    def __init__(self, url_base: str | None = None) -> None:
        self._given = url_base
        self._server: Any = None
        self._mod: ModuleType | None = None
        self.start_error: str | None = None

    def url_base(self) -> str:
        """The server's ``postgresql+psycopg://user@host:port`` (started on first use); raises :class:`Skip`."""
        if self._given:
            return self._given
        if self.start_error:
            raise Skip(self.start_error)
        if self._server is None:
            try:
                self._mod = _pgserver_module()
                self._server = self._mod.start()
            except Skip as exc:
                self.start_error = str(exc)
                raise
            except Exception as exc:  # PostgresUnavailable, initdb failures, psycopg missing
                self.start_error = f"PostgreSQL unavailable: {str(exc).splitlines()[0][:200]}"
                raise Skip(self.start_error) from None
        return str(self._server.url_base)

    def fresh_database(self) -> str:
        """The SQLAlchemy URL of a new empty database."""
        base = self.url_base()
        name = f"bench_{uuid.uuid4().hex[:12]}"
        import psycopg
        from psycopg import sql

        from xwhep.server.db.engine import normalize_url

        base = normalize_url(base)
        conninfo = "postgresql://" + base.split("://", 1)[1].rstrip("/") + "/postgres"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"{base.rstrip('/')}/{name}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


# -- machine and statistics ------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """Facts about this machine for every figure: CPU model, cores, memory, OS, Python."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total
    return {"cpu": cpu, "cores": os.cpu_count() or 1, "memory_gib": round(mem / 2**30, 1),
            "os": platform.platform(terse=True), "python": platform.python_version(), "host": platform.node()}


def machine_line(m: dict[str, Any]) -> str:
    return f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, Python {m['python']}"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (nearest rank) of ``values``, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def rnd(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(float(x), digits)


class ProcSampler:
    """Samples a process's CPU (% of one core) and RSS every ``period`` seconds in a thread."""

    def __init__(self, pid: int, period: float = 0.25) -> None:
        self.proc = psutil.Process(pid)
        self.period = period
        self.cpu: list[float] = []
        self.rss: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = 0.0
        self._cpu0 = 0.0
        self.cpu_seconds = 0.0
        self.wall = 0.0

    def _cpu_total(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def _run(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.proc.cpu_percent(None)
            while not self._stop.wait(self.period):
                self.cpu.append(self.proc.cpu_percent(None))
                self.rss.append(self.proc.memory_info().rss)

    def __enter__(self) -> ProcSampler:
        self._t0 = time.monotonic()
        self._cpu0 = self._cpu_total()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.wall = time.monotonic() - self._t0
        with contextlib.suppress(psutil.Error):
            self.cpu_seconds = self._cpu_total() - self._cpu0
            self.rss.append(self.proc.memory_info().rss)

    def summary(self) -> dict[str, float | None]:
        return {"cpu_mean_pct": rnd(100.0 * self.cpu_seconds / self.wall if self.wall else None),
                "cpu_p95_pct": rnd(percentile(self.cpu, 95)),
                "cpu_seconds": rnd(self.cpu_seconds, 2),
                "rss_max_mb": rnd(max(self.rss) / 2**20 if self.rss else None),
                "rss_end_mb": rnd(self.rss[-1] / 2**20 if self.rss else None)}


@contextlib.contextmanager
def server(home: Path, db: str | None = None, args: Sequence[str] = ()) -> Iterator[Server]:
    """A started server, always stopped at the end."""
    srv = Server(home=home, db=db, args=list(args))
    try:
        yield srv.start()
    finally:
        srv.stop()


@dataclass
class Settings:
    """Sizes and knobs of one run (``--smoke`` shrinks them all)."""

    smoke: bool = False
    works: int = 20_000  # throughput: no-op works in the bag
    workers: list[int] = field(default_factory=lambda: [10, 100, 1000])  # throughput: simulated workers M
    k: int = 8  # throughput: works a simulated worker asks for at once (its free slots)
    wait: float = 5.0  # throughput: long-poll wait of a request (s)
    dbs: list[str] = field(default_factory=lambda: ["sqlite", "postgres"])
    dask: bool = True
    dispatch_n: int = 200  # dispatch latency: works submitted one at a time
    hosts: list[int] = field(default_factory=lambda: [10_000, 100_000])  # scale: simulated hosts
    alive_period: float = 30.0  # scale: seconds between two alives of one host
    alive_rounds: int = 3  # scale: alives each host sends
    connections: int = 256  # scale: connections the simulated hosts share
    transfer_mib: int = 1024  # transfer: size of the data
    sandbox_n: int = 20  # sandbox: runs of /bin/true each way
    client: str = "raw"  # raw | httpx
    protocol: str = "sync"  # throughput: sync (one call per round, as xw worker does) | split (request, alive, reports)
    workdir: Path = field(default_factory=lambda: Path("/tmp"))
    pg_url: str | None = None

    @classmethod
    def small(cls) -> Settings:
        return cls(smoke=True, works=240, workers=[8], k=4, wait=2.0, dispatch_n=5, hosts=[200],
                   alive_period=1.0, alive_rounds=2, connections=32, transfer_mib=16, sandbox_n=3)


class LoadWatch:
    """What *other* processes on the machine burn while a benchmark runs (the machine may be shared).

    Every ``period`` seconds it sums the CPU of every process outside this process's tree; the benchmark's
    numbers are pessimistic when ``foreign_cpu_pct`` (in % of one core) is far from zero.
    """

    def __init__(self, period: float = 2.0) -> None:
        self.period = period
        self.samples: list[float] = []
        self.top: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.load_start = os.getloadavg()[0]
        self.load_end = 0.0

    def _ours(self) -> set[int]:
        me = psutil.Process()
        with contextlib.suppress(psutil.Error):
            return {me.pid, *(c.pid for c in me.children(recursive=True))}
        return {me.pid}

    def _run(self) -> None:
        procs: dict[int, psutil.Process] = {}
        while not self._stop.wait(self.period):
            ours = self._ours()
            total = 0.0
            seen = set()
            for p in psutil.process_iter(["name", "cmdline"]):
                seen.add(p.pid)
                proc = procs.setdefault(p.pid, p)
                try:
                    cpu = proc.cpu_percent(None)
                except psutil.Error:
                    continue
                if p.pid in ours or cpu < 1.0:
                    continue
                total += cpu
                cmd = " ".join((p.info.get("cmdline") or [p.info.get("name") or "?"])[:4])[:90]
                self.top[cmd] = max(self.top.get(cmd, 0.0), cpu)
            for pid in set(procs) - seen:
                del procs[pid]
            self.samples.append(total)

    def __enter__(self) -> LoadWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.load_end = os.getloadavg()[0]

    def summary(self) -> dict[str, Any]:
        # the first sample only primes cpu_percent
        s = self.samples[1:] or self.samples
        top = sorted(self.top.items(), key=lambda kv: -kv[1])[:5]
        return {"foreign_cpu_pct": rnd(sum(s) / len(s)) if s else None,
                "foreign_cpu_max_pct": rnd(max(s)) if s else None,
                "loadavg_start": rnd(self.load_start, 2), "loadavg_end": rnd(self.load_end, 2),
                "busiest_foreign": [f"{cpu:.0f}% {cmd}" for cmd, cpu in top]}
