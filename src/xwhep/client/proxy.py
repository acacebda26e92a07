"""``xwproxy``: reach a work's listen ports from this machine, or expose a port of this machine to your works.

::

    xwproxy UID --xwlistenport 1234[,1235] [--xwconfig FILE]
    xwproxy --xwlistenport 8080 [--xwconfig FILE]

With a work (client → job): listens on ``127.0.0.1:1234`` (loopback only) and relays each connection, through
the server, to the work's first listen port (``1235`` to its second, …). Port 0 takes a free port. Prints one
line per port, ``127.0.0.1:1234 xw://server/uid:8080``.

Without a work (a *server proxy*, job → client): exposes this machine's ``127.0.0.1:8080`` to your own works.
Prints its address (one line, ``xwproxy:…``): submit works with ``--xwforwardaddresses "ADDRESS,PORT"`` and
inside them ``localhost:PORT`` reaches this port. The address survives reconnections and server restarts.

Both run until interrupted (exit 0). Nothing listens on the network: the server relays everything over
connections this program opens. Errors are one ``xwproxy: error: …`` line (exit 1; 2 for usage errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from xwhep.client.classic import CONFIG, HELP, Opt, UsageError, parse_argv
from xwhep.client.config import ConfigError, load
from xwhep.client.sdk import Client, XwError, uid_of
from xwhep.client.streams import Ahead, Dialer, Spares, StreamError, local_socket, splice
from xwhep.core.tunnels import BadAddress, parse_ports, port_number

PROG = "xwproxy"
LISTENPORT = Opt("listenport", "PORT[,PORT…]", "local ports: 127.0.0.1 ports to open (with a work), or the local "
                                               "port to expose (without)")
OPTIONS = {o.name: o for o in (LISTENPORT, CONFIG, HELP)}
USAGE = f"""usage: {PROG} UID|URI --xwlistenport PORT[,PORT…] [--xwconfig FILE]
       {PROG} --xwlistenport PORT [--xwconfig FILE]

With a work: open 127.0.0.1:PORT here; each connection reaches the work's listen ports, in order (0: a free
port). Prints "127.0.0.1:PORT ADDRESS" per port.
Without: a server proxy exposing 127.0.0.1:PORT of this machine to your works. Prints its ADDRESS; submit
works with --xwforwardaddresses "ADDRESS,JOBPORT" to reach it at localhost:JOBPORT inside them.

options:
  --xwlistenport PORT[,PORT…]  {LISTENPORT.help}
  --xwconfig FILE              {CONFIG.help}
  --xwhelp, -h                 show this help"""


def _say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _local_ports(value: str | None) -> list[int]:
    if not value:
        raise UsageError("--xwlistenport is required")
    out = []
    for item in value.split(","):
        item = item.strip()
        try:
            out.append(0 if item == "0" else port_number(item))
        except BadAddress as exc:
            raise UsageError(f"--xwlistenport: {exc}") from None
    return out


# -- client → job ----------------------------------------------------------------------------------------------------

async def to_work(client: Client, dialer: Dialer, uid: str, local: list[int]) -> None:
    """Listen on 127.0.0.1 for each of ``local`` and relay to the work's listen ports in order."""
    work = await asyncio.to_thread(client.work, uid)
    try:
        ports = parse_ports(work.get("listen_ports"))
    except BadAddress as exc:
        raise XwError(f"work {uid}: {exc}") from None
    if not ports:
        raise XwError(f"work {uid} has no listen ports (submit it with --xwlistenport)")
    if len(local) > len(ports):
        raise UsageError(f"work {uid} listens on {len(ports)} port(s) ({','.join(map(str, ports))}): "
                         f"give at most as many local ports")
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def accept(listener: socket.socket, port: int, ahead: Ahead) -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            t = asyncio.create_task(_client_stream(ahead, port, local_socket(conn)))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    listeners: list[socket.socket] = []
    aheads = []
    try:
        for lp, rp in zip(local, ports, strict=False):
            try:
                listener = socket.create_server(("127.0.0.1", lp), backlog=128)  # loopback only, by design
            except OSError as exc:
                raise XwError(f"cannot listen on 127.0.0.1:{lp}: {exc.strerror or exc}") from None
            listener.setblocking(False)
            listeners.append(listener)
            ahead = Ahead(dialer, f"/works/{uid}/ports/{rp}")  # WebSockets dialed ahead, per port
            aheads.append(ahead)
            ahead.start()
            t = asyncio.create_task(accept(listener, rp, ahead))
            tasks.add(t)
            print(f"127.0.0.1:{listener.getsockname()[1]} {work['uri']}:{rp}", flush=True)
        if work.get("status") != "RUNNING":
            _say(f"work {uid} is {work.get('status')}: connections are refused until it runs")
        await asyncio.Event().wait()
    finally:
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in listeners:
            listener.close()
        for ahead in aheads:
            await ahead.close()


async def _client_stream(ahead: Ahead, port: int, sock: socket.socket) -> None:
    try:
        ws = await ahead.stream(wait=False)  # the application's first bytes follow the request at once
    except StreamError as exc:
        _say(f"error: port {port}: {exc.message}")
        sock.close()
        return
    err = await splice(ws, sock)
    if err is not None and err.status is not None:  # refused by the server or the job's side: say why
        _say(f"error: port {port}: {err.message}")


# -- server proxy (job → client) -----------------------------------------------------------------------------------

async def server_proxy(dialer: Dialer, port: int) -> None:
    """Register (and keep) a server proxy for 127.0.0.1:``port``; print its address once."""
    address: str | None = None
    key: str | None = None
    delay = 0.2
    tasks: set[asyncio.Task[None]] = set()
    spares: Spares | None = None

    async def on_spare(ws: ClientConnection, msg: dict[str, Any]) -> None:
        await _proxy_stream(dialer, ws, port, str(msg["stream"]), spare=True)

    try:
        while True:
            try:
                ws = await dialer.open("/proxies", {"address": address, "key": key} if address and key else None)
            except StreamError as exc:
                if address is None or exc.status in (401, 403):
                    raise  # never registered, or no longer allowed: nothing to wait for
                _say(f"relay: {exc.message} (retrying in {delay:.1f} s)")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.2
            try:
                hello = json.loads(await ws.recv())
                if address is None:
                    print(hello["address"], flush=True)
                    _say(f"exposing 127.0.0.1:{port} to your works as {hello['address']}")
                address, key = hello["address"], hello["key"]
                if spares is None:
                    spares = Spares(dialer, "/proxies/spare", on_spare, params={"address": address})
                    spares.start()
                async for msg in ws:
                    data = json.loads(msg)
                    if isinstance(data, dict) and data.get("op") == "open":
                        t = asyncio.create_task(_proxy_stream(dialer, ws, port, str(data["stream"])))
                        tasks.add(t)
                        t.add_done_callback(tasks.discard)
            except ConnectionClosed:
                pass
            _say(f"relay: control channel closed ({ws.close_reason or ws.close_code}); reconnecting")
    finally:
        if spares is not None:
            await spares.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _proxy_stream(dialer: Dialer, ws: ClientConnection, port: int, sid: str, spare: bool = False) -> None:
    """Connect to the exposed local port; answer on the spare ``ws`` (or on the control channel ``ws`` and join
    with a new WebSocket), then relay."""
    sock = local_socket(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        reason = f"nothing listens on the client's port {port}: {exc.strerror or exc}"
        _say(f"error: a job's connection was refused: {reason}")  # this side's log says why too
        with contextlib.suppress(Exception):
            if spare:
                await ws.close(4502, reason[:120])
            else:
                await ws.send(json.dumps({"op": "refuse", "stream": sid, "reason": reason}))
        return
    if spare:
        stream = ws
    else:
        try:
            stream = await dialer.open(f"/relay/{sid}", ping_interval=None)
        except StreamError as exc:
            _say(f"error: stream {sid[:8]}: {exc.message}")
            sock.close()
            return
    await splice(stream, sock)


# -- entry point -----------------------------------------------------------------------------------------------------

def _until_signal(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` until it ends or SIGINT/SIGTERM arrives (then cancel it: streams end, sockets close)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        work = asyncio.create_task(coro)
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for t in (work, stopper):
            t.cancel()
        await asyncio.gather(work, stopper, return_exceptions=True)
        if work in done:
            work.result()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def run(argv: Sequence[str]) -> int:
    """``xwproxy`` with ``argv``; returns the exit code."""
    try:
        parsed = parse_argv(argv, OPTIONS)
        if parsed.help:
            print(USAGE)
            return 0
        local = _local_ports(parsed.get("listenport"))
        if len(parsed.bare) > 1:
            raise UsageError(f"one work at most, got {len(parsed.bare)} arguments")
        cfg = load(parsed.get("config"))
        client = Client.from_config(cfg.path)
        dialer = Dialer(client, cfg.ca)
        try:
            if parsed.bare:
                _until_signal(to_work(client, dialer, uid_of(parsed.bare[0]), local))
            else:
                if len(local) != 1 or local[0] == 0:
                    raise UsageError("a server proxy exposes exactly one local port (not 0)")
                _until_signal(server_proxy(dialer, local[0]))
        finally:
            client.close()
        return 0
    except UsageError as exc:
        _say(f"error: {exc} (see {PROG} --xwhelp)")
        return 2
    except (XwError, StreamError) as exc:
        _say(f"error: {exc.message}")
        return 1
    except ConfigError as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # one readable line, never a traceback (XW_DEBUG=1 shows it)
        if os.environ.get("XW_DEBUG"):
            raise
        _say(f"error: internal error: {type(exc).__name__}: {exc} (set XW_DEBUG=1 for a traceback)")
        return 1


def main() -> None:
    """Entry point of the ``xwproxy`` console script."""
    sys.exit(run(sys.argv[1:]))
