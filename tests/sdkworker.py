"""The SDK acting as a worker: the protocol steps a real worker takes, driven by hand from a test."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xwhep.client import Client


class SdkWorker:
    def __init__(self, client: Client, name: str = "w", **desc: Any) -> None:
        base = {"name": name, "os": "linux", "cpu": "x86_64", "cores": 2, "memory": 4096, "disk": 10000}
        base.update(desc)
        self.registration = client.register_host(base)
        self.host = self.registration["uid"]
        self.c = client.host_client(self.registration)  # a host speaks only with its own token

    def take(self, k: int = 1, wait: float = 0.0) -> list[dict[str, Any]]:
        return self.c.request_works(self.host, max=k, wait=wait)

    def alive(self, tasks: list[str] | None = None, results: list[str] | None = None) -> dict[str, Any]:
        return self.c.alive(self.host, tasks or [], results or [])

    def finish(self, task: str, result: bytes | None = None, rc: int = 0, status: str = "COMPLETED",
               reason: str | None = None, tmp: Path | None = None, upload: bool = True) -> dict[str, Any]:
        rep: dict[str, Any] = {"task": task, "status": status, "return_code": rc}
        if reason:
            rep["reason"] = reason
        if result is not None:
            rep["result"] = {"sha256": hashlib.sha256(result).hexdigest(), "size": len(result), "name": "out.txt"}
        out = self.c.report(self.host, [rep])[0]
        if out["outcome"] == "upload" and upload:
            assert tmp is not None
            f = tmp / f"{task}.out"
            f.write_bytes(result or b"")
            self.c.upload(out["result"], f)
        return out


def wait_status(client: Client, uid: str, wanted: set[str], timeout: float = 30.0) -> str:
    """Poll the API until the work reaches one of ``wanted`` (the observable event for a client)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        status = client.work(uid)["status"]
        if status in wanted:
            return str(status)
        if time.monotonic() > deadline:
            raise AssertionError(f"work {uid} stayed {status}, wanted {wanted}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy (returned); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
