"""A worker identity acts only on its own tasks; a revoked worker credential is refused at once."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import ServerProc
from sdkworker import SdkWorker

from xwhep.client import Client, XwError


def _status(fn: Callable[[], object]) -> int:
    with pytest.raises(XwError) as err:
        fn()
    assert err.value.status is not None
    return err.value.status


def test_worker_scope_and_revocation(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client()
    prog = tmp_path / "p.sh"
    prog.write_text("#!/bin/sh\necho hi\n")
    admin.put_app("scoped", binaries={"linux/x86_64": prog})
    admin.create_user("worker2", "worker2-password", "WORKER_USER")
    w1 = SdkWorker(srv.client("worker"), "h1")
    c2 = Client(srv.url, ca=str(srv.ca), login="worker2", password="worker2-password")
    w2 = SdkWorker(c2, "h2")

    # a worker identity cannot submit works nor create data; the refusal is audited
    assert _status(lambda: w1.c.submit("scoped")) == 403
    assert _status(lambda: w1.c.create_data("x", 1, "0" * 64)) == 403
    assert "access.denied" in [e["action"] for e in admin.events(limit=20)]

    work = admin.submit("scoped")
    [a] = w1.take(1, wait=2)
    task, binary = a["task"], a["app"]["binary"]["uid"]
    # the other worker sees nothing of it
    assert _status(lambda: c2.get(task)) == 404
    assert _status(lambda: c2.work(work["uid"])) == 404
    assert _status(lambda: c2.tasks(work["uid"])) == 404
    assert _status(lambda: c2.download(binary, tmp_path / "stolen")) == 404
    assert _status(lambda: c2.alive(w1.host, [task])) == 404  # not its host
    assert _status(lambda: c2.report(w1.host, [{"task": task, "status": "COMPLETED"}])) == 404
    assert w2.finish(task, None)["outcome"] == "stale"  # through its own host: not its task
    assert admin.work(work["uid"])["status"] == "RUNNING"
    # the assigned worker may read what its task needs, and report
    w1.c.download(binary, tmp_path / "bin")
    assert (tmp_path / "bin").read_bytes() == prog.read_bytes()
    out = w1.finish(task, b"result\n", tmp=tmp_path, upload=False)
    assert out["outcome"] == "upload"
    f = tmp_path / "r"
    f.write_bytes(b"result\n")
    assert _status(lambda: c2.upload(out["result"], f)) == 404  # not its task's result
    w1.c.upload(out["result"], f)
    assert admin.work(work["uid"])["status"] == "COMPLETED"
    assert hashlib.sha256(b"result\n").hexdigest() == admin.data(out["result"])["sha256"]

    # revoking worker2 (deleting its user) refuses its unexpired tokens at once, its host's included
    assert w2.c.alive(w2.host)["tasks"] == {}
    uid2 = next(u for u in admin.users() if u["login"] == "worker2")["uid"]
    admin._send("DELETE", f"/users/{uid2}")
    for client, method, path in ((w2.c, "POST", f"/hosts/{w2.host}/alive"), (c2, "GET", "/me")):
        r = client.http.request(method, f"{client.base}{path}", json={} if method == "POST" else None,
                                headers={"Authorization": f"Bearer {client._token}"})
        assert r.status_code == 401 and "revoked" in r.json()["error"], (path, r.text)
    assert _status(lambda: c2.me()) == 401  # the user cannot log in again
    assert _status(lambda: w2.c.alive(w2.host)) == 404  # nor its host (deleted with its owner): register again
