"""Prometheus metrics (``GET /metrics``): counters fed where effects are applied and events committed, gauges
computed when scraped.

Nothing here costs the hot paths more than a counter increment: counters are incremented where a committed
transaction's effects are applied (:meth:`Effects.apply`) or its events are handed over (:meth:`observe_events`);
the in-memory gauges (scheduler index, relay, live event streams) are read at scrape time; the database gauges
(works by status and owner class, queue age, hosts alive by sharing) come from a few aggregate queries run in a
thread at most once per ``DB_INTERVAL`` seconds, whoever scrapes.

Labels never carry a login: a work's owner is shown by its class (the owner's user group label, ``none`` without
one), so that the scraper learns nothing of who runs what.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import time
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import sqlalchemy as sa
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.pool import NullPool

from xwhep import __version__
from xwhep.server.db import schema as s
from xwhep.server.db.engine import EventRow

if TYPE_CHECKING:
    from xwhep.server.state import ServerState

log = logging.getLogger("xwhep.server")

DB_INTERVAL = 5.0  # the database gauges are recomputed at most this often (seconds)
MAX_SHARINGS = 100  # series per sharing kind (the most shared names; the rest are summed as "other")
TOKEN_FILE = "metrics.token"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: Prometheus has the counters' resets without them


def metrics_token(home: Path) -> str:
    """The bearer token Prometheus scrapes with: ``HOME/metrics.token``, made at the first start (readable by the
    server's user only; an operator copies it into Prometheus' ``authorization.credentials_file``)."""
    path = home / TOKEN_FILE
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


@dataclass
class DbSnapshot:
    """What the aggregate queries found, and when."""

    taken: float = 0.0
    seconds: float = 0.0  # how long the queries took
    works: dict[tuple[str, str], int] = field(default_factory=dict)  # (status, owner class) → count
    oldest_pending: float | None = None  # pending_since of the oldest PENDING work
    hosts: int = 0
    alive: int = 0
    sharing: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, name) → alive hosts


class Metrics:
    """The server's metrics registry (its own, not the process-global one)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.transitions = Counter("xwhep_work_transitions", "Work status changes committed, by the status entered "
                                   "(submissions count as entering PENDING or UNAVAILABLE)", ["status"], registry=r)
        self.events = Counter("xwhep_events", "Events committed to the event log, by action", ["action"], registry=r)
        self.dispatched = Counter("xwhep_works_dispatched", "Works handed to hosts (tasks started)", registry=r)
        self.tasks_ended = Counter("xwhep_tasks_ended", "Tasks ended (reported, lost, aborted, cancelled)",
                                   registry=r)
        self.transfer = Counter("xwhep_transfer_bytes", "Data bytes through the API, by direction (upload: into "
                                "the blob store, verified; download: sent)", ["direction"], registry=r)
        self.latency = Histogram("xwhep_request_duration_seconds", "API request latency by route (method and "
                                 "path template)", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.responses = Counter("xwhep_responses", "API responses by route and status class", ["route", "code"],
                                 registry=r)
        self.uploaded = self.transfer.labels("upload")
        self.downloaded = self.transfer.labels("download")
        ProcessCollector(registry=r)  # CPU seconds, resident memory, open files of the server process
        self.snapshot = DbSnapshot()
        self._refreshing: asyncio.Future[None] | None = None
        self._reader: sa.Engine | None = None
        self._children: dict[tuple[str, str], Any] = {}
        self.token: str | None = None  # HOME/metrics.token, read on the first scrape

    def attach(self, st: ServerState) -> None:
        """Start observing ``st``: committed events, live gauges, database gauges."""
        self.registry.register(_Live(st, self))
        st.db.listeners.append(self.observe_events)
        self.token = metrics_token(st.config.home)

    # -- fed by the server ----------------------------------------------------------------------------------------
    def observe_events(self, rows: list[EventRow]) -> None:
        """A transaction committed these events (called by the database after the commit)."""
        actions: Tally[str] = Tally()
        entered: Tally[str] = Tally()
        for _id, _t, action, _obj, _source, target, _detail, _actor in rows:
            actions[action] += 1
            if target is not None and action in ("work.transition", "work.submit"):
                entered[target] += 1
        for action, n in actions.items():
            self.events.labels(action).inc(n)
        for status, n in entered.items():
            self.transitions.labels(status).inc(n)

    def request(self, route: str, status: int, seconds: float) -> None:
        """One API request answered."""
        key = (route, "2xx" if status < 300 else "3xx" if status < 400 else "4xx" if status < 500 else "5xx")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (self.latency.labels(route), self.responses.labels(*key))
        child[0].observe(seconds)
        child[1].inc()

    # -- scraping -------------------------------------------------------------------------------------------------
    async def render(self, st: ServerState) -> bytes:
        """The text exposition, with database gauges at most ``DB_INTERVAL`` seconds old."""
        if time.time() - self.snapshot.taken >= DB_INTERVAL:
            await self._refresh(st)
        return generate_latest(self.registry)

    async def _refresh(self, st: ServerState) -> None:
        if self._refreshing is not None:  # several scrapers at once share one refresh
            await asyncio.shield(self._refreshing)
            return
        self._refreshing = asyncio.get_running_loop().create_future()
        try:
            cutoff = time.time() - st.config.alive_timeout
            engine = self._engine(st)
            self.snapshot = await anyio.to_thread.run_sync(_read_snapshot, engine, cutoff)
        except Exception:  # a scrape still answers, with the previous snapshot (its age says so)
            log.exception("metrics: the database gauges could not be read")
        finally:
            self._refreshing.set_result(None)
            self._refreshing = None

    def _engine(self, st: ServerState) -> sa.Engine:
        """Where the aggregate queries run, in a thread: on SQLite a connection of their own (the server's one
        connection belongs to the event loop; WAL lets a reader run beside the writer), else the server's pool."""
        if not st.db.is_sqlite:
            return st.db.engine
        if self._reader is None:
            self._reader = sa.create_engine(st.db.url, poolclass=NullPool)
        return self._reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.dispose()


def check_token(given: str, expected: str) -> bool:
    """A constant-time comparison of the scraper's bearer token."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def _read_snapshot(engine: sa.Engine, cutoff: float) -> DbSnapshot:
    t0 = time.perf_counter()
    snap = DbSnapshot()
    w, u, g, h = s.works, s.users, s.usergroups, s.hosts
    with engine.connect() as conn:
        by_owner = conn.execute(sa.select(w.c.status, w.c.owner, sa.func.count()).group_by(w.c.status, w.c.owner)
                                ).all()
        owners = sorted({row[1] for row in by_owner})
        classes: dict[str, str] = {}
        for start in range(0, len(owners), 500):
            q = (sa.select(u.c.uid, g.c.label).select_from(u.outerjoin(g, g.c.uid == u.c.usergroup))
                 .where(u.c.uid.in_(owners[start:start + 500])))
            classes.update((uid, label or "none") for uid, label in conn.execute(q))
        for status, owner, n in by_owner:
            key = (status, classes.get(owner, "none"))
            snap.works[key] = snap.works.get(key, 0) + n
        snap.oldest_pending = conn.execute(sa.select(sa.func.min(w.c.pending_since))
                                           .where(w.c.status == "PENDING")).scalar()
        snap.hosts = conn.execute(sa.select(sa.func.count()).select_from(h)).scalar() or 0
        snap.alive = conn.execute(sa.select(sa.func.count()).select_from(h).where(h.c.last_alive >= cutoff)
                                  ).scalar() or 0
        sqlite = conn.dialect.name == "sqlite"
        for kind, column, each in (("apptype", "apptypes", "json_each(hosts.apptypes) AS j" if sqlite else
                                    "json_array_elements_text(hosts.apptypes) AS j(value)"),
                                   ("package", "packages", "json_each(hosts.packages) AS j" if sqlite else
                                    "json_object_keys(hosts.packages) AS j(value)")):
            name = "j.key" if sqlite and column == "packages" else "j.value"
            rows = conn.execute(sa.text(f"SELECT {name}, count(*) AS n FROM hosts, {each} "
                                        f"WHERE hosts.last_alive >= :cutoff GROUP BY {name} ORDER BY n DESC"),
                                {"cutoff": cutoff}).all()
            for i, (value, n) in enumerate(rows):
                key = (kind, str(value) if i < MAX_SHARINGS else "other")
                snap.sharing[key] = snap.sharing.get(key, 0) + int(n)
    snap.taken = time.time()
    snap.seconds = time.perf_counter() - t0
    return snap


class _Live(Collector):
    """Gauges read when scraped: in-memory state, and the last database snapshot."""

    def __init__(self, st: ServerState, metrics: Metrics) -> None:
        self.st = st
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        st, snap = self.st, self.metrics.snapshot
        info = GaugeMetricFamily("xwhep_build_info", "The server's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        stats = st.scheduler.stats()
        yield _gauge("xwhep_scheduler_pending_works", "PENDING works in this process' scheduler index",
                     stats["pending"])
        yield _gauge("xwhep_scheduler_match_classes", "Match classes (works sharing one profile) in the index",
                     stats["classes"])
        yield _gauge("xwhep_running_works", "Works RUNNING or DATAREQUEST as this process counts them (fair share)",
                     stats["running"])
        yield _gauge("xwhep_tasks_active", "Tasks running on hosts, as this process knows them",
                     len(st.liveness.active_tasks))
        yield _gauge("xwhep_hosts_inactive", "Hosts whose activation policy says no (they said so in an alive)",
                     len(st.inactive_hosts))
        relay = st.relay
        chans = GaugeMetricFamily("xwhep_tunnel_channels", "Tunnel control channels connected", labels=["kind"])
        chans.add_metric(["host"], len(relay.hosts))
        chans.add_metric(["proxy"], len(relay.proxies))
        yield chans
        yield _gauge("xwhep_tunnel_streams_open", "Tunnel streams open now", len(relay.active))
        opened = CounterMetricFamily("xwhep_tunnel_streams_ended", "Tunnel streams relayed (counted when they end)")
        opened.add_metric([], relay.streams_ended)
        yield opened
        nbytes = CounterMetricFamily("xwhep_tunnel_bytes", "Bytes relayed through tunnels, by direction (counted "
                                     "when a stream ends)", labels=["direction"])
        nbytes.add_metric(["up"], relay.bytes_up_ended)
        nbytes.add_metric(["down"], relay.bytes_down_ended)
        yield nbytes
        bus = getattr(st, "event_bus", None)
        if bus is not None:
            yield _gauge("xwhep_event_streams", "Live event streams (GET /api/v1/events/stream) open now",
                         bus.stream_count)
            dropped = CounterMetricFamily("xwhep_event_streams_dropped", "Event streams ended by the server, by reason",
                                          labels=["reason"])
            for reason, n in sorted(bus.dropped.items()):
                dropped.add_metric([reason], n)
            yield dropped
        if not snap.taken:
            return
        works = GaugeMetricFamily("xwhep_works", "Works by status and owner class (the owner's user group label; "
                                  "none without one)", labels=["status", "owner_class"])
        for (status, owner_class), n in sorted(snap.works.items()):
            works.add_metric([status, owner_class], n)
        yield works
        age = 0.0 if snap.oldest_pending is None else max(0.0, snap.taken - snap.oldest_pending)
        yield _gauge("xwhep_pending_oldest_age_seconds", "Age of the oldest PENDING work (since it became PENDING)",
                     age)
        yield _gauge("xwhep_hosts_registered", "Hosts registered", snap.hosts)
        yield _gauge("xwhep_hosts_alive", "Hosts heard from within the alive timeout", snap.alive)
        sharing = GaugeMetricFamily("xwhep_hosts_alive_sharing", "Alive hosts by what they share: an app type "
                                    f"or a package (the {MAX_SHARINGS} most shared names, the rest as other)",
                                    labels=["kind", "name"])
        for (kind, name), n in sorted(snap.sharing.items()):
            sharing.add_metric([kind, name], n)
        yield sharing
        yield _gauge("xwhep_db_snapshot_age_seconds", "Age of the database gauges above", time.time() - snap.taken)
        yield _gauge("xwhep_db_snapshot_seconds", "Time the queries behind the database gauges took", snap.seconds)


def _gauge(name: str, doc: str, value: float, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    g.add_metric([], value)
    return g
