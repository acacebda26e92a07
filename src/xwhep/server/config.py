"""Server settings: where its home is, how it listens, and the timing knobs of the protocol."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    max_bag: int = 10_000  # works per bulk submission
    max_json_body: int = 64 * 1024 * 1024
    public_name: str | None = None  # host[:port] used in xw:// URIs; default host:port

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'xwhep.db'}"

    @property
    def server_name(self) -> str:
        return self.public_name or f"{self.host}:{self.port}"

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs"
