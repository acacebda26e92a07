"""A full disk, for real: the server's home on a small tmpfs, filled to the last byte.

Blob uploads and database writes answer 507 "server storage full" (the upload naming its content), the server
keeps serving, logs one line per failure and no traceback; a worker says what the server answered, not "server
unreachable"; and once space is freed everything works again.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cluster import ServerProc
from fsfill import fill_up
from sdkworker import SdkWorker, wait_status
from workerproc import WorkerProc

from xwhep.client import XwError


def _wait_log(log: Path, pred: Callable[[str], bool], timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text() if log.exists() else ""
        if pred(text):
            return text
        assert time.monotonic() < deadline, f"server log never matched; it reads:\n{text[-3000:]}"
        time.sleep(0.05)


def test_full_storage_is_507_and_the_server_carries_on(tmpfs: Callable[[str], Path], tmp_path: Path) -> None:
    fs = tmpfs("size=24m")
    log = tmp_path / "server.log"
    srv = ServerProc(home=fs / "home", log=log).start()
    try:
        admin = srv.client()
        blob = tmp_path / "blob.bin"
        blob.write_bytes(os.urandom(512 * 1024))
        data = admin.create_data("blob.bin", blob.stat().st_size, hashlib.sha256(blob.read_bytes()).hexdigest())
        filler = fill_up(fs)

        # the bytes of a data: refused, nothing of them kept
        with pytest.raises(XwError) as err:
            admin.upload(data["uid"], blob)
        assert err.value.status == 507, err.value.message
        assert "server storage full" in err.value.message and err.value.field == "content"
        assert not list((srv.home / "blobs" / "tmp").iterdir()), "a partial upload was left behind"

        # database writes: refused the same way once SQLite can no longer grow (never a 500)
        statuses = []
        for i in range(400):
            try:
                admin.create_bag("group", f"g{i}-" + "x" * 200)
            except XwError as exc:
                statuses.append(exc.status)
                if exc.status == 507:
                    assert "server storage full" in exc.message
                    break
        assert statuses and statuses[-1] == 507, f"never refused as full: {statuses}"
        assert set(statuses) == {507}, statuses

        # the server carries on: reads work; one line per failure in its log, no traceback
        assert admin.version()["api"] == "v1"
        text = _wait_log(log, lambda t: t.count("storage full") >= 2)
        assert "Traceback" not in text, text[-3000:]

        # room again: the same upload goes through
        filler.unlink()
        assert admin.upload(data["uid"], blob)["status"] == "AVAILABLE"
        assert "Traceback" not in log.read_text()
    finally:
        srv.stop()


def test_worker_says_storage_full_not_unreachable(tmpfs: Callable[[str], Path], tmp_path: Path) -> None:
    """A real worker whose result cannot be stored: it says what the server answered (507, storage full), keeps
    the result, and delivers it once there is room."""
    fs = tmpfs("size=24m")
    srv = ServerProc(home=fs / "home", log=tmp_path / "server.log").start()
    worker = WorkerProc(srv, tmp_path / "worker")
    try:
        admin = srv.client()
        script = tmp_path / "app.sh"
        script.write_text("#!/bin/sh\nhead -c 65536 /dev/urandom > out.bin\necho done\n")
        admin.put_app("full-app", binaries={"linux/x86_64": script})
        work = admin.submit("full-app")["uid"]
        filler = fill_up(fs)
        worker.start()

        def said_full(status: dict[str, object]) -> bool:
            return "storage full" in str(status.get("idle_reason")) or "storage full" in worker.log

        status = worker.wait_status(said_full, timeout=60, what="the worker saying the server's storage is full")
        assert "unreachable" not in str(status.get("idle_reason")), status
        assert "unreachable" not in worker.log, worker.log_tail()
        assert "HTTP 507" in str(status.get("idle_reason")) + worker.log

        filler.unlink()
        wait_status(admin, work, {"COMPLETED"}, timeout=60)  # the result kept by the worker, delivered now
    finally:
        worker.stop()
        srv.stop()


def test_full_storage_on_the_fast_path_is_507(tmpfs: Callable[[str], Path], tmp_path: Path) -> None:
    """The workers' hot call (sync, below FastAPI) gives the same answer when its transaction cannot commit."""
    fs = tmpfs("size=24m")
    log = tmp_path / "server.log"
    srv = ServerProc(home=fs / "home", log=log).start()
    try:
        admin = srv.client()
        script = tmp_path / "app.sh"
        script.write_text("#!/bin/sh\necho hi\n")
        admin.put_app("full-app", binaries={"linux/x86_64": script})
        w = SdkWorker(srv.client("worker"))
        fill_up(fs)
        refused = None
        for i in range(400):  # submissions until the database can take no more
            try:
                admin.submit("full-app", args=f"{i} " + "y" * 2000)
            except XwError as exc:
                assert exc.status == 507, exc.message
                refused = exc
                break
        assert refused is not None
        with pytest.raises(XwError) as err:
            for _ in range(50):  # claims write: one of these cannot commit
                w.c.sync(w.host, max=1)
        assert err.value.status == 507 and "server storage full" in err.value.message
        text = _wait_log(log, lambda t: "storage full: POST /api/v1/hosts/" in t)
        assert "Traceback" not in text, text[-3000:]
        with httpx.Client(verify=ssl.create_default_context(cafile=str(srv.ca))) as http:
            assert http.get(srv.url + "/api/v1/health").status_code == 200
    finally:
        srv.stop()
