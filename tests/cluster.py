"""Real server processes for end-to-end tests: start, read the ready line, stop, kill, restart.

Tests talk to them through the SDK, the CLI or real workers, over loopback only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from xwhep.client import Client

READY = "xwhep server ready at "


@dataclass
class ServerProc:
    home: Path
    db: str | None = None
    args: list[str] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", NS]: run the server inside
    port: int = 0
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    log: Path | None = None  # where the server's output goes after the ready line (default: nowhere)

    @property
    def admin_conf(self) -> Path:
        return self.home / "admin.conf"

    @property
    def worker_conf(self) -> Path:
        return self.home / "worker.conf"

    @property
    def ca(self) -> Path:
        return self.home / "pki" / "ca.pem"

    def start(self, timeout: float = 60.0) -> ServerProc:
        """Start and block until the server prints its ready line (the event, no sleeping)."""
        cmd = [*self.prefix, sys.executable, "-m", "xwhep.server", "--home", str(self.home), "--port",
               str(self.port), *self.args]
        if self.db:
            cmd += ["--db", self.db]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        lines = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            lines.append(line)
            if line.startswith(READY):
                self.url = line[len(READY):].split()[0]
                self.port = int(self.url.rsplit(":", 1)[1])
                break
        else:
            raise RuntimeError("server did not start:\n" + "".join(lines))
        # keep draining the output so the server never blocks on a full pipe
        sink = open(self.log, "a") if self.log is not None else subprocess.DEVNULL  # noqa: SIM115 (cat owns it)
        self._drain = subprocess.Popen(["cat"], stdin=self.proc.stdout, stdout=sink)
        if self.log is not None:
            sink.close()  # type: ignore[union-attr]
        return self

    def client(self, conf: str = "admin") -> Client:
        path = self.home / f"{conf}.conf" if "/" not in conf else Path(conf)
        return Client.from_config(path)

    def conf(self, name: str = "admin") -> dict[str, str]:
        return tomllib.loads((self.home / f"{name}.conf").read_text())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> ServerProc:
        """Stop and start again on the same port and home."""
        self.stop()
        return self.start()
