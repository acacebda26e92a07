"""xwfwd: the tunnel forwarder that runs *inside* a job's sandbox, as the parent of the job.

    python3 -I -S /xw/sockets/xwfwd.py --sockets /xw/sockets [--listen 8080,8081] [--forward 1234] -- JOB ARGV…

The sandbox keeps its own network namespace with only ``lo``: the job reaches nothing outside. This script is the
only bridge, and only through Unix sockets the *worker* listens on (the worker never connects into the sandbox,
so nothing the job puts in the socket directory can redirect it):

* listen port P: it keeps a few idle connections to ``listen-P.sock``; when the worker writes ``C`` on one (a
  client opened a stream), it connects to ``127.0.0.1:P`` (then ``[::1]:P``) and answers ``K`` then relays, or
  answers ``R`` and closes when nothing listens there;
* forward port P: it listens on ``127.0.0.1:P`` (and ``[::1]:P``); each connection of the job is relayed to a new
  connection to ``fwd-P.sock``; the worker answers ``K`` (the stream to the forward address is open) or ``R`` and a
  reason line (printed on the job's stderr).

The job is started once the forward ports listen, with the same stdin/stdout/stderr and environment. When it
exits, streams in flight get a short grace period, then this script exits with the job's status (128+N for
signal N); the sandbox's pid namespace then kills anything left. Standard library only: it runs on whatever
``python3`` the worker's system has.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys

CHUNK = 1024 * 1024
POOL = 4  # idle connections kept per listen port: new streams never wait for a connect
GRACE = 1.0  # seconds streams in flight may still flush after the job exited


def log(msg: str) -> None:
    print(f"xwfwd: {msg}", file=sys.stderr, flush=True)


def _abort(*writers: asyncio.StreamWriter) -> None:
    for w in writers:
        with contextlib.suppress(Exception):
            w.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _bridge(r1: asyncio.StreamReader, w1: asyncio.StreamWriter, r2: asyncio.StreamReader,
                  w2: asyncio.StreamWriter, first: asyncio.Task[None] | None = None) -> None:
    """Both directions until both ended; an error on either side resets both."""
    a = first or asyncio.ensure_future(_pump(r1, w2))
    b = asyncio.ensure_future(_pump(r2, w1))
    try:
        done, _ = await asyncio.wait({a, b}, return_when=asyncio.FIRST_EXCEPTION)
        if any(t.exception() is not None for t in done):
            _abort(w1, w2)
    finally:
        for t in (a, b):
            t.cancel()
        await asyncio.gather(a, b, return_exceptions=True)
        for w in (w1, w2):
            w.close()


class Forwarder:
    def __init__(self, sockets: str, listen: list[int], forward: list[int]) -> None:
        self.sockets = sockets
        self.listen = listen
        self.forward = forward
        self.active: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self.active.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.active.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, (ConnectionError, OSError, asyncio.IncompleteReadError)):
                log(f"stream failed: {type(exc).__name__}: {exc}")

    # -- listen ports: the worker asks, we connect to the job's port ---------------------------------------------
    async def pool(self, port: int) -> None:
        path = f"{self.sockets}/listen-{port}.sock"
        delay = 0.02
        while True:
            try:
                r, w = await asyncio.open_unix_connection(path, limit=CHUNK)
            except OSError:  # the worker is not (or no longer) listening: try again, slower and slower
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.02
            try:
                order = await r.read(1)
            except OSError:
                order = b""
            if order != b"C":
                w.close()
                continue
            self._spawn(self._serve(port, r, w))

    async def _serve(self, port: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for host in ("127.0.0.1", "::1"):
            try:
                # A blocking connect: on loopback it completes (or is refused) inside the kernel at once, and
                # saves the event-loop round trips of a non-blocking one on the stream's first bytes.
                sock = socket.create_connection((host, port), timeout=2)
                sock.setblocking(False)
                jr, jw = await asyncio.open_connection(sock=sock, limit=CHUNK)
                break
            except OSError:
                continue
        else:
            w.write(b"R")
            with contextlib.suppress(OSError):
                await w.drain()
            w.close()
            return
        w.write(b"K")
        await _bridge(r, w, jr, jw)

    # -- forward ports: the job connects, the worker opens the stream --------------------------------------------
    async def start_forward(self, port: int) -> list[asyncio.base_events.Server]:
        servers = []
        for host in ("127.0.0.1", "::1"):
            try:
                servers.append(await asyncio.start_server(
                    lambda jr, jw, p=port: self._spawn(self._forward(p, jr, jw)), host, port, limit=CHUNK))
            except OSError as exc:
                if host == "127.0.0.1":
                    raise OSError(f"cannot listen on 127.0.0.1:{port} inside the job: {exc.strerror}") from None
        return servers

    async def _forward(self, port: int, jr: asyncio.StreamReader, jw: asyncio.StreamWriter) -> None:
        try:
            r, w = await asyncio.open_unix_connection(f"{self.sockets}/fwd-{port}.sock", limit=CHUNK)
        except OSError as exc:
            log(f"localhost:{port}: the worker is not reachable: {exc}")
            _abort(jw)
            return
        up = asyncio.ensure_future(_pump(jr, w))  # the job may talk first; the worker buffers it
        try:
            verdict = await r.read(1)
        except OSError:
            verdict = b""
        if verdict != b"K":
            reason = (await r.readline()).decode(errors="replace").strip() if verdict == b"R" else ""
            log(f"localhost:{port}: refused: {reason or 'the worker closed the stream'}")
            up.cancel()
            _abort(jw, w)
            return
        await _bridge(jr, jw, r, w, first=up)


async def run(fwd: Forwarder, argv: list[str]) -> int:
    servers = []
    try:
        for port in fwd.forward:
            servers += await fwd.start_forward(port)
    except OSError as exc:
        log(str(exc))
        return 126
    pools = [asyncio.ensure_future(fwd.pool(p)) for p in fwd.listen for _ in range(POOL)]
    try:
        proc = subprocess.Popen(argv)  # same stdio and environment; our own sockets are not inherited
    except OSError as exc:
        log(f"cannot run {argv[0]}: {exc.strerror or exc}")
        return 127
    rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait)
    for s in servers:
        s.close()
    for p in pools:
        p.cancel()
    if fwd.active:
        await asyncio.wait(set(fwd.active), timeout=GRACE)
    return rc if rc >= 0 else 128 - rc


def parse(argv: list[str]) -> tuple[Forwarder, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: xwfwd.py --sockets DIR [--listen P,…] [--forward P,…] -- COMMAND…")
    i = argv.index("--")
    opts, command = argv[:i], argv[i + 1:]
    values: dict[str, str] = {}
    for j in range(0, len(opts) - 1, 2):
        values[opts[j].lstrip("-")] = opts[j + 1]

    def ports(key: str) -> list[int]:
        return [int(p) for p in values.get(key, "").split(",") if p]

    if not command:
        raise SystemExit("xwfwd: no command to run")
    return Forwarder(values.get("sockets", "/xw/sockets"), ports("listen"), ports("forward")), command


def main() -> None:
    fwd, command = parse(sys.argv[1:])
    loop = asyncio.new_event_loop()
    try:
        rc = loop.run_until_complete(run(fwd, command))
    finally:
        with contextlib.suppress(Exception):
            loop.close()
    sys.stdout.flush()
    os._exit(rc)  # at once: no interpreter teardown waiting on idle pool connections


if __name__ == "__main__":
    main()
