"""Helpers of the browser tests: the browser's launch settings, the grid of a server, two users and a worker, and
logging in through the login page."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster import ServerProc
from workerproc import WorkerProc

from xwhep.client import Client

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
FAST = ["--alive-period", "0.5", "--alive-timeout", "5"]
PASSWORD = "correct horse battery"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def launch(pw: Any) -> Any:
    """Debian's chromium, headless (never a downloaded browser); skipped locally without it, a failure in CI."""
    if not Path(CHROMIUM).exists():
        if in_ci():
            pytest.fail(f"{CHROMIUM} is required in CI (.ci/run installs Debian's chromium)", pytrace=False)
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@dataclass
class Grid:
    server: ServerProc
    worker: WorkerProc
    admin: Client
    alice: Client
    bob: Client
    app: str
    pause: Path

    @property
    def url(self) -> str:
        return self.server.url


def make_grid(root: Path) -> Grid:
    """A server, two standard users (alice submits, bob is a stranger to her works), an app that prints its
    arguments, and one worker that starts paused (tests resume it when they want works to run)."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    server = ServerProc(home=root / "home", args=FAST).start()
    admin = server.client()
    clients = {}
    for name in ("alice", "bob"):
        admin.create_user(name, password=PASSWORD)
        clients[name] = Client(server.url, ca=str(server.ca), login=name, password=PASSWORD)
    app = f"echo-{uuid.uuid4().hex[:6]}"
    script = root / "echo.sh"
    script.write_text("#!/bin/sh\necho \"job says: $*\"\necho \"to stderr: $1\" >&2\n")
    script.chmod(0o755)
    admin.put_app(app, binaries={"linux/x86_64": script}, access_rights="0x755")
    pause = root / "paused"
    pause.touch()
    worker = WorkerProc(server, root / "worker", pool=2,
                        sections={"activation": {"pause_file": str(pause)}}).start()
    worker.wait_status(lambda s: s.get("host") is not None and not s["active"], what="the paused worker")
    return Grid(server, worker, admin, clients["alice"], clients["bob"], app, pause)


def stop_grid(g: Grid) -> None:
    g.worker.stop()
    for c in (g.admin, g.alice, g.bob):
        c.close()
    g.server.stop()


def log_in(page: Any, url: str, login: str, password: str = PASSWORD, path: str = "/ui/") -> None:
    """Open ``path`` (the login page shows), log in, and wait until the user's name is in the header."""
    page.goto(url + path)
    page.fill("#login", login)
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_selector(f".who .user:text-is('{login}')")
