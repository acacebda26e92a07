"""``GET /api/v1/events/stream``: the event log as Server-Sent Events (server/eventbus.py), and ``xw events
--follow``. Real server processes; streams read with the SDK (``Client.follow_events``) and raw HTTP."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import ServerProc
from sdkworker import SdkWorker

from xwhep.client import Client, XwError


def _app(admin: Client, tmp: Path) -> str:
    prog = tmp / "prog.sh"
    prog.write_text("#!/bin/sh\n")
    admin.put_app("streamapp", binaries={"linux/x86_64": prog}, access_rights="0x755")
    return "streamapp"


def _user(srv: ServerProc, admin: Client, login: str, **kw: Any) -> Client:
    admin.create_user(login, "pw-" + login * 2, **kw)
    return Client(srv.url, ca=str(srv.ca), login=login, password="pw-" + login * 2)


def _until(events: Iterator[dict[str, Any]], stop: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Read events until ``stop`` says so (the read timeout bounds each wait); the last one included."""
    out = []
    for e in events:
        out.append(e)
        if stop(e):
            return out
    raise AssertionError("the stream ended")


def test_stream_delivers_committed_events_in_order_as_get_events_renders_them(
        make_server: Callable[..., ServerProc], db_url: str | None, tmp_path: Path) -> None:
    srv = make_server(db_url)
    admin = srv.client()
    app = _app(admin, tmp_path)
    before = admin.create_data("before")["uid"]  # committed before the stream opens: not in it
    opened: list[str] = []
    stream = admin.follow_events(on_notice=lambda kind, data: opened.append(kind))
    assert opened == ["open"]  # open when follow_events returns: what follows is in it
    first = admin.submit(app, args="0")["uid"]
    w = admin.submit(app, args="1")["uid"]
    wk = SdkWorker(srv.client("worker"))
    tasks = {a["work"]: a["task"] for a in wk.take(2)}
    wk.finish(tasks[w], rc=0)
    wk.finish(tasks[first], rc=0)
    got = _until(stream, lambda e: e["object"] == first and e.get("target") == "COMPLETED")
    stream.close()
    ids = [e["id"] for e in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "events out of order or repeated"
    assert got[0]["object"] == first and got[0]["action"] == "work.submit"
    assert before not in {e["object"] for e in got}
    mine = [(e["action"], e.get("source"), e.get("target")) for e in got if e["object"] == w]
    assert mine == [("work.submit", None, "PENDING"), ("work.transition", "PENDING", "RUNNING"),
                    ("work.transition", "RUNNING", "COMPLETED")]
    # each event's data is the event as GET /events renders it (plus its id)
    logged = admin.events(w)
    assert [{k: v for k, v in e.items() if k != "id"} for e in got if e["object"] == w] == logged

    # Last-Event-ID: a new stream replays what came after that id, then goes on live
    again = admin.follow_events(after=ids[0])
    replayed = _until(again, lambda e: e["id"] == ids[-1])
    assert [e["id"] for e in replayed] == ids[1:]
    admin.cancel(admin.submit(app, args="2")["uid"])
    live = next(again)
    assert live["action"] == "work.submit" and live["id"] > ids[-1]
    again.close()


def test_stream_shows_only_what_the_caller_may_read(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client()
    app = _app(admin, tmp_path)
    alice, bob = _user(srv, admin, "alice"), _user(srv, admin, "bob")
    alice_stream = alice.follow_events()
    admin_stream = admin.follow_events(action="work.")
    mine = alice.submit(app, args="a")["uid"]  # private to alice
    next_alice = next(alice_stream)
    assert next_alice["object"] == mine and next_alice["action"] == "work.submit"
    first_admin = next(admin_stream)
    assert first_admin["object"] == mine
    theirs = bob.submit(app, args="b")["uid"]  # private to bob (0x700): alice may not read it
    public = bob.submit(app, args="c", access_rights="0x755")["uid"]  # readable by everybody
    bob.me()  # bob logs in: a security event (auth.login), for administrators only
    sentinel = alice.create_data("sentinel")["uid"]  # alice's own action: the last event alice must see
    seen = _until(alice_stream, lambda e: e["object"] == sentinel)
    alice_stream.close()
    objects = {e["object"] for e in seen}
    assert public in objects, "an event on a work alice may read was not sent"
    assert theirs not in objects, "an event on bob's private work reached alice"
    assert not [e for e in seen if e["action"].startswith(("auth.", "access."))], "security events reached alice"
    # the administrator sees every work event, and only work events (action prefix)
    admin_seen = [first_admin, *_until(admin_stream, lambda e: e["object"] == public)]
    admin_stream.close()
    assert {mine, theirs, public} <= {e["object"] for e in admin_seen}
    assert {e["action"] for e in admin_seen} == {"work.submit"}
    # an object filter on something unreadable is 404, as GET /events answers
    with pytest.raises(XwError, match="no object") as refused:
        alice.follow_events(theirs)
    assert refused.value.status == 404


def test_stream_group_and_label_filters(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client()
    app = _app(admin, tmp_path)
    group = admin.create_bag("group", "g1")["uid"]
    by_group, by_label = admin.follow_events(group=group), admin.follow_events(label="L")
    inside = admin.submit(app, args="1", group=group)["uid"]
    outside = admin.submit(app, args="2", label="other")["uid"]
    labelled = admin.submit(app, args="3", label="L")["uid"]
    assert next(by_group)["object"] == inside
    assert next(by_label)["object"] == labelled
    last = admin.submit(app, args="4", group=group, label="L")["uid"]
    assert next(by_group)["object"] == last and next(by_label)["object"] == last
    assert outside not in (inside, labelled)
    by_group.close()
    by_label.close()


def test_streams_per_user_are_bounded_and_freed_on_disconnect(make_server: Callable[..., ServerProc]) -> None:
    from xwhep.server.eventbus import MAX_STREAMS_PER_USER

    srv = make_server()
    admin = srv.client()
    token = admin.login()
    url = srv.url + "/api/v1/events/stream"
    readers: list[Iterator[str]] = []  # kept: a line iterator dropped closes its stream
    with httpx.Client(verify=ssl.create_default_context(cafile=str(srv.ca)), timeout=30) as http, \
            contextlib.ExitStack() as stack:
        def open_stream() -> httpx.Response:
            r = stack.enter_context(http.stream("GET", url, headers={"Authorization": f"Bearer {token}"}))
            if r.status_code == 200:
                assert r.headers["content-type"].startswith("text/event-stream")
                readers.append(r.iter_lines())
                assert next(readers[-1]) == "retry: 2000"  # the stream is open on the server
            return r

        streams = [open_stream() for _ in range(MAX_STREAMS_PER_USER)]
        assert all(r.status_code == 200 for r in streams)
        over = open_stream()
        assert over.status_code == 429
        over.read()
        assert over.json()["field"] == "streams"
        streams[0].close()  # a consumer goes away: its slot is free without waiting for a write to fail
        for _ in range(50):
            again = open_stream()
            if again.status_code == 200:
                break
            again.read()
            import time

            time.sleep(0.1)  # the server notices the disconnect on its own time: bounded retry
        assert again.status_code == 200


def test_stream_refusals(make_server: Callable[..., ServerProc]) -> None:
    srv = make_server()
    with httpx.Client(verify=ssl.create_default_context(cafile=str(srv.ca)), timeout=30) as http:
        r = http.get(srv.url + "/api/v1/events/stream")
        assert r.status_code == 401
        token = srv.client().login()
        r = http.get(srv.url + "/api/v1/events/stream", headers={"Authorization": f"Bearer {token}",
                                                                  "Last-Event-ID": "x12"})
        assert r.status_code == 400 and r.json()["field"] == "Last-Event-ID"


def test_xw_events_follow_prints_events_as_they_come(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client()
    app = _app(admin, tmp_path)
    env_conf = str(srv.admin_conf)
    proc = subprocess.Popen([sys.executable, "-m", "xwhep.client.cli", "events", "--follow", "--action",
                             "work.", "--count", "2", "--format", "json", "--config", env_conf],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the command's stream opens on its own time: submit until it has printed two events
        import json
        import time

        deadline = time.monotonic() + 60
        uids = []
        while proc.poll() is None and time.monotonic() < deadline:
            uids.append(admin.submit(app, args=str(len(uids)))["uid"])
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2 and all(e["action"] == "work.submit" and e["object"] in uids for e in lines)
    bad = subprocess.run([sys.executable, "-m", "xwhep.client.cli", "events", "--follow", "--format", "xml",
                          "--config", env_conf], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--xwformat short or json" in bad.stderr and "Traceback" not in bad.stderr
