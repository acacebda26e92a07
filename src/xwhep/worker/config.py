"""Worker configuration: the client config (server, ca, login, password) plus the worker's own settings.

::

    server = "https://grid.example.org:4330"
    ca = "ca.pem"
    login = "worker"
    password = "…"

    [worker]
    pool = 2                      # concurrent jobs (default: cores)
    project = "atlas"             # run only this user group's works
    incoming_connections = false  # accept works with listen ports
    job_memory_mb = 1024          # per-job memory limit (default: memory / pool)
    job_cpu = 1.0                 # per-job CPU quota in CPUs (default: none)
    job_max_procs = 512
    cache_mb = 4096
    datas = ["atlas-conditions"]
    status_port = 8790            # the volunteer's status page on 127.0.0.1 (default: none; 0: any free port)
    zip_max_mb = 4096             # a dirin may expand to this much (checked while extracting)
    zip_max_files = 100000        # ... and hold this many entries
    retry_max_s = 30              # longest back-off between tries of a failed report or upload
    stop_timeout_s = 5            # on SIGTERM, how long to try to send the stopped jobs' reports

    [worker.packages]
    ROOT = "6.30"

    [activation]                  # default: always (but for the volunteer's pause, below)
    time_windows = "Mon-Fri 18-8, Sat-Sun *"
    cpu_load_max = 50
    pause_file = "~/.xwhep/paused" # inactive while it exists; default WORKDIR/paused ('xwworker pause' makes it)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xwhep.client.config import ClientConfig, ConfigError, load


@dataclass
class WorkerConfig:
    client: ClientConfig
    workdir: Path
    pool: int
    project: str | None = None
    incoming: bool = False
    packages: dict[str, str] = field(default_factory=dict)
    datas: list[str] = field(default_factory=list)
    job_memory_mb: int | None = None
    job_cpu: float | None = None
    job_max_procs: int | None = 512
    cache_mb: int = 4096
    activation: dict[str, Any] = field(default_factory=dict)
    activation_check_s: float = 10.0
    long_poll_s: float = 20.0
    zip_max_mb: int = 4096
    zip_max_files: int = 100_000
    retry_max_s: float = 30.0
    stop_timeout_s: float = 5.0
    status_port: int | None = None  # the local status page (worker/statuspage.py); None: off

    @property
    def pause_file(self) -> Path:
        """The volunteer's switch (activation.PauseFile): ``xwworker pause`` creates it, ``resume`` removes it."""
        return Path(str(self.activation.get("pause_file") or self.workdir / "paused")).expanduser()


def _get(section: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = section.get(key, default)
    if value is not default and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
        raise ConfigError(f"worker config: {key} has the wrong type ({type(value).__name__})")
    return value


def load_worker_config(path: str | os.PathLike[str] | None, workdir: Path | None = None, pool: int | None = None,
                       incoming: bool | None = None) -> WorkerConfig:
    """Read the config file; command-line values win over the file's."""
    client = load(path)
    assert client.path is not None
    raw = tomllib.loads(client.path.read_text())
    w = raw.get("worker", {})
    if not isinstance(w, dict):
        raise ConfigError("worker config: [worker] must be a table")
    wd = workdir or Path(str(_get(w, "workdir", str, str(Path.home() / ".xwhep" / "worker")))).expanduser()
    cores = os.cpu_count() or 1
    n = pool or int(_get(w, "pool", int, cores))
    if n < 1:
        raise ConfigError("worker config: pool must be at least 1")
    act = raw.get("activation", {})
    if not isinstance(act, dict):
        raise ConfigError("worker config: [activation] must be a table")
    act = dict(act)
    if "pause_file" not in act:  # every worker can be paused by its volunteer, whatever its other policies
        if act.get("policy") == "always":
            del act["policy"]
        act["pause_file"] = str(wd.resolve() / "paused")
    port = _get(w, "status_port", int, None)
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError("worker config: status_port must be 0-65535 (0: any free port)")
    cfg = WorkerConfig(
        client=client, workdir=wd.resolve(), pool=n, project=_get(w, "project", str, None),
        incoming=bool(incoming) if incoming is not None else bool(_get(w, "incoming_connections", bool, False)),
        packages={str(k): str(v) for k, v in _get(w, "packages", dict, {}).items()},
        datas=[str(d) for d in _get(w, "datas", list, [])],
        job_memory_mb=_get(w, "job_memory_mb", int, None), job_cpu=_get(w, "job_cpu", (int, float), None),
        job_max_procs=_get(w, "job_max_procs", int, 512), cache_mb=int(_get(w, "cache_mb", int, 4096)),
        activation=act, activation_check_s=float(_get(w, "activation_check_s", (int, float), 10.0)),
        long_poll_s=float(_get(w, "long_poll_s", (int, float), 20.0)), status_port=port,
        zip_max_mb=_positive(w, "zip_max_mb", int, 4096), zip_max_files=_positive(w, "zip_max_files", int, 100_000),
        retry_max_s=float(_positive(w, "retry_max_s", (int, float), 30.0)),
        stop_timeout_s=float(_positive(w, "stop_timeout_s", (int, float), 5.0)),
    )
    return cfg


def _positive(section: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = _get(section, key, kind, default)
    if value <= 0:
        raise ConfigError(f"worker config: {key} must be positive")
    return value
