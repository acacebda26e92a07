"""Logs of real processes: the server's access log and work transition lines, the worker's job start and end,
``--log-level``/``--log-json``/``XW_LOG``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cluster import ServerProc
from sdkworker import wait_for
from workerproc import WorkerProc

from xwhep.client import Client


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_server_logs_requests_and_transitions_and_the_worker_its_jobs(tmp_path: Path) -> None:
    srv = ServerProc(home=tmp_path / "home", args=["--log-level", "info", "--log-json"], log=tmp_path / "server.log")
    srv.start()
    worker = None
    try:
        admin = srv.client()
        prog = tmp_path / "prog.sh"
        prog.write_text("#!/bin/sh\nexit 3\n")
        admin.put_app("logapp", binaries={"linux/x86_64": prog})
        worker = WorkerProc(srv, tmp_path / "worker", args=["--log-json"], env={"XW_LOG": "info"}).start()
        uid = admin.submit("logapp", args="a b")["uid"]
        assert admin.wait([uid], timeout=120)[uid] == "COMPLETED"

        def server_lines() -> list[dict[str, Any]]:
            return _json_lines((tmp_path / "server.log").read_text())

        # the COMPLETED line is written once its transaction committed: wait for the line itself
        lines = wait_for(lambda: (ls := server_lines()) and any(
            ln["logger"] == "xwhep.works" and ln["fields"].get("to") == "COMPLETED" for ln in ls) and ls, 30,
                         "the COMPLETED transition line")
        for ln in lines:
            assert set(ln) >= {"ts", "level", "logger", "msg", "fields"}
        moves = [(ln["fields"].get("from"), ln["fields"]["to"]) for ln in lines
                 if ln["logger"] == "xwhep.works" and ln["fields"]["work"] == uid]
        assert moves == [(None, "PENDING"), ("PENDING", "RUNNING"), ("RUNNING", "COMPLETED")]
        access = [ln["fields"] for ln in lines if ln["logger"] == "xwhep.access"]
        submit = [a for a in access if a["method"] == "POST" and a["path"] == "/api/v1/works"]
        assert len(submit) == 1
        assert submit[0]["status"] == 201 and submit[0]["user"] == "admin" and submit[0]["address"] == "127.0.0.1"
        assert isinstance(submit[0]["ms"], float)
        assert not [a for a in access if a["path"].endswith(("/sync", "/alive"))], "hot calls logged at INFO"

        def job_lines() -> list[dict[str, Any]] | None:
            assert worker is not None
            found = [ln for ln in _json_lines(worker.log) if ln["logger"] == "xwhep.worker.jobs"]
            return found if any(ln["msg"].startswith("job end") for ln in found) else None

        jobs = wait_for(job_lines, 30, "the worker's job end line")
        start, end = jobs[0]["fields"], jobs[-1]["fields"]
        assert start["work"] == uid and start["app"] == "logapp" and jobs[0]["msg"].startswith("job start")
        assert end["work"] == uid and end["status"] == "COMPLETED" and end["rc"] == 3 and end["seconds"] >= 0
        assert end["task"] == start["task"] == admin.tasks(uid)[0]["uid"]
    finally:
        if worker is not None:
            worker.stop()
        srv.stop()


def test_plain_lines_and_xw_log_still_work(tmp_path: Path) -> None:
    home = tmp_path / "home"
    log = tmp_path / "server.log"
    srv = ServerProc(home=home, log=log)
    env = os.environ.get("XW_LOG")
    os.environ["XW_LOG"] = "INFO"  # the server process inherits it
    try:
        srv.start()
    finally:
        if env is None:
            del os.environ["XW_LOG"]
        else:
            os.environ["XW_LOG"] = env
    try:
        Client.from_config(srv.admin_conf).me()
        line = wait_for(lambda: next((x for x in log.read_text().splitlines() if "GET /api/v1/me 200" in x), None),
                        30, "the access line")
        assert " INFO xwhep.access GET /api/v1/me 200 " in line and line.endswith(" admin 127.0.0.1")
    finally:
        srv.stop()


def test_bad_log_levels_are_one_clear_line(tmp_path: Path) -> None:
    bad = subprocess.run([sys.executable, "-m", "xwhep.server", "--home", str(tmp_path / "h"), "--port", "0",
                          "--log-level", "loud"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'loud' is not one of debug, info" in bad.stderr
    env = {**os.environ, "XW_LOG": "chatty"}
    t = time.monotonic()
    bad = subprocess.run([sys.executable, "-m", "xwhep.server", "--home", str(tmp_path / "h"), "--port", "0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode != 0 and "XW_LOG: 'chatty' is not one of" in bad.stderr and "Traceback" not in bad.stderr
    assert time.monotonic() - t < 60
    worker = subprocess.run([sys.executable, "-m", "xwhep.worker", "--log-level", "loud", "--config",
                             str(tmp_path / "missing.conf")], capture_output=True, text=True, timeout=60)
    assert worker.returncode == 1 and "'loud' is not one of" in worker.stderr and "Traceback" not in worker.stderr
