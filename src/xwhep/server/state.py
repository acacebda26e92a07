"""Everything a request handler needs, built once per server process."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from xwhep.core.matching import HostProfile
from xwhep.server.auth import Tokens
from xwhep.server.config import ServerConfig
from xwhep.server.db.engine import Database
from xwhep.server.metrics import Metrics
from xwhep.server.oidc import OidcVerifier
from xwhep.server.ratelimit import Backoff
from xwhep.server.relay import Hub
from xwhep.server.revocation import Revocations
from xwhep.server.scheduler import Scheduler
from xwhep.server.store import BlobStore
from xwhep.server.x509 import X509Auth


class Signal:
    """Wakes every waiter at once; costs nothing while nobody waits (it is raised on the hot paths)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._waiters = 0

    def notify(self) -> None:
        if self._waiters:
            ev, self._event = self._event, asyncio.Event()
            ev.set()

    async def wait(self, timeout: float) -> None:
        """Until the next :meth:`notify` or ``timeout`` seconds."""
        self._waiters += 1
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters -= 1


@dataclass
class Liveness:
    """Alive times kept in memory and written to the database in batches (the alive path does no I/O)."""

    hosts: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=dict)
    active_tasks: dict[str, tuple[str, str]] = field(default_factory=dict)  # task → (work, host), running here


@dataclass
class ServerState:
    config: ServerConfig
    db: Database
    store: BlobStore
    tokens: Tokens
    oidc: OidcVerifier = field(default_factory=lambda: OidcVerifier([]))  # the [[oidc]] issuers
    scheduler: Scheduler = field(default_factory=Scheduler)
    liveness: Liveness = field(default_factory=Liveness)
    hosts: dict[str, tuple[HostProfile, int]] = field(default_factory=dict)  # uid → (profile, version)
    started: float = 0.0
    login_failures: Backoff = field(default_factory=lambda: Backoff(5, 60.0))  # per (account, address)
    login_failures_address: Backoff = field(default_factory=lambda: Backoff(20, 60.0))  # per address
    revocations: Revocations = field(default_factory=Revocations)  # deleted users, voided tokens (durable)
    inactive_hosts: set[str] = field(default_factory=set)  # workers whose activation policy says no (alive)
    work_changes: Signal = field(default_factory=Signal)  # works changed state here (xw wait's long-poll)
    resync_needed: bool = False  # a claim failed mid-way: rebuild the pending index from the database
    metrics: Metrics = field(default_factory=Metrics)  # GET /metrics (server/metrics.py)
    event_bus: Any = None  # live event streams (server/eventbus.py), made with the application
    x509: X509Auth = field(init=False)  # CA, CRL and login challenges (reads HOME/pki lazily)
    relay: Hub = field(init=False)  # tunnels: control channels and streams (in memory only)

    def __post_init__(self) -> None:
        self.x509 = X509Auth(self.config, self.tokens.secret)
        self.relay = Hub(self.tokens.secret)

    @property
    def name(self) -> str:
        return self.config.server_name
