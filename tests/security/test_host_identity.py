"""Issue 13: one volunteer could impersonate another. Every worker logs in with the same worker.conf credential; a
second host registered with it downloaded a private stdin of a task running elsewhere, sent alives for that task
and uploaded a forged result that completed the work. Each host now has its own identity (a key issued at
registration, tokens bound to the host uid), and a task's data, alives, reports and uploads are accepted only from
the host it was given to."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import ServerProc
from sdkworker import SdkWorker, wait_for, wait_status

from xwhep.client import Client, XwError


def _status(fn: Callable[[], object]) -> int:
    with pytest.raises(XwError) as err:
        fn()
    assert err.value.status is not None
    return err.value.status


def _setup(srv: ServerProc, tmp: Path) -> tuple[Client, dict[str, Any], str]:
    """A standard user with a private stdin and a work reading it; returns (user client, work, stdin uid)."""
    admin = srv.client()
    admin.create_user("alice", "alice-password")
    prog = tmp / "p.sh"
    prog.write_text("#!/bin/sh\ncat\n")
    admin.put_app("cat", binaries={"linux/x86_64": prog}, access_rights="0x755")
    alice = Client(srv.url, ca=str(srv.ca), login="alice", password="alice-password")
    secret = tmp / "secret.txt"
    secret.write_bytes(b"alice's secret input\n")
    stdin = alice.put_data(secret)
    work = alice.submit("cat", stdin=stdin["uid"])
    return alice, work, stdin["uid"]


def test_second_host_with_the_shared_credential_cannot_impersonate(make_server: Callable[..., ServerProc],
                                                                      tmp_path: Path) -> None:
    srv = make_server(args=["--alive-timeout", "3", "--alive-period", "0.5"])
    alice, work, stdin = _setup(srv, tmp_path)
    a = SdkWorker(srv.client("worker"), "honest")
    b = SdkWorker(srv.client("worker"), "intruder")  # the same worker.conf credential, another host
    assert a.host != b.host
    [task] = a.take(1, wait=5)
    assert task["work"] == work["uid"]

    # the intruder host reads nothing of the other host's task
    assert _status(lambda: b.c.download(stdin, tmp_path / "stolen")) == 404
    assert not (tmp_path / "stolen").exists()
    # its alives for the task are refused (stop), and do not keep the task alive: the honest host goes silent
    # and the task is lost at the alive timeout although the intruder keeps naming it
    reply = b.alive([task["task"]], [task["task"]])
    assert reply["tasks"] == {task["task"]: "stop"}
    assert task["task"] in reply["ack"]
    # a forged report is stale, a forged upload finds nothing to write
    forged = b"forged result\n"
    assert b.finish(task["task"], forged, tmp=tmp_path, upload=False)["outcome"] == "stale"
    out = a.finish(task["task"], b"honest result\n", tmp=tmp_path, upload=False)
    assert out["outcome"] == "upload"
    f = tmp_path / "forged"
    f.write_bytes(forged)
    assert _status(lambda: b.c.upload(out["result"], f)) == 404
    assert alice.work(work["uid"])["status"] == "DATAREQUEST"

    # with the honest host silent, the intruder's alives do not save the task: it is LOST and the work requeued
    wait_for(lambda: b.alive([task["task"]], [task["task"]]) and
             alice.work(work["uid"])["status"] == "PENDING", 30, "the silent host's task to be lost")
    tasks = alice.tasks(work["uid"])
    assert [t["status"] for t in tasks] == ["LOST"]
    # the honest host's own host calls still work, and the intruder's token cannot act for it
    assert _status(lambda: b.c.alive(a.host)) == 404
    assert _status(lambda: b.c.sync(a.host)) == 404


def test_alive_of_another_host_never_refreshes_its_task(make_server: Callable[..., ServerProc],
                                                        tmp_path: Path) -> None:
    """The alive path itself (hot path, in memory): a task known to run on host A is not marked alive by B."""
    srv = make_server(args=["--alive-timeout", "2", "--alive-period", "0.5"])
    alice, work, _ = _setup(srv, tmp_path)
    a = SdkWorker(srv.client("worker"), "a")
    b = SdkWorker(srv.client("worker"), "b")
    [task] = a.take(1, wait=5)
    assert a.alive([task["task"]])["tasks"] == {task["task"]: "continue"}  # known to run on A from now on
    for _ in range(3):
        assert b.c.sync(b.host, tasks=[task["task"]])["tasks"] == {task["task"]: "stop"}
    wait_for(lambda: b.alive([task["task"]]) and alice.work(work["uid"])["status"] == "PENDING", 30,
             "the task to be lost despite the other host's alives")


def test_registering_a_known_uid_never_takes_it_over(make_server: Callable[..., ServerProc]) -> None:
    """Registration with another host's uid (no key, a wrong key, or an unknown uid) makes a new host, with the
    same answer whether the uid existed or not: no takeover, no existence oracle."""
    srv = make_server()
    worker = srv.client("worker")
    first = worker.register_host({"name": "a"})
    assert first["key"] and first["token"]
    unknown = "01234567-89ab-7def-8123-456789abcdef"
    answers = [worker.register_host({"name": "x", "uid": first["uid"]}),
               worker.register_host({"name": "x", "uid": first["uid"], "key": "wrong" + first["key"]}),
               worker.register_host({"name": "x", "uid": unknown}),
               worker.register_host({"name": "x", "uid": unknown, "key": first["key"]})]
    uids = {r["uid"] for r in answers}
    assert len(uids) == 4 and first["uid"] not in uids and unknown not in uids
    assert all(set(r) == set(answers[0]) for r in answers)  # the same shape of answer every time
    # its own key refreshes the same host (and gives no new key)
    again = worker.register_host({"name": "a2", "uid": first["uid"], "key": first["key"]})
    assert again["uid"] == first["uid"] and "key" not in again and again["name"] == "a2"
    # another identity cannot refresh it even with the key: it gets a host of its own
    srv.client().create_user("w2", "w2-password", "WORKER_USER")
    other = Client(srv.url, ca=str(srv.ca), login="w2", password="w2-password")
    taken = other.register_host({"name": "a3", "uid": first["uid"], "key": first["key"]})
    assert taken["uid"] != first["uid"]


def test_host_token_acts_only_as_its_host(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    alice, work, _ = _setup(srv, tmp_path)
    a = SdkWorker(srv.client("admin"), "admins-host")  # even an administrator's host token is only a host's
    for call in (lambda: a.c.works(), lambda: a.c.work(work["uid"]), lambda: a.c.users(),
                 lambda: a.c.submit("cat"), lambda: a.c.hosts()):
        assert _status(call) == 403
    assert a.c.me()["login"] == "admin"
    # the user credential is refused on the host's protocol (use the host's token)
    assert _status(lambda: srv.client("admin").sync(a.host)) == 403
    assert _status(lambda: alice.sync(a.host)) == 404  # not its host: nothing to learn


def test_host_key_renews_its_token_and_deletion_revokes_it(make_server: Callable[..., ServerProc],
                                                           tmp_path: Path) -> None:
    srv = make_server()
    alice, work, _ = _setup(srv, tmp_path)
    w = SdkWorker(srv.client("worker"), "h")
    [task] = w.take(1, wait=5)
    # a fresh token from the key alone (what a worker does after a restart or expiry)
    with httpx.Client(verify=ssl.create_default_context(cafile=str(srv.ca))) as http:
        r = http.post(f"{srv.url}/api/v1/auth/host", json={"host": w.host, "key": w.registration["key"]})
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        bad = http.post(f"{srv.url}/api/v1/auth/host", json={"host": w.host, "key": "x" * 43})
        unknown = http.post(f"{srv.url}/api/v1/auth/host",
                            json={"host": "01234567-89ab-7def-8123-456789abcdef", "key": w.registration["key"]})
        assert bad.status_code == unknown.status_code == 401 and bad.json() == unknown.json()
        hdr = {"Authorization": f"Bearer {token}"}
        assert http.post(f"{srv.url}/api/v1/hosts/{w.host}/alive", json={}, headers=hdr).status_code == 200
        # the volunteer's user may not delete another's host; the administrator may: at once, the host's key and
        # tokens stop working and its running work goes back to PENDING (no alive timeout to wait for)
        assert _status(lambda: alice._send("DELETE", f"/hosts/{w.host}")) == 404
        srv.client()._send("DELETE", f"/hosts/{w.host}")
        assert http.post(f"{srv.url}/api/v1/hosts/{w.host}/alive", json={}, headers=hdr).status_code == 404
        assert http.post(f"{srv.url}/api/v1/auth/host",
                         json={"host": w.host, "key": w.registration["key"]}).status_code == 401
    assert alice.work(work["uid"])["status"] == "PENDING"
    assert [t["status"] for t in alice.tasks(work["uid"])] == ["LOST"]
    assert _status(lambda: w.finish(task["task"], None)) == 404
    # the SDK says what to do: register again
    with pytest.raises(XwError) as err:
        w.c._token = None
        w.c.alive(w.host)
    assert err.value.status == 404 and "register again" in err.value.message


def test_real_worker_keeps_its_host_across_restarts(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    """A worker process stores its host key (0600) and comes back as the same host; a copied workdir with a
    wrong key becomes a new host."""
    from workerproc import WorkerProc

    srv = make_server()
    w = WorkerProc(srv, tmp_path / "w1").start()
    first = w.wait_status(lambda s: bool(s.get("host")), 30, "the worker to register")["host"]
    saved = (w.workdir / "host.json")
    assert saved.stat().st_mode & 0o777 == 0o600
    w.stop()
    w.start()
    assert w.wait_status(lambda s: bool(s.get("host")) and s.get("pid") == w.proc.pid, 30,  # type: ignore[union-attr]
                         "the worker to register again")["host"] == first
    w.stop()
    import json

    data = json.loads(saved.read_text())
    data["key"] = "not-the-key"
    saved.write_text(json.dumps(data))
    w.start()
    again = w.wait_status(lambda s: bool(s.get("host")) and s.get("pid") == w.proc.pid, 30,  # type: ignore[union-attr]
                          "the worker to register anew")["host"]
    assert again != first
    w.stop()


def test_result_of_private_work_stays_private(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    """Issue 13: public workers forced works to be world-readable (args, env, results, tunnels). A work is now
    private to its owner by default, whatever its app's rights, and still runs on the public worker."""
    srv = make_server()
    alice, work, _ = _setup(srv, tmp_path)
    srv.client().create_user("bob", "bob-password")
    bob = Client(srv.url, ca=str(srv.ca), login="bob", password="bob-password")
    assert alice.work(work["uid"])["access_rights"] == "0x700"
    w = SdkWorker(srv.client("worker"), "public")
    [task] = w.take(1, wait=5)
    body = b"alice's secret input\n"
    w.finish(task["task"], body, tmp=tmp_path)
    wait_status(alice, work["uid"], {"COMPLETED"})
    result = alice.work(work["uid"])["result"]
    assert hashlib.sha256(body).hexdigest() == alice.data(result)["sha256"]
    assert _status(lambda: bob.work(work["uid"])) == 404
    assert _status(lambda: bob.data(result)) == 404
    assert _status(lambda: bob.download(result, tmp_path / "peek")) == 404
    assert work["uid"] not in {x["uid"] for x in bob.works()}
    # asking for more than the app allows is refused with the reason, never clamped in silence
    alice.put_app("mine", binaries={"linux/x86_64": tmp_path / "p.sh"}, access_rights="0x700")
    with pytest.raises(XwError) as err:
        alice.submit("mine", access_rights="0x755")
    assert err.value.status == 403 and err.value.field == "access_rights" and "never more open" in err.value.message
    open_work = alice.submit("cat", access_rights="0x755")  # what the app allows, when asked for
    assert alice.work(open_work["uid"])["access_rights"] == "0x755"
