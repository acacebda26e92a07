"""``POST /works/wait`` on a group or a label (``xw wait --group/--label``): a long-poll on status counts."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cluster import ServerProc
from sdkworker import SdkWorker

from xwhep.client import Client, XwError


def _xw(srv: ServerProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xwhep.client.cli", "wait", *args, "--config", str(srv.admin_conf)],
                          capture_output=True, text=True, timeout=120)


def test_wait_on_a_group_answers_when_counts_change_and_when_all_are_final(
        make_server: Callable[..., ServerProc], db_url: str | None, tmp_path: Path) -> None:
    srv = make_server(db_url)
    admin = srv.client()
    prog = tmp_path / "prog.sh"
    prog.write_text("#!/bin/sh\n")
    admin.put_app("bagapp", binaries={"linux/x86_64": prog})
    group = admin.create_bag("group", "g")["uid"]
    inside = [admin.submit("bagapp", args=str(i), group=group)["uid"] for i in range(3)]
    admin.submit("bagapp", args="elsewhere", label="L")
    first = admin._json("POST", "/works/wait", json={"group": group, "timeout": 60})
    assert first == {"counts": {"PENDING": 3}, "total": 3, "final": False}
    wk = SdkWorker(srv.client("worker"))
    tasks = {a["work"]: a["task"] for a in wk.take(4)}
    # the SDK waits (long-polls) until all three are final; the worker finishes them meanwhile
    seen: list[dict[str, int]] = []
    got: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: got.update(admin.wait_bag(group=group, timeout=120,
                                                                       on_change=seen.append)))
    waiter.start()
    for w in inside[:2]:
        wk.finish(tasks[w], rc=0)
    wk.finish(tasks[inside[2]], rc=1, status="FAILED")
    waiter.join(timeout=60)
    assert not waiter.is_alive(), "the wait did not return once every work of the group was final"
    assert got == {"COMPLETED": 2, "FAILED": 1}
    assert seen[0] == {"RUNNING": 3} and seen[-1] == got  # counts as they changed, not the work outside
    done = _xw(srv, "--group", group)
    assert done.returncode == 1, done.stderr  # one work FAILED
    assert "COMPLETED  2" in done.stdout and "FAILED     1" in done.stdout
    # a label, with a timeout: exit 3 while its work is still running
    late = _xw(srv, "--label", "L", "--timeout", "0.5")
    assert late.returncode == 3 and "timed out" in late.stderr
    for w, t in tasks.items():
        if w not in inside:
            wk.finish(t, rc=0)
    assert _xw(srv, "--label", "L").returncode == 0


def test_wait_on_a_group_refusals(make_server: Callable[..., ServerProc]) -> None:
    srv = make_server()
    admin = srv.client()
    group = admin.create_bag("group", "private")["uid"]
    admin.create_user("erin", "pw-erinerin")
    erin = Client(srv.url, ca=str(srv.ca), login="erin", password="pw-erinerin")
    with pytest.raises(XwError) as refused:
        erin.wait_bag(group=group, timeout=1)
    assert refused.value.status == 404  # another's private group: as if it did not exist
    with pytest.raises(XwError) as both:
        admin._json("POST", "/works/wait", json={"group": group, "works": [group], "timeout": 0})
    assert both.value.status == 400 and both.value.field == "works"
    with pytest.raises(XwError) as neither:
        admin._json("POST", "/works/wait", json={"timeout": 0})
    assert neither.value.status == 400 and neither.value.field == "works"
    empty = _xw(srv, "--group", group)
    assert empty.returncode == 1 and "no works in group" in empty.stderr and "Traceback" not in empty.stderr
    mixed = _xw(srv, "--group", group, "--label", "x")
    assert mixed.returncode == 2 and "one of them" in mixed.stderr
