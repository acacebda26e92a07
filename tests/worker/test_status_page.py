"""The volunteer's view through a real worker: the local status page in a real browser (state, running jobs,
statistics, pause and resume), its protection (token, Host, Origin), and ``xwworker pause`` / ``resume``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import ServerProc
from sdkworker import wait_status
from workerproc import WorkerProc

from xwhep.client import Client

pytestmark = [pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
              pytest.mark.timeout(180)]
FAST = ["--alive-period", "0.5", "--alive-timeout", "5"]


def xwworker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xwhep.worker", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc(home=tmp_path_factory.mktemp("volunteer"), args=FAST).start()
    yield srv
    srv.stop()


def put_app(c: Client, tmp: Path, script: str) -> str:
    name = f"app-{uuid.uuid4().hex[:6]}"
    path = tmp / name
    path.write_text(script)
    path.chmod(0o755)
    c.put_app(name, binaries={"linux/x86_64": path})
    return name


def test_status_page_shows_the_worker_and_pauses_it(server: ServerProc, tmp_path: Path, browser: Any) -> None:
    worker = WorkerProc(server, tmp_path / "w", sections={"worker": {"status_port": 0}}).start()
    c = server.client()
    try:
        host = worker.wait_status(lambda s: s.get("host") is not None)["host"]
        quick = put_app(c, tmp_path, "#!/bin/sh\necho done\n")
        slow = put_app(c, tmp_path, "#!/bin/sh\nsleep 120\n")
        done = c.submit(quick, expected_host=host)
        assert c.wait([done["uid"]], timeout=60)[done["uid"]] == "COMPLETED"
        out = xwworker("status", "--page", "--workdir", str(worker.workdir))
        assert out.returncode == 0, out.stderr
        url = out.stdout.strip()
        base, token = url.split("#token=")
        assert base.startswith("http://127.0.0.1:") and len(token) > 30
        key = worker.workdir / "status.token"
        assert key.stat().st_mode & 0o777 == 0o600 and key.read_text().strip() == token

        # the page's protection, without a browser
        with httpx.Client(base_url=base) as http:
            assert http.get("/api/status").status_code == 401
            assert http.get("/api/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
            ok = http.get("/api/status", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200 and ok.json()["status"]["host"] == host
            rebound = http.get("/api/status", headers={"Authorization": f"Bearer {token}", "Host": "evil.test:80"})
            assert rebound.status_code == 421
            forged = http.post("/api/pause", headers={"Authorization": f"Bearer {token}",
                                                      "Origin": "http://evil.test"})
            assert forged.status_code == 403 and not (worker.workdir / "paused").exists()
            assert http.post("/api/pause").status_code == 401 and not (worker.workdir / "paused").exists()
            page = http.get("/")
            assert "script-src 'self'" in page.headers["content-security-policy"] and token not in page.text

        page = browser.new_page()
        try:
            _drive(page, url, c, slow, host, worker)
        finally:
            page.close()
    finally:
        worker.stop()
        c.close()


def _drive(page: Any, url: str, c: Client, slow: str, host: str, worker: WorkerProc) -> None:
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#state")
    assert "#token" not in page.url  # the key leaves the address bar
    assert page.inner_text("#state") == "Idle"
    page.wait_for_function("() => [...document.querySelectorAll('.tile')].some((t) => t.textContent.startsWith("
                           "'Jobs done') && t.querySelector('.tile-value').textContent === '1')")
    assert "cpu time given" in page.inner_text("main").lower()
    # a long job shows as running
    work = c.submit(slow, expected_host=host)
    page.wait_for_selector(f"#jobs code:text-is('{work['uid'][:8]}')", timeout=60_000)
    assert page.inner_text("#state") == "Running"
    if os.environ.get("XW_DOCS_SCREENSHOT"):  # refresh the picture in docs/ on request
        page.set_viewport_size({"width": 1100, "height": 760})
        page.screenshot(path=str(Path(__file__).resolve().parents[2] / "docs" / "img" / "volunteer.png"))
    # pause: the job stops and goes back to the server; the worker says it is paused
    page.click("#toggle")
    page.wait_for_selector("#state:text-is('Paused')")
    assert (worker.workdir / "paused").exists()
    worker.wait_status(lambda s: not s["active"] and not s["running"], what="the worker paused")
    assert wait_status(c, work["uid"], {"PENDING"}) == "PENDING"
    page.wait_for_selector("#no-jobs")
    assert page.get_attribute("#toggle", "aria-pressed") == "true"
    # resume: the work runs here again
    page.click("#toggle")
    page.wait_for_selector(f"#jobs code:text-is('{work['uid'][:8]}')", timeout=60_000)
    assert not (worker.workdir / "paused").exists()
    assert page.inner_text("#state") == "Running"
    c.cancel(work["uid"])
    assert not problems, problems


def test_pause_and_resume_commands_through_a_real_worker(server: ServerProc, tmp_path: Path) -> None:
    worker = WorkerProc(server, tmp_path / "w").start()
    c = server.client()
    args = ["--config", str(worker.config), "--workdir", str(worker.workdir)]
    try:
        host = worker.wait_status(lambda s: s.get("host") is not None and s["active"])["host"]
        out = xwworker("pause", *args)
        assert out.returncode == 0 and out.stdout.startswith("paused"), out
        st = worker.wait_status(lambda s: not s["active"], what="the worker paused by the command")
        assert "paused by" in st["idle_reason"] and str(worker.workdir / "paused") in st["idle_reason"]
        assert xwworker("pause", *args).stdout.startswith("already paused")
        shown = xwworker("status", "--workdir", str(worker.workdir))
        assert "inactive" in shown.stdout and "paused by" in shown.stdout, shown.stdout
        app = put_app(c, tmp_path, "#!/bin/sh\necho resumed\n")
        work = c.submit(app, expected_host=host)
        assert c.wait([work["uid"]], timeout=3)[work["uid"]] == "PENDING"  # a paused worker takes nothing
        out = xwworker("resume", *args)
        assert out.returncode == 0 and out.stdout.strip() == "resumed", out
        assert c.wait([work["uid"]], timeout=60)[work["uid"]] == "COMPLETED"
        assert worker.wait_status(lambda s: s["active"])["active"]
        assert xwworker("resume", *args).stdout.startswith("not paused")
        # no status page on this worker: one readable line, exit 1
        no_page = xwworker("status", "--page", "--workdir", str(worker.workdir))
        assert no_page.returncode == 1 and no_page.stderr.startswith("xwworker: error: no status page")
        assert "Traceback" not in no_page.stderr
        assert json.loads(xwworker("status", "--json", "--workdir", str(worker.workdir)).stdout)["active"]
    finally:
        worker.stop()
        c.close()
