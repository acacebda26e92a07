"""Tunnels on the worker: relay streams to and from jobs that keep their own, isolated network namespace.

A job with listen ports or forward addresses gets a socket directory (``JOBROOT/sockets``, bound at
``/xw/sockets`` in the sandbox) and runs under the forwarder :mod:`xwhep.worker.xwfwd` (see there for what
happens inside). The worker side, here:

* for each listen port P, a Unix socket ``listen-P.sock`` where the forwarder parks idle connections; when the
  server asks for a stream to (task, P) (on a spare, or on the control channel), one is taken and told ``C``;
  the forwarder answers ``F`` with its new connection to the job's port attached (``SCM_RIGHTS``), which the
  worker splices with the stream itself, or ``R``: the stream is refused ("nothing listens on port P");
* for each forward address (ADDRESS, P), a Unix socket ``fwd-P.sock``: each connection from the forwarder
  carries the job's connection to its ``localhost:P`` (``F``) and opens a stream to
  ``/hosts/HOST/tasks/TASK/forward?address=ADDRESS``; the server decides whether this job may reach ADDRESS.

The worker only ever listens on those sockets, never connects into the sandbox: the job may replace or remove
files in its socket directory, and nothing it does there can make the worker connect somewhere else.

Everything runs on one asyncio loop in a daemon thread (the rest of the worker is threads with a blocking HTTP
client). The control channel (a WebSocket the worker opens, ``/hosts/HOST/channel``) and two spare WebSockets
(``/hosts/HOST/spare``: the server hands new streams to them, no TLS handshake on a stream's path) are kept only
when the worker accepts incoming connections: works with listen ports go only to such hosts, and with forward
addresses alone the worker only connects out, so the other hosts cost the server no connection. Each forward
address of a running job keeps one WebSocket dialed ahead for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from xwhep.client.sdk import Client
from xwhep.client.streams import (
    CLOSE_REFUSED,
    Ahead,
    Conn,
    Dialer,
    Spares,
    StreamError,
    close_ws,
    local_socket,
    refuse_local,
    splice,
)
from xwhep.core.tunnels import BadAddress, parse_forwards, parse_ports
from xwhep.worker.executors.base import JobSpec

log = logging.getLogger("xwhep.worker.tunnel")
T = TypeVar("T")

FORWARDER = Path(__file__).with_name("xwfwd.py")
SOCKETS = "/xw/sockets"  # where the native executor binds the socket directory
TAKE_TIMEOUT = 10.0  # seconds to get an idle forwarder connection and its answer
SPARES = 2  # spare WebSockets kept with the control channel (new streams skip a TLS handshake)


class TunnelError(Exception):
    """A job's tunnels cannot be set up (bad ports, no python3 for the forwarder, …)."""


def sandbox_python() -> str | None:
    """The ``python3`` a sandbox sees (the host's own, under /usr: the sandbox has /usr read-only)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class JobTunnels:
    """The tunnels of one running job."""

    task: str
    work: str
    sockdir: Path
    listen: list[int]
    forwards: list[tuple[str, int]]
    listeners: list[socket.socket] = field(default_factory=list)  # the Unix sockets of its directory
    accepting: list[asyncio.Task[None]] = field(default_factory=list)
    idle: dict[int, asyncio.Queue[socket.socket]] = field(default_factory=dict)  # listen port → forwarder conns
    streams: set[asyncio.Task[Any]] = field(default_factory=set)
    ahead: dict[int, Ahead] = field(default_factory=dict)  # forward port → its initiator dialed ahead


def _unix_listener(directory: Path, name: str) -> socket.socket:
    """A listening Unix socket ``directory/name``, bound through ``/proc/self/fd`` so that a deep work directory
    never hits the 108-byte limit of socket paths."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"/proc/self/fd/{fd}/{name}")
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(fd)


class TunnelManager:
    """Owns the tunnel loop thread, the control channel and every job's bridges."""

    def __init__(self, client: Client, ca: str | None = None, incoming: bool = False) -> None:
        self.client = client
        self.dialer = Dialer(client, ca)
        self.incoming = incoming
        self.host: str | None = None
        self.jobs: dict[str, JobTunnels] = {}
        self.control: ClientConnection | None = None
        self.connected = threading.Event()  # the control channel is up (for status and tests)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._control_task: asyncio.Task[None] | None = None
        self._start_lock = threading.Lock()
        self._stopped = False
        self.spares: Spares | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # -- the loop thread -----------------------------------------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                loop = _new_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="xw-tunnels", daemon=True)
                self._thread.start()
                ready.wait(10)
                self._loop = loop
            return self._loop

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        if self._stopped:
            coro.close()
            raise TunnelError("the worker is shutting down")
        loop = self._ensure_loop()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def set_host(self, host: str) -> None:
        """The host uid (after registration); (re)starts the control channel when incoming connections are on."""
        self.host = host
        if self.incoming:
            self._call(self._restart_control())

    def stop(self) -> None:
        """End every stream and the control channel; stop the loop thread."""
        loop = self._loop
        if loop is None or self._stopped:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        self._stopped = True
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    async def _shutdown(self) -> None:
        if self._control_task is not None:
            self._control_task.cancel()
            await asyncio.gather(self._control_task, return_exceptions=True)
        for task in list(self.jobs):
            await self._release(task)
        if self.spares is not None:
            await self.spares.close()
            self.spares = None

    # -- control channel ----------------------------------------------------------------------------------------
    async def _restart_control(self) -> None:
        if self._control_task is not None:
            self._control_task.cancel()
            await asyncio.gather(self._control_task, return_exceptions=True)
        if self.spares is not None:  # they were dialed for the former host uid
            await self.spares.close()
            self.spares = None
        self._control_task = asyncio.create_task(self._control_loop())
        self._update_spares()

    async def _control_loop(self) -> None:
        delay = 0.2
        while True:
            try:
                ws = await self.dialer.open(f"/hosts/{self.host}/channel", open_timeout=15)
            except StreamError as exc:
                log.warning("tunnels: control channel: %s (retrying in %.1f s)", exc.message, delay)
                self.connected.clear()
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.2
            self.control = ws
            self.connected.set()
            log.info("tunnels: control channel connected")
            try:
                async for msg in ws:
                    self._on_control(msg)
            except ConnectionClosed:
                pass
            finally:
                self.control = None
                self.connected.clear()
            log.info("tunnels: control channel closed (%s); reconnecting", ws.close_reason or ws.close_code)
            await asyncio.sleep(random.uniform(0.05, 0.3))

    def _on_control(self, msg: str | bytes) -> None:
        try:
            data = json.loads(msg)
        except ValueError:
            return
        if isinstance(data, dict) and data.get("op") == "open" and isinstance(data.get("stream"), str):
            job = self.jobs.get(str(data.get("task")))
            task = asyncio.create_task(self._serve_listen(job, data))
            if job is not None:
                job.streams.add(task)
                task.add_done_callback(job.streams.discard)

    async def _refuse(self, sid: str, reason: str) -> None:
        ws = self.control
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.send(json.dumps({"op": "refuse", "stream": sid, "reason": reason}))

    async def _take(self, job: JobTunnels, port: int) -> socket.socket:
        """An idle forwarder connection, told to connect to the job's ``port``. Its first byte will say whether
        that worked (``K``); the stream does not wait for it (see :func:`splice`'s ``verdict``)."""
        queue = job.idle[port]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TAKE_TIMEOUT
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TunnelError(f"the job's forwarder did not answer for port {port} (is the job starting?)")
            try:
                sock = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                continue
            try:
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":  # the forwarder dropped it
                    sock.close()
                    continue
            except BlockingIOError:
                pass  # alive and silent, as an idle connection is
            except OSError:
                sock.close()
                continue
            try:
                await loop.sock_sendall(sock, b"C")
            except OSError:
                sock.close()
                continue
            return sock

    async def _serve_listen(self, job: JobTunnels | None, msg: dict[str, Any],
                            spare: Conn | None = None) -> None:
        """A stream to a job's listen port, asked on the control channel (then joined with a new WebSocket) or
        handed to a spare (already part of the stream: its first bytes follow the ``open``)."""
        sid = str(msg["stream"])
        try:
            port = int(msg.get("port") or 0)
        except (TypeError, ValueError):
            port = 0
        if job is None or port not in job.idle:
            reason = f"no job of task {msg.get('task')} with listen port {port} on this worker"
            if spare is None:
                await self._refuse(sid, reason)
            else:
                with contextlib.suppress(Exception):
                    await spare.close(4404, reason[:120])
            return
        ws = spare
        try:
            sock = await self._take(job, port)
            answer, handed = await _answer(sock)
        except TunnelError as exc:
            if ws is None:
                await self._refuse(sid, str(exc))
            else:
                await refuse_local(ws, str(exc))
            return
        if answer == b"F" and handed is not None:  # the job's connection itself: the forwarder is out of the way
            sock.close()
            sock = handed
        elif answer != b"K":  # K: the forwarder relays (an old python3 in the sandbox)
            sock.close()
            reason = f"nothing listens on port {port} inside the job (yet)"
            if ws is None:
                await self._refuse(sid, reason)
            else:
                await close_ws(ws, CLOSE_REFUSED, reason)
            return
        if ws is None:
            try:
                ws = await self.dialer.open(f"/relay/{sid}", ping_interval=None)
            except StreamError as exc:
                log.warning("tunnels: stream to port %d of task %s: %s", port, job.task, exc.message)
                sock.close()
                return
        await splice(ws, sock)

    async def _on_spare(self, ws: Conn, msg: dict[str, Any]) -> None:
        job = self.jobs.get(str(msg.get("task")))
        task = asyncio.current_task()
        if job is not None and task is not None:
            job.streams.add(task)
            task.add_done_callback(job.streams.discard)
        await self._serve_listen(job, msg, ws)

    def _update_spares(self) -> None:
        """Keep spares while incoming connections are on (with the control channel): new streams to the jobs'
        ports skip a TLS handshake. Not tied to jobs: spares dropped when a job ends could race with a stream
        the server is handing out for the next job."""
        wanted = self.incoming and self.host is not None
        if wanted and self.spares is None:
            self.spares = Spares(self.dialer, f"/hosts/{self.host}/spare", self._on_spare, n=SPARES)
            self.spares.start()
        elif not wanted and self.spares is not None:
            spares, self.spares = self.spares, None
            t = asyncio.create_task(spares.close())
            self._background.add(t)
            t.add_done_callback(self._background.discard)

    # -- jobs ---------------------------------------------------------------------------------------------------
    def wrap(self, task: str, work: str, root: Path, spec: JobSpec, listen_ports: str | None,
             forward_addresses: str | None) -> JobSpec:
        """Set up ``task``'s tunnels and return its spec running under the forwarder (from a job thread)."""
        try:
            listen = parse_ports(listen_ports)
            forwards = parse_forwards(forward_addresses)
        except BadAddress as exc:
            raise TunnelError(str(exc)) from None
        clash = set(listen) & {p for _, p in forwards}
        if clash:
            raise TunnelError(f"port {min(clash)} is both a listen port and a forward port")
        if listen and not self.incoming:
            raise TunnelError("this worker does not accept incoming connections (incoming_connections = false)")
        python = sandbox_python()
        if python is None:
            raise TunnelError("tunnels need python3 under /usr on the worker (the in-sandbox forwarder)")
        sockdir = root / "sockets"
        sockdir.mkdir(mode=0o700)
        shutil.copyfile(FORWARDER, sockdir / "xwfwd.py")
        sockets: list[tuple[str, int, socket.socket]] = []
        try:
            for p in listen:
                sockets.append(("listen", p, _unix_listener(sockdir, f"listen-{p}.sock")))
            for _, p in forwards:
                sockets.append(("fwd", p, _unix_listener(sockdir, f"fwd-{p}.sock")))
        except OSError as exc:
            for *_, s in sockets:
                s.close()
            raise TunnelError(f"cannot create the job's sockets: {exc}") from None
        job = JobTunnels(task, work, sockdir, listen, forwards)
        self._call(self._add(job, sockets))
        argv = [python, "-I", "-S", f"{SOCKETS}/xwfwd.py", "--sockets", SOCKETS]
        if listen:
            argv += ["--listen", ",".join(map(str, listen))]
        if forwards:
            argv += ["--forward", ",".join(str(p) for _, p in forwards)]
        return dataclasses.replace(spec, argv=[*argv, "--", *spec.argv], unix_socket_dir=sockdir)

    async def _add(self, job: JobTunnels, sockets: list[tuple[str, int, socket.socket]]) -> None:
        self.jobs[job.task] = job
        addresses = dict((p, a) for a, p in job.forwards)
        for address, port in job.forwards:  # dial ahead: the job's first connect skips the TLS handshake
            job.ahead[port] = Ahead(self.dialer, f"/hosts/{self.host}/tasks/{job.task}/forward",
                                    {"address": address})
            job.ahead[port].start()
        for kind, port, listener in sockets:
            job.listeners.append(listener)
            if kind == "listen":
                job.idle[port] = asyncio.Queue()
                job.accepting.append(asyncio.create_task(self._park(listener, job.idle[port])))
            else:
                job.accepting.append(asyncio.create_task(self._accept_forwards(job, listener, addresses[port],
                                                                               port)))

    @staticmethod
    async def _park(listener: socket.socket, queue: asyncio.Queue[socket.socket]) -> None:
        """The forwarder's idle connections for one listen port, waiting to be told ``C``."""
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            await queue.put(conn)

    async def _accept_forwards(self, job: JobTunnels, listener: socket.socket, address: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            t = asyncio.create_task(self._serve_forward(job, address, port, local_socket(conn)))
            job.streams.add(t)
            t.add_done_callback(job.streams.discard)

    async def _serve_forward(self, job: JobTunnels, address: str, port: int, sock: socket.socket) -> None:
        """A job connected to its ``localhost:port``: the forwarder hands its connection over (``F``) or relays it
        itself (``B``); the stream to ``address`` is opened, the forwarder told ``K`` or ``R`` and why."""
        loop = asyncio.get_running_loop()
        try:
            answer, handed = await _answer(sock)
        except TunnelError:
            sock.close()
            return
        if answer not in (b"F", b"B") or (answer == b"F" and handed is None):
            sock.close()
            return
        try:
            ws = await job.ahead[port].stream()
        except StreamError as exc:
            log.info("tunnels: task %s to %s refused: %s", job.task, address, exc.message)
            reason = f"{address}: {exc.message}".replace("\n", " ")
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, b"R" + reason.encode()[:500] + b"\n")
            sock.close()
            if handed is not None:
                handed.close()
            return
        try:
            await loop.sock_sendall(sock, b"K")
        except OSError as exc:
            sock.close()
            if handed is not None:
                handed.close()
            await refuse_local(ws, str(exc))
            return
        notes = None
        if handed is not None:  # the forwarder's connection stays open: it hears why the stream failed, if it does
            notes, sock = sock, handed
        err = await splice(ws, sock)
        if err is not None and err.status is not None:  # refused by the far end (nothing listens there, …)
            log.info("tunnels: task %s to %s failed: %s", job.task, address, err.message)
            if notes is not None:
                reason = f"{address}: {err.message}".replace("\n", " ")
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(notes, b"R" + reason.encode()[:500] + b"\n")
        if notes is not None:
            notes.close()

    def release(self, task: str) -> None:
        """The job ended: close its sockets and end its streams (from a job thread)."""
        if self._loop is not None and task in self.jobs and not self._stopped:
            with contextlib.suppress(TunnelError):
                self._call(self._release(task))

    async def _release(self, task: str) -> None:
        job = self.jobs.pop(task, None)
        if job is None:
            return
        for t in [*job.accepting, *job.streams]:
            t.cancel()
        await asyncio.gather(*job.accepting, *job.streams, return_exceptions=True)
        for listener in job.listeners:
            listener.close()
        for queue in job.idle.values():
            while not queue.empty():
                queue.get_nowait().close()
        for ahead in job.ahead.values():
            await ahead.close()


async def _answer(sock: socket.socket, timeout: float = TAKE_TIMEOUT) -> tuple[bytes, socket.socket | None]:
    """The forwarder's first byte on ``sock``, and the connection it handed over with it (``F``), if any."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: None if ready.done() else ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
    except TimeoutError:
        raise TunnelError("the job's forwarder did not answer") from None
    finally:
        loop.remove_reader(fd)
    try:
        data, fds, _, _ = socket.recv_fds(sock, 1, 4)
    except OSError:
        return b"", None
    handed = None
    for i, received in enumerate(fds):
        if i == 0 and data == b"F":
            handed = _adopt(received)
        else:
            os.close(received)
    return data, handed


def _adopt(fd: int) -> socket.socket | None:
    """A connection the forwarder handed over, if it is one (a TCP socket; anything else is closed): the job
    controls what is sent, and the worker only ever relays a stream over it."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return None
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.close()
        return None
    return local_socket(sock)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # faster, where installed (it comes with the server's dependencies)

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()
