"""Real worker processes for end-to-end tests: configure, start, read the started line, stop, kill -9, status.

A worker's config is a copy of the server's ``worker.conf`` (server, ca, login, password) plus extra TOML
sections (``[worker]``, ``[activation]``). Each worker runs in its own session, so that :meth:`WorkerProc.kill9`
hits the worker and everything it started (its sandboxes included) at once, as a crashed machine would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import ServerProc

from xwhep.client.sdk import XwError
from xwhep.worker.executors.native import live_job_dir

STARTED = "xwhep worker started"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def toml_sections(sections: dict[str, dict[str, Any]]) -> str:
    """``{"worker": {"pool": 1, "packages": {"ROOT": "6"}}}`` → TOML text (nested dicts become sub-tables)."""
    out: list[str] = []

    def table(name: str, body: dict[str, Any]) -> None:
        out.append(f"\n[{name}]")
        subs = {k: v for k, v in body.items() if isinstance(v, dict)}
        out.extend(f"{k} = {_toml_value(v)}" for k, v in body.items() if not isinstance(v, dict))
        for k, v in subs.items():
            table(f"{name}.{k}", v)

    for name, body in sections.items():
        table(name, body)
    return "\n".join(out) + "\n"


@dataclass
class WorkerProc:
    """One ``python -m xwhep.worker`` process.

    ``sections`` are appended to the copied server worker config, e.g.
    ``{"worker": {"job_memory_mb": 64}, "activation": {"pause_file": "/tmp/p"}}``.
    """

    server: ServerProc
    root: Path
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    pool: int = 1
    env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", NS]: run the worker inside
    args: list[str] = field(default_factory=list)  # more command-line options (e.g. --log-json)
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def config(self) -> Path:
        return self.root / "worker.conf"

    @property
    def workdir(self) -> Path:
        return self.root / "work"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def log_tail(self, n: int = 60) -> str:
        """The end of the worker's output, without the routine alive/long-poll request lines."""
        keep = [x for x in self.lines if not ("httpx" in x and ('/alive "' in x or '/request "' in x))]
        return "".join(keep[-n:])

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        base = self.server.worker_conf.read_text()
        sections = {k: dict(v) for k, v in self.sections.items()}
        worker = sections.setdefault("worker", {})
        worker.setdefault("long_poll_s", 2.0)  # a short long-poll: activation is checked between polls
        worker.setdefault("activation_check_s", 0.5)
        self.config.write_text(base.rstrip() + "\n" + toml_sections(sections))
        os.chmod(self.config, 0o600)
        return self.config

    def start(self, timeout: float = 60.0) -> WorkerProc:
        """Start and block until the worker prints its started line (then keep reading its output)."""
        self.write_config()
        cmd = [*self.prefix, sys.executable, "-m", "xwhep.worker", "--config", str(self.config), "--workdir",
               str(self.workdir), "--pool", str(self.pool), *self.args]
        env = {**os.environ, "XW_LOG": "INFO", **self.env}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env=env)
        started = threading.Event()
        proc = self.proc

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line)
                if line.startswith(STARTED):
                    started.set()
            started.set()  # EOF: the process is gone; start() reports it

        self._reader = threading.Thread(target=read, name="workerproc-reader", daemon=True)
        self._reader.start()
        if not started.wait(timeout) or not any(x.startswith(STARTED) for x in self.lines):
            self.kill9()
            raise RuntimeError("worker did not start:\n" + self.log_tail())
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then wait (SIGKILL to the whole session if it does not end in ``timeout``)."""
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
                msg = f"worker did not stop within {timeout} s after SIGTERM:\n{self.log_tail()}"
                raise AssertionError(msg) from None
        self._join_reader()
        return rc

    def kill9(self) -> None:
        """SIGKILL the worker's whole process group (the worker and the jobs it started), as a crash would."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._join_reader()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(5)

    def status(self) -> dict[str, Any]:
        """``xwworker status --json --workdir …``, parsed."""
        out = subprocess.run([sys.executable, "-m", "xwhep.worker", "status", "--workdir", str(self.workdir),
                              "--json"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise AssertionError(f"worker status failed ({out.returncode}): {out.stderr}")
        st: dict[str, Any] = json.loads(out.stdout)
        return st

    def wait_status(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0,
                    what: str = "the worker status") -> dict[str, Any]:
        """Poll ``status.json`` (written by the worker on every change) until ``pred`` holds."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while True:
            path = self.workdir / "status.json"
            if path.exists():
                try:
                    last = json.loads(path.read_text())
                except (json.JSONDecodeError, OSError):  # replaced atomically, but be lenient
                    last = {}
                if last and pred(last):
                    return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last status: {last}\n{self.log_tail()}")
            if not self.running():
                raise AssertionError(f"worker exited ({self.proc and self.proc.returncode}) while waiting for "
                                     f"{what}:\n{self.log_tail()}")
            time.sleep(0.05)


# --- helpers for tests that drive real workers through the SDK -------------------------------------------------------

GATE_APP = """#!/bin/sh
# A gate job: starts, waits for the test to create ./go, then writes its result.
echo "started" > started.txt
while [ ! -e go ]; do sleep 0.05; done
echo "finished: $*" > result.txt
"""


def put_app(client: Any, tmp: Path, name: str, script: str) -> str:
    """Register a one-file app (a script with its #! line) for linux/x86_64; returns the app name."""
    path = tmp / f"{name}.bin"
    path.write_text(script)
    path.chmod(0o755)
    client.put_app(name, binaries={"linux/x86_64": path})
    return name


def job_dir(worker: WorkerProc, task: str) -> Path:
    return worker.workdir / "jobs" / task / "job"


def running_task(worker: WorkerProc, work: str, timeout: float = 30.0) -> str:
    """Wait until ``work`` runs in a sandbox on ``worker`` (its gate job wrote started.txt); return the task."""
    st = worker.wait_status(lambda s: any(j["work"] == work for j in s["running"]), timeout,
                            f"work {work} taken by the worker")
    task = str(next(j["task"] for j in st["running"] if j["work"] == work))
    deadline = time.monotonic() + timeout
    while not (job_dir(worker, task) / "started.txt").exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"the job of work {work} did not start:\n{worker.log_tail()}")
        time.sleep(0.05)
    return task


def release(worker: WorkerProc, task: str) -> None:
    """Open the gate of a gate job: through the job's own view of its dir (its overlay, see live_job_dir)."""
    (live_job_dir(job_dir(worker, task)) / "go").write_text("go\n")


def drain(client: Any, uids: list[str], stall_s: float, deadline_s: float,
          watch: Callable[[dict[str, int]], None] | None = None) -> dict[str, str]:
    """Wait until every work is final; fail if no work completes for ``stall_s`` (the stall of issue 13 §1:
    counts frozen for good) or if it takes longer than ``deadline_s`` in all. ``watch`` sees the counts."""
    final = {"COMPLETED", "ERROR", "FAILED"}
    wanted = set(uids)
    t0 = last_progress = time.monotonic()
    done = -1
    status: dict[str, str] = {}
    while True:
        try:
            status = {w["uid"]: w["status"] for w in client.works() if w["uid"] in wanted}
        except XwError:  # the server is down (a test that kills it): what it said last still stands
            pass
        counts: dict[str, int] = {}
        for s in status.values():
            counts[s] = counts.get(s, 0) + 1
        if watch is not None:
            watch(counts)
        n = sum(1 for s in status.values() if s in final)
        now = time.monotonic()
        if n == len(wanted):
            return status
        if n > done:
            done, last_progress = n, now
        if now - last_progress > stall_s:
            raise AssertionError(f"stalled: no work ended for {stall_s:.0f} s; counts {counts}")
        if now - t0 > deadline_s:
            raise AssertionError(f"not drained after {deadline_s:.0f} s; counts {counts}")
        time.sleep(0.25)
