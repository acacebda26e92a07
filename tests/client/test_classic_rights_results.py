"""Two classic commands that did something else than asked (issue 13), run as installed scripts against a real
server process:

* ``xwchmod 755`` on an app a standard user owns printed ``0x700`` and exited 0 (the server trimmed the rights
  silently): now refused with the reason, non-zero exit, nothing changed;
* ``xwresults`` on another user's readable work downloaded, then failed to erase it and exited 1: now it
  erases only the caller's own works, says so for the others, and exits 0 when everything was downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import ServerProc
from sdkworker import SdkWorker

from xwhep.client import Client

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    server = ServerProc(home=tmp_path_factory.mktemp("srv")).start()
    with server.client() as admin:
        for login in ("alice", "bob"):
            admin.create_user(login, f"{login}'s password", "STANDARD_USER")
    yield server
    server.stop()


def _conf(srv: ServerProc, login: str, where: Path) -> Path:
    conf = where / f"{login}.conf"
    conf.write_text(f'server = "{srv.url}"\nca = "{srv.ca}"\nlogin = "{login}"\npassword = "{login}\'s password"\n')
    return conf


def _run(conf: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(cwd), "XW_CONFIG": str(conf)}
    env.pop("XW_DEBUG", None)
    p = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=60)
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    return p


def test_xwchmod_refuses_instead_of_clamping(srv: ServerProc, tmp_path: Path) -> None:
    conf = _conf(srv, "alice", tmp_path)
    prog = tmp_path / "tool.sh"
    prog.write_text("#!/bin/sh\ntrue\n")
    sent = _run(conf, "xwsendapp", "tool", "linux", "x86_64", str(prog), cwd=tmp_path)
    assert sent.returncode == 0, sent.stderr
    uri = sent.stdout.strip()
    p = _run(conf, "xwchmod", "755", uri, cwd=tmp_path)
    assert p.returncode == 1 and p.stdout == ""
    line = p.stderr.strip()
    assert "\n" not in line and line.startswith(f"xwchmod: error: {uri}: access_rights: alice (STANDARD_USER) "
                                                "may not open an app beyond 0x1700 (asked 0x755)"), p.stderr
    with Client.from_config(conf) as alice:
        assert alice.app("tool")["access_rights"] == "0x700"  # unchanged
    ok = _run(conf, "xwchmod", "1700", uri, cwd=tmp_path)  # what she may set goes through as asked
    assert ok.returncode == 0 and ok.stdout.strip() == f"{uri} 0x1700", ok.stderr
    # at creation too: asking for more than allowed is refused, not trimmed
    other = _run(conf, "xwsendapp", "tool2", "linux", "x86_64", str(prog), "--xwrights", "0x755", cwd=tmp_path)
    assert other.returncode == 1 and "may not open an app beyond 0x1700" in other.stderr, other.stderr


def test_xwchmod_refuses_a_work_more_open_than_its_app(srv: ServerProc, tmp_path: Path) -> None:
    with srv.client() as admin:
        prog = tmp_path / "private.sh"
        prog.write_text("#!/bin/sh\ntrue\n")
        admin.put_app("private-tool", binaries={"linux/x86_64": prog}, access_rights="0x700")
        work = admin.submit("private-tool", expected_host="nobody")  # never runs: left for the module's others
    conf = srv.admin_conf
    p = _run(conf, "xwchmod", "0x755", work["uri"], cwd=tmp_path)
    assert p.returncode == 1 and "a work is never more open than its app (private-tool is 0x700): asked 0x755, " \
                                 "0x700 at most" in p.stderr, p.stderr


def test_xwresults_erases_only_the_callers_own_works(srv: ServerProc, tmp_path: Path) -> None:
    with srv.client() as admin:
        prog = tmp_path / "echo.sh"
        prog.write_text("#!/bin/sh\necho hi\n")
        admin.put_app("echo", binaries={"linux/x86_64": prog})
    alice_conf, bob_conf = _conf(srv, "alice", tmp_path), _conf(srv, "bob", tmp_path)
    with Client.from_config(alice_conf) as alice, Client.from_config(bob_conf) as bob, \
            Client.from_config(srv.worker_conf) as wc:
        # pinned to this test's host: the module's other works (private ones too) may run on public workers
        alices = alice.submit("echo", access_rights="0x755", expected_host="w-results")["uid"]  # readable by all
        bobs = bob.submit("echo", expected_host="w-results")["uid"]
        worker = SdkWorker(wc, "w-results")
        for task in worker.take(2):
            worker.finish(task["task"], result=f"result of {task['work']}\n".encode(), tmp=tmp_path)
        out = tmp_path / "out"
        p = _run(bob_conf, "xwresults", alices, bobs, "--xwout", str(out), cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert len(p.stdout.splitlines()) == 2  # both downloaded
        assert {f.read_text() for f in out.iterdir()} == {f"result of {alices}\n", f"result of {bobs}\n"}
        notes = [line for line in p.stderr.splitlines() if "downloaded result of" not in line]  # progress lines
        assert notes == [f"xwresults: note: {bob.uri(alices)}: downloaded, not erased: it is another user's work"], \
            p.stderr
        assert alice.work(alices)["status"] == "COMPLETED"  # hers stays
        assert [w["uid"] for w in bob.works() if w["uid"] == bobs] == []  # his own is erased
