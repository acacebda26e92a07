"""The volunteer's status page: what the worker runs, what it still has to deliver, whether it is active, what it
has done, and a pause/resume switch — served by the worker itself on 127.0.0.1 (opt-in: ``[worker] status_port``).

Who may use it: whoever can read the token file ``WORKDIR/status.token`` (0600, in the 0700 work directory), i.e.
the volunteer. The page itself holds nothing; every datum and action is a call with ``Authorization: Bearer
<token>``, which a cross-site form or image cannot send (no CSRF), and the ``Host`` header must name this
loopback address (a DNS-rebinding page gets nothing). Other users of the machine can connect to the port but,
without the token, see only the empty page.

What it shows comes from ``status.json`` (the daemon writes it on every change), the pause file (the activation
policy's, :class:`~xwhep.worker.activation.PauseFile`), this process' CPU time spent in finished jobs, and the
host's record on the server (``GET /hosts/{uid}/stats``, refreshed in the background).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from xwhep.fsutil import write_atomic
from xwhep.worker.config import WorkerConfig

log = logging.getLogger("xwhep.worker")

TOKEN_FILE = "status.token"
PAGE_FILE = "status-page.json"
RECORD_PERIOD = 60.0  # seconds between reads of the host's record on the server while nobody looks
RECORD_FRESH = 3.0  # while the page is open, the record is read again when older than this
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
           "/app.css": ("app.css", "text/css; charset=utf-8"), "/favicon.svg": ("favicon.svg", "image/svg+xml")}


def read_status(workdir: Path) -> dict[str, Any] | None:
    """``status.json`` as the daemon last wrote it (None when there is none yet)."""
    try:
        out: dict[str, Any] = json.loads((workdir / "status.json").read_text())
        return out
    except (OSError, ValueError):
        return None


def pause(cfg: WorkerConfig) -> bool:
    """Create the pause file (the worker stops its jobs and takes none until resumed); False if already paused."""
    path = cfg.pause_file
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"paused at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return True


def resume(cfg: WorkerConfig) -> bool:
    """Remove the pause file; False if the worker was not paused."""
    try:
        cfg.pause_file.unlink()
    except FileNotFoundError:
        return False
    return True


def page_url(workdir: Path) -> str | None:
    """The running page's URL with its token (for the volunteer: needs read access to the token file)."""
    try:
        info = json.loads((workdir / PAGE_FILE).read_text())
        token = (workdir / TOKEN_FILE).read_text().strip()
    except (OSError, ValueError):
        return None
    return f"{info['url']}#token={token}"


class StatusPage:
    """The page's HTTP server (a thread of the worker process) and the host record's refresher."""

    def __init__(self, cfg: WorkerConfig, port: int = 0) -> None:
        self.cfg = cfg
        self.token = secrets.token_urlsafe(32)
        self.record: dict[str, Any] | None = None
        self.record_error: str | None = None
        self.record_time = 0.0
        self.stopping = threading.Event()
        self.wake = threading.Event()  # the page wants a fresher record
        page = self

        class Handler(_Handler):
            owner = page

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/"

    def start(self) -> str:
        """Serve in the background; write the token and the page's address (both 0600). Returns the URL."""
        write_atomic(self.cfg.workdir / TOKEN_FILE, self.token + "\n", 0o600)
        write_atomic(self.cfg.workdir / PAGE_FILE, json.dumps({"url": self.url, "pid": os.getpid()}), 0o600)
        threading.Thread(target=self.httpd.serve_forever, name="xw-status-page", daemon=True).start()
        threading.Thread(target=self._records, name="xw-status-record", daemon=True).start()
        return self.url

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        (self.cfg.workdir / PAGE_FILE).unlink(missing_ok=True)

    def _records(self) -> None:
        """Read the host's record from the server now and then; failures are shown and retried, never fatal."""
        from xwhep.client.sdk import Client

        c = self.cfg.client
        delay = 1.0
        client = None
        while not self.stopping.is_set():
            status = read_status(self.cfg.workdir)
            host = status.get("host") if status else None
            if host:
                try:
                    if client is None:
                        client = Client(c.server, ca=c.ca, login=c.login, password=c.password, token=c.token,
                                        cert=c.cert, key=c.key)
                    self.record, self.record_error = client.host_record(host), None
                    self.record_time = time.monotonic()
                    delay = RECORD_PERIOD
                except Exception as exc:  # the server may be down for a while: say so, try again later
                    self.record_error = str(getattr(exc, "message", exc))
                    delay = min(RECORD_PERIOD, delay * 2)
            else:
                delay = 1.0  # not registered yet
            self.wake.wait(delay)
            self.wake.clear()
        if client is not None:
            client.close()

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows."""
        t = os.times()
        status = read_status(self.cfg.workdir) or {}
        if time.monotonic() - self.record_time > RECORD_FRESH:
            self.wake.set()
        rec = self.record
        return {
            "status": status, "paused": self.cfg.pause_file.exists(), "pause_file": str(self.cfg.pause_file),
            "pool": self.cfg.pool, "workdir": str(self.cfg.workdir), "server": self.cfg.client.server,
            # CPU time of this process' finished children: the jobs (and their sandboxes) it ran since it started
            "cpu_seconds": round(t.children_user + t.children_system, 2),
            "record": None if rec is None else {k: rec[k] for k in ("done", "failed", "interrupted", "run_seconds",
                                                                     "recent", "tasks")},
            "record_error": self.record_error, "time": time.time(),
        }


class _Handler(BaseHTTPRequestHandler):
    owner: StatusPage
    server_version = "xwhep-worker"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status page: " + format, *args)

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, content: Any) -> None:
        self._send(code, json.dumps(content).encode(), "application/json")

    def _host_ok(self) -> bool:
        """Only requests addressed to this loopback address (a DNS-rebinding page names another host)."""
        port = self.owner.port
        if self.headers.get("Host") not in (f"127.0.0.1:{port}", f"localhost:{port}"):
            self._json(HTTPStatus.MISDIRECTED_REQUEST, {"error": "this page answers only at " + self.owner.url})
            return False
        return True

    def _authorized(self) -> bool:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.owner.token.encode()):
            return True
        key = self.owner.cfg.workdir / TOKEN_FILE
        self._json(HTTPStatus.UNAUTHORIZED, {"error": "token required: open the address 'xwworker status --page' "
                                                      f"prints (the token is in {key})"})
        return False

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        if path == "/api/status":
            if self._authorized():
                self._json(HTTPStatus.OK, self.owner.snapshot())
            return
        if path in _STATIC:
            name, ctype = _STATIC[path]
            body = (resources.files("xwhep.worker.web") / "static" / name).read_bytes()
            self._send(HTTPStatus.OK, body, ctype)
            return
        self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {path[:80]}"})

    do_HEAD = do_GET

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        origin = self.headers.get("Origin")
        if origin is not None and origin.rstrip("/") + "/" not in (self.owner.url,
                                                                   f"http://localhost:{self.owner.port}/"):
            self._json(HTTPStatus.FORBIDDEN, {"error": f"requests from {origin[:80]} are not allowed"})
            return
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0]
        if path == "/api/pause":
            pause(self.owner.cfg)
        elif path == "/api/resume":
            resume(self.owner.cfg)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no action {path[:80]}"})
            return
        self._json(HTTPStatus.OK, self.owner.snapshot())
