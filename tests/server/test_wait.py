"""``POST /works/wait``: a long-poll on works' states (what ``xw wait`` and ``Client.wait`` use)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cluster import ServerProc
from sdkworker import SdkWorker

from xwhep.client import Client, XwError


def _app(admin: Client, tmp: Path) -> str:
    prog = tmp / "prog.sh"
    prog.write_text("#!/bin/sh\n")
    admin.put_app("waitapp", binaries={"linux/x86_64": prog})
    return "waitapp"


def _wait(client: Client, works: list[str], known: dict[str, str], timeout: float) -> dict[str, str]:
    out: dict[str, str] = client._json("POST", "/works/wait", json={"works": works, "known": known,
                                                                   "timeout": timeout})["works"]
    return out


def test_wait_answers_when_a_state_changes(make_server: Callable[..., ServerProc], db_url: str | None,
                                           tmp_path: Path) -> None:
    srv = make_server(db_url)
    admin = srv.client()
    app = _app(admin, tmp_path)
    w1, w2 = (admin.submit(app, args=str(i))["uid"] for i in range(2))
    # nothing known yet: the states at once
    assert _wait(admin, [w1, w2], {}, 60) == {w1: "PENDING", w2: "PENDING"}
    wk = SdkWorker(srv.client("worker"))
    tasks = {a["work"]: a["task"] for a in wk.take(2)}
    assert _wait(admin, [w1, w2], {w1: "PENDING", w2: "PENDING"}, 60) == {w1: "RUNNING", w2: "RUNNING"}

    # a long-poll held by the server returns when the report lands, not at its timeout
    got: dict[str, Any] = {}
    poller = threading.Thread(target=lambda: got.update(_wait(admin, [w1, w2], {w1: "RUNNING", w2: "RUNNING"},
                                                              120)))
    poller.start()
    wk.finish(tasks[w1])
    poller.join(timeout=60)
    assert not poller.is_alive(), "the long-poll did not answer the state change"
    assert got == {w1: "COMPLETED", w2: "RUNNING"}

    # timeout 0: where they stand; the SDK's wait returns once both are final
    assert _wait(admin, [w1, w2], {w1: "COMPLETED", w2: "RUNNING"}, 0) == {w1: "COMPLETED", w2: "RUNNING"}
    seen: list[tuple[str, str]] = []
    done = threading.Thread(target=lambda: got.update(admin.wait([w1, w2], timeout=120,
                                                                 on_change=lambda u, s: seen.append((u, s)))))
    got.clear()
    done.start()
    wk.finish(tasks[w2], rc=3, status="FAILED")
    done.join(timeout=60)
    assert not done.is_alive()
    assert got == {w1: "COMPLETED", w2: "FAILED"}
    assert (w2, "FAILED") in seen


def test_wait_refusals(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    admin = srv.client()
    app = _app(admin, tmp_path)
    admin.create_user("carol", "carol's password", "STANDARD_USER")
    carol = Client(srv.url, ca=str(srv.ca), login="carol", password="carol's password")
    mine = admin.submit(app, access_rights="0x700")["uid"]
    for works in ([mine], ["0190aaaa-0000-7000-8000-000000000000"]):  # unreadable and unknown read the same
        with pytest.raises(XwError) as err:
            _wait(carol, works, {}, 0)
        assert err.value.status == 404 and err.value.field == "works"
    with pytest.raises(XwError) as err:
        _wait(admin, [], {}, 0)
    assert err.value.status == 400 and "works" in (err.value.field or err.value.message)
    with pytest.raises(XwError) as err:
        _wait(admin, ["not-a-uid"], {}, 0)
    assert err.value.status == 400 and err.value.field == "works.0"
    with pytest.raises(XwError) as err:
        _wait(admin, [mine], {}, 3600)
    assert err.value.status == 400 and "timeout" in (err.value.field or err.value.message)
