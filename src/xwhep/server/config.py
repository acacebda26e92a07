"""Server settings: where its home is, how it listens, and the timing knobs of the protocol."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ServerConfig:
    home: Path
    host: str = "127.0.0.1"
    port: int = 4330
    db_url: str | None = None  # default: SQLite in WAL mode inside home
    insecure: bool = False  # plain HTTP; only when asked for explicitly
    alive_period: float = 30.0  # what workers are told to use
    alive_timeout: float = 120.0  # a task silent for longer is LOST
    reaper_period: float | None = None  # default: alive_timeout / 4
    flush_period: float = 1.0  # alive times are batched to the database this often
    max_long_poll: float = 30.0
    max_wait: float = 600.0  # longest POST /works/wait (the client asks again until its own deadline)
    max_bag: int = 10_000  # works per bulk submission (replicas included)
    max_hosts_per_user: int = 64  # hosts a user may register (worker identities and administrators: no limit)
    max_json_body: int = 64 * 1024 * 1024
    # Connection limits (docs/decisions.md, "Limits"): a request head (request line + headers) larger than this is
    # refused with 431 before it is buffered further; a head not complete this many seconds after its first byte,
    # or after the connection opened, closes the connection; so does a TLS handshake not done in time.
    max_head: int = 64 * 1024
    head_timeout: float = 20.0
    tls_handshake_timeout: float = 10.0
    public_name: str | None = None  # host[:port] used in xw:// URIs; default host:port
    # Security settings, usually from HOME/server.toml (see load_settings):
    oidc: list[dict[str, Any]] = field(default_factory=list)  # [[oidc]] issuer, audience, client_id, …
    delegated_registration: bool = False  # a valid but unknown X.509 certificate creates a STANDARD_USER
    # failed logins free per (account, address) (4x that per address), and the longest wait after them (s); each
    # further failure doubles the wait (1, 2, 4 ... s). server.toml: login_rate = {failures = 5, window_s = 60}
    login_rate: tuple[int, float] = (5, 60.0)
    # The raw relay port (tunnels' fast data path; docs/tunnels.md): None = the port after the main one (any
    # free port when the main one is 0; none if taken), 0 = any free port, -1 = none (WebSockets only).
    relay_port: int | None = None
    log_level: str | None = None  # --log-level (else $XW_LOG, else WARNING): server/logs.py
    log_json: bool = False  # --log-json: one JSON object per log line

    def load_settings(self) -> None:
        """Read HOME/server.toml if present (security settings a person edits by hand)."""
        path = self.home / "server.toml"
        if not path.exists():
            return
        data = tomllib.loads(path.read_text())
        self.oidc = list(data.get("oidc", [])) or self.oidc
        self.delegated_registration = bool(data.get("delegated_registration", self.delegated_registration))
        if "relay_port" in data:
            self.relay_port = int(data["relay_port"])
        for key in ("max_json_body", "max_head", "max_hosts_per_user"):
            if key in data:
                setattr(self, key, int(data[key]))
        for key in ("head_timeout", "tls_handshake_timeout", "max_long_poll", "max_wait"):
            if key in data:
                setattr(self, key, float(data[key]))
        rate = data.get("login_rate")
        if rate:
            self.login_rate = (int(rate["failures"]), float(rate["window_s"]))

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'xwhep.db'}"

    @property
    def server_name(self) -> str:
        return self.public_name or f"{self.host}:{self.port}"

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs"
