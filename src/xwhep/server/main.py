"""``xw server``: initialize the home directory, bind, and serve (HTTPS unless --insecure)."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import socket
import sqlite3
import sys
import tomllib
from collections.abc import Coroutine
from typing import Any

import sqlalchemy as sa
import uvicorn

from xwhep.server import logs
from xwhep.server.api.fastpath import FastPath
from xwhep.server.app import create_app
from xwhep.server.auth import Tokens
from xwhep.server.config import ServerConfig
from xwhep.server.home import initialize, secret
from xwhep.server.homelock import HomeInUse, HomeLock
from xwhep.server.limits import http_protocol, loop_factory
from xwhep.server.oidc import OidcConfigError, OidcVerifier
from xwhep.server.pki import PkiError, ServerPki
from xwhep.server.ratelimit import Backoff
from xwhep.server.state import ServerState
from xwhep.server.store import BlobStore


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, which also releases long-polling workers at once when asked to exit."""

    def __init__(self, config: uvicorn.Config, st: ServerState) -> None:
        super().__init__(config)
        self.st = st
        self.profiler: Any = None

    def _write_profile(self) -> None:
        # here rather than after serve(): uvicorn re-raises the captured SIGTERM when serve() returns
        profiler, self.profiler = self.profiler, None
        if profiler is not None:
            profiler.stop().save(os.environ["XW_PROFILE"])  # fast; render later with pyinstrument --load

    def handle_exit(self, sig: int, frame: object) -> None:
        try:
            loop = asyncio.get_running_loop()
            loop.call_soon_threadsafe(self.st.scheduler.close)
            if self.st.event_bus is not None:  # live event streams end now, not at the graceful timeout
                loop.call_soon_threadsafe(self.st.event_bus.shutdown)
        except RuntimeError:
            pass
        self._write_profile()
        super().handle_exit(sig, frame)  # type: ignore[arg-type]


def _run_loop(main: Coroutine[Any, Any, None], cfg: ServerConfig) -> None:
    """Run on uvloop where installed, as uvicorn itself would (``asyncio.run`` bypasses uvicorn's loop choice), with
    the TLS handshake bounded (see :mod:`xwhep.server.limits`).

    Not only faster: on the stock loop a TLS response followed by a close waited ~40 ms on loopback (measured)."""
    factory = loop_factory(cfg.tls_handshake_timeout)
    try:
        import uvloop
    except ImportError:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main)
        return
    uvloop.run(main, loop_factory=factory)


def _bind_relay(cfg: ServerConfig) -> socket.socket | None:
    """The raw relay port's socket (see ServerConfig.relay_port); None without one."""
    if cfg.relay_port is not None:
        return None if cfg.relay_port < 0 else _bind(cfg.host, cfg.relay_port)
    try:
        return _bind(cfg.host, cfg.port + 1 if cfg.port else 0)
    except OSError as exc:  # the default port is taken: tunnels fall back to WebSockets
        print(f"xwhep server: no raw relay port ({cfg.port + 1}: {exc.strerror}); tunnels use WebSockets only",
              flush=True)
        return None


def _prepare(cfg: ServerConfig) -> tuple[HomeLock, socket.socket, socket.socket | None, str, ServerState,
                                          ServerPki | None]:
    """Everything before serving: settings, the home's lock, the sockets, the home's contents, the state."""
    cfg.load_settings()
    try:
        oidc = OidcVerifier(cfg.oidc)
    except OidcConfigError as exc:  # refuse to start rather than run without the issuers the admin set up
        raise SystemExit(f"xwhep server: {exc}") from None
    cfg.home.mkdir(parents=True, exist_ok=True)
    lock = HomeLock(cfg.home)  # before anything in the home is written: a second server changes nothing
    sock = _bind(cfg.host, cfg.port)
    relay_sock = _bind_relay(cfg)
    cfg.port = sock.getsockname()[1]
    scheme = "http" if cfg.insecure else "https"
    local = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else ("[::1]" if cfg.host == "::" else cfg.host)
    url = f"{scheme}://{local}:{cfg.port}"
    db, material = initialize(cfg, url)
    try:
        st = ServerState(config=cfg, db=db, store=BlobStore(cfg.blob_dir), tokens=Tokens(secret(cfg.home)),
                         oidc=oidc, login_failures=Backoff(*cfg.login_rate),
                         login_failures_address=Backoff(cfg.login_rate[0] * 4, cfg.login_rate[1]))
    except BaseException:
        db.dispose()
        raise
    return lock, sock, relay_sock, url, st, material


def startup_failure(exc: BaseException, cfg: ServerConfig) -> str | None:
    """One line saying why the server cannot start, for the failures a person can fix; None for anything else
    (a bug: its traceback is worth having)."""
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return f"cannot listen on {cfg.host}:{cfg.port}: the port is already in use"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"cannot listen on {cfg.host}:{cfg.port}: no such local address"
        where = exc.filename or cfg.home
        return f"{where}: {exc.strerror or exc}" + _home_hint(exc)
    if isinstance(exc, tomllib.TOMLDecodeError):
        return f"{cfg.home / 'server.toml'}: {exc}"
    if isinstance(exc, PkiError):
        return str(exc)
    if isinstance(exc, sa.exc.SQLAlchemyError):
        return f"database {_safe_url(cfg.database_url)}: {_first_line(exc)}"
    if isinstance(exc, sqlite3.Error):
        return f"database {_safe_url(cfg.database_url)}: {exc}"
    return None


def _home_hint(exc: OSError) -> str:
    hints = {errno.ENOSPC: "the home's file system is full", errno.EDQUOT: "the home's disk quota is used up",
             errno.EROFS: "the home is on a read-only file system", errno.EACCES: "the home is not writable",
             errno.EPERM: "the home is not writable"}
    hint = hints.get(exc.errno or 0)
    return f" ({hint})" if hint else ""


def _safe_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return repr(url)


def _first_line(exc: sa.exc.SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def serve(cfg: ServerConfig) -> None:
    """Run the server until interrupted. Prints one ``ready`` line with the URL once it accepts requests.

    A start that cannot happen (the home in use by another server, not writable or full, the port taken, a bad
    database URL) is one line on stderr and exit status 1, with nothing in the home changed by this process."""
    try:
        logs.setup(cfg.log_level, cfg.log_json)
    except logs.LogSetupError as exc:
        raise SystemExit(f"xwhep server: {exc}") from None
    try:
        lock, sock, relay_sock, url, st, material = _prepare(cfg)
    except HomeInUse as exc:
        raise SystemExit(f"xwhep server: {exc}") from None
    except Exception as exc:
        why = startup_failure(exc, cfg)
        if why is None:
            raise
        raise SystemExit(f"xwhep server: cannot start: {why}") from None
    db = st.db
    app = FastPath(create_app(st), st)  # the workers' hot calls skip FastAPI's routing (see fastpath.py)
    kwargs = {}
    if material is not None:
        kwargs = {"ssl_certfile": str(material.cert), "ssl_keyfile": str(material.key)}
    uv = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=75,
                        http=http_protocol(cfg.max_head, cfg.head_timeout),  # bounded request heads
                        timeout_graceful_shutdown=2,
                        # relay streams: frames of at most 1 MiB (bounds what one stream can make the server
                        # hold), no compression (the payload is usually compressed or encrypted already)
                        ws_max_size=1 << 20, ws_per_message_deflate=False,
                        backlog=2048,
                        # clients and workers connect to the server itself: X-Forwarded-For from a local process
                        # must not choose the address that logins are rate-limited and audited by (and the
                        # middleware cost 3 % of a sync call)
                        proxy_headers=False, **kwargs)  # type: ignore[arg-type]
    server = _Server(uv, st)

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.01)  # uvicorn offers no "started" event; this only gates the ready line
        ca = str(material.ca_pem) if material else None
        if relay_sock is not None:
            from xwhep.server.api.relay import raw_stream

            # plain TCP carrying sealed records, keyed by the tickets the HTTPS API hands out (relaywire)
            await st.relay.serve_raw(relay_sock, lambda side, hello: raw_stream(st, side, hello))
            print(f"xwhep server: raw relay port {st.relay.raw_port}", flush=True)
        info = {"url": url, "pid": os.getpid(), "home": str(cfg.home), "ca": ca, "relay_port": st.relay.raw_port}
        (cfg.home / "server.json").write_text(json.dumps(info))
        _tune_gc()
        print(f"xwhep server ready at {url} (home {cfg.home})", flush=True)
        await task

    server.profiler = _profiler()
    try:
        _run_loop(run(), cfg)
    except KeyboardInterrupt:
        pass
    finally:
        db.dispose()
        lock.release()  # after the database is closed: the next server on this home may start now
        sys.stdout.flush()


def _tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a long-running server, once it is set up.

    With the default thresholds it ran 1,100 times and traversed every long-lived object (the app, SQLAlchemy's
    metadata, a thousand connections' state) nine times during one throughput run: 1.6–1.9 s of CPU, a fifth of
    the server's time (measured). What startup made is frozen (never traversed again), and a young collection
    waits for 50,000 new container objects instead of 700: 0.1 s in the same run. Reference counting still
    frees nearly everything at once; only cycles wait longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _profiler() -> Any:
    """``XW_PROFILE=FILE``: sample the whole server with pyinstrument (the bench extra) and save the session to FILE
    on exit (``pyinstrument --load FILE`` renders it) — how the hot paths were profiled (see bench/README.md)."""
    if not os.environ.get("XW_PROFILE"):
        return None
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.002, async_mode="disabled")
    profiler.start()
    return profiler
