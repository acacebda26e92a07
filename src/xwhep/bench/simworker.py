"""Simulated workers: asyncio loops that speak the real worker protocol over HTTPS, without launching jobs.

Thousands of them live in one process. Their HTTP client is deliberately small (:class:`RawPool`: HTTP/1.1
keep-alive over ``asyncio`` TLS streams, a few dozen microseconds of client CPU per request) so that on a small
machine the load generator steals as little CPU as possible from the server it measures; ``--client httpx``
swaps in ``httpx.AsyncClient`` as a cross-check. Each simulated worker does what ``xw worker`` does for a
no-op job. With the ``sync`` protocol (the default, as ``xw worker``): one ``/sync`` call per round carries the
reports of the works it finished (COMPLETED, return code 0, no result) and asks for up to ``k`` more (a
long-poll only when it has nothing to report, so a report is never held back), plus an ``alive`` every alive
period. With ``split`` (the three-call protocol, kept for comparison): ``request`` → ``alive`` → ``reports``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson


class HttpError(RuntimeError):
    """A non-2xx answer or a broken exchange."""


class Http(Protocol):
    """The few calls a simulated worker needs."""

    async def request(self, method: str, path: str, body: bytes | None = None, token: str | None = None,
                      content_type: str = "application/json") -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


class _Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def roundtrip(self, head: bytes, body: bytes | None) -> tuple[int, bytes, bool]:
        self.writer.write(head + body if body else head)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        keep = headers.get("connection", "").lower() != "close"
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            data = b"".join(parts)
        else:
            data = await self.reader.read()
            keep = False
        return status, data, keep

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class RawPool:
    """At most ``size`` keep-alive HTTPS connections to one server, opened on demand and reused."""

    def __init__(self, url: str, ca: str | None, size: int) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl.create_default_context(cafile=ca)
        self._host_header = f"Host: {parts.netloc}\r\n".encode()
        self._idle: list[_Conn] = []
        self._sem = asyncio.Semaphore(size)
        self._all: set[_Conn] = set()
        self.connects = 0

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=2**20)
        self.connects += 1
        conn = _Conn(reader, writer)
        self._all.add(conn)
        return conn

    async def request(self, method: str, path: str, body: bytes | None = None, token: str | None = None,
                      content_type: str = "application/json") -> tuple[int, bytes]:
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header]
        if token:
            head.append(f"Authorization: Bearer {token}\r\n".encode())
        if body is not None:
            head.append(f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode())
        head.append(b"\r\n")
        async with self._sem:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                status, data, keep = await conn.roundtrip(b"".join(head), body)
            except BaseException:
                conn.close()
                self._all.discard(conn)
                raise
            if keep:
                self._idle.append(conn)
            else:
                conn.close()
                self._all.discard(conn)
        return status, data

    async def close(self) -> None:
        conns = list(self._all)
        self._all.clear()
        self._idle.clear()
        for conn in conns:
            conn.close()
        if conns:  # all at once, bounded: a TLS close may wait for the peer's close_notify
            await asyncio.wait([asyncio.ensure_future(c.writer.wait_closed()) for c in conns], timeout=3.0)


class HttpxPool:
    """The same interface over ``httpx.AsyncClient`` (a cross-check of :class:`RawPool`)."""

    def __init__(self, url: str, ca: str | None, size: int) -> None:
        import httpx

        verify: Any = ssl.create_default_context(cafile=ca) if url.startswith("https") and ca else False
        self.base = url.rstrip("/")
        self.client = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(120.0, connect=30.0),
                                        limits=httpx.Limits(max_connections=size, max_keepalive_connections=size))

    async def request(self, method: str, path: str, body: bytes | None = None, token: str | None = None,
                      content_type: str = "application/json") -> tuple[int, bytes]:
        headers = {"Content-Type": content_type} if body is not None else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        r = await self.client.request(method, self.base + path, content=body, headers=headers)
        return r.status_code, r.content

    async def close(self) -> None:
        await self.client.aclose()


def make_pool(kind: str, url: str, ca: str | None, size: int) -> Http:
    """``raw`` (default) or ``httpx``."""
    if kind == "httpx":
        return HttpxPool(url, ca, size)
    return RawPool(url, ca, size)


async def call(http: Http, method: str, path: str, payload: Any = None, token: str | None = None,
               expect: tuple[int, ...] = (200, 201)) -> Any:
    """One JSON call under ``/api/v1``; raises :class:`HttpError` on an unexpected status."""
    body = None if payload is None else orjson.dumps(payload)
    status, data = await http.request(method, "/api/v1" + path, body, token)
    if status not in expect:
        raise HttpError(f"{method} {path}: HTTP {status}: {data[:300]!r}")
    return orjson.loads(data) if data else None


async def login(http: Http, login_name: str, password: str) -> str:
    out = await call(http, "POST", "/auth/login", {"login": login_name, "password": password})
    return str(out["token"])


HOST_DESC = {"os": "linux", "cpu": "x86_64", "cores": 8, "memory": 16384, "disk": 100_000, "version": "bench"}


async def register(http: Http, token: str, name: str) -> tuple[str, str]:
    """A new host: its uid and its own token (every host call needs a token bound to that host)."""
    out = await call(http, "POST", "/hosts", {"name": name, **HOST_DESC}, token)
    return str(out["uid"]), str(out["token"])


async def noop_app(http: Http, token: str, name: str = "bench-noop") -> str:
    """A DEPLOYABLE app whose linux/x86_64 binary is ``#!/bin/sh`` ``exit 0``; returns its name."""
    import hashlib

    content = b"#!/bin/sh\nexit 0\n"
    data = await call(http, "POST", "/datas", {"name": "noop.sh", "size": len(content),
                                               "sha256": hashlib.sha256(content).hexdigest()}, token)
    if data["status"] != "AVAILABLE":
        status, out = await http.request("PUT", f"/api/v1/datas/{data['uid']}/content", content, token,
                                         "application/octet-stream")
        if status != 200:
            raise HttpError(f"upload of the no-op binary: HTTP {status}: {out[:300]!r}")
    await call(http, "POST", "/apps", {"name": name, "type": "DEPLOYABLE",
                                       "binaries": {"linux/x86_64": data["uid"]}}, token)
    return name


@dataclass
class Stats:
    """What the simulated workers saw: per-call latencies and the times stages happened."""

    latency: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    claimed: int = 0
    done: int = 0
    stale: int = 0
    stops: int = 0
    uploads: int = 0
    empty_polls: int = 0
    first_claim: float = float("inf")
    last_claim: float = 0.0
    first_done: float = float("inf")
    last_done: float = 0.0
    errors: list[str] = field(default_factory=list)


class SimWorker:
    """One simulated host running no-op works until ``stop`` is set."""

    def __init__(self, http: Http, token: str, host: str, k: int, wait: float, stats: Stats,
                 on_done: Callable[[int], None], protocol: str = "sync", alive_period: float = 30.0) -> None:
        self.http = http
        self.token = token
        self.host = host
        self.k = k
        self.wait = wait
        self.stats = stats
        self.on_done = on_done
        self.protocol = protocol
        self.alive_period = alive_period
        self.finished: list[str] = []  # tasks done and not reported yet (sync protocol)
        self.next_alive = time.perf_counter() + alive_period

    async def run(self, stop: asyncio.Event) -> None:
        st = self.stats
        base = f"/hosts/{self.host}"
        while not stop.is_set():
            try:
                await self._round(base)
            except (HttpError, OSError, asyncio.IncompleteReadError) as exc:
                st.errors.append(str(exc)[:300])
                if len(st.errors) > 1000:
                    raise
                await asyncio.sleep(0.05)

    async def _round(self, base: str) -> None:
        if self.protocol == "sync":
            await self._sync_round(base)
        else:
            await self._split_round(base)

    async def _sync_round(self, base: str) -> None:
        st = self.stats
        reports = [{"task": t, "status": "COMPLETED", "return_code": 0} for t in self.finished]
        t0 = time.perf_counter()
        if t0 >= self.next_alive:  # the periodic alive of a worker (nothing runs between two rounds here)
            await call(self.http, "POST", base + "/alive", {"tasks": [], "results": []}, self.token)
            t1 = time.perf_counter()
            st.latency["alive"].append(t1 - t0)
            self.next_alive = t1 + self.alive_period
            t0 = t1
        body = {"reports": reports, "max": self.k, "wait": 0.0 if reports else self.wait}
        out = await call(self.http, "POST", base + "/sync", body, self.token)
        t1 = time.perf_counter()
        self.finished = []
        if reports:
            st.latency["sync"].append(t1 - t0)
            self._count(out["reports"], t1)
        works = out["works"]
        if not works:
            if not reports:
                st.empty_polls += 1
            return
        if not reports:
            st.latency["sync"].append(t1 - t0)
        st.claimed += len(works)
        st.first_claim = min(st.first_claim, t1)
        st.last_claim = max(st.last_claim, t1)
        self.finished = [w["task"] for w in works]  # a no-op job ends as soon as it starts

    async def _split_round(self, base: str) -> None:
        st = self.stats
        t0 = time.perf_counter()
        out = await call(self.http, "POST", base + "/request", {"max": self.k, "wait": self.wait}, self.token)
        t1 = time.perf_counter()
        works = out["works"]
        if not works:
            st.empty_polls += 1
            return
        st.latency["request"].append(t1 - t0)
        st.claimed += len(works)
        st.first_claim = min(st.first_claim, t1)
        st.last_claim = max(st.last_claim, t1)
        tasks = [w["task"] for w in works]
        out = await call(self.http, "POST", base + "/alive", {"tasks": tasks, "results": []}, self.token)
        t2 = time.perf_counter()
        st.latency["alive"].append(t2 - t1)
        keep = [t for t in tasks if out["tasks"].get(t) == "continue"]
        st.stops += len(tasks) - len(keep)
        reports = [{"task": t, "status": "COMPLETED", "return_code": 0, "result": None} for t in keep]
        if not reports:
            return
        out = await call(self.http, "POST", base + "/reports", {"reports": reports}, self.token)
        t3 = time.perf_counter()
        st.latency["report"].append(t3 - t2)
        self._count(out["reports"], t3)

    def _count(self, outcomes: list[dict[str, Any]], t: float) -> None:
        """Tally the server's answers to reports received at ``t``."""
        st = self.stats
        n = 0
        for r in outcomes:
            if r["outcome"] == "done":
                n += 1
            elif r["outcome"] == "upload":
                st.uploads += 1
            else:
                st.stale += 1
        st.done += n
        st.first_done = min(st.first_done, t)
        st.last_done = max(st.last_done, t)
        self.on_done(n)


async def run_workers(workers: list[SimWorker], stop: asyncio.Event) -> list[asyncio.Task[None]]:
    """Start every worker's loop; the caller cancels the tasks when it has seen enough."""
    return [asyncio.create_task(w.run(stop)) for w in workers]


def arun(coro: Any) -> Any:
    """Run a coroutine on a fresh event loop (the standard one: Ctrl-C stays prompt; the client is not the
    bottleneck, see ``client_cpu_ms_per_work`` in the results)."""
    with asyncio.Runner() as runner:
        return runner.run(coro)
