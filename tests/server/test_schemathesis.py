"""Schemathesis over the served OpenAPI document, against a real server process, as an administrator and as a
standard user: every check (server errors, undocumented statuses, response schemas and headers, valid data
accepted and invalid data refused, authentication, Allow headers, resources usable after creation and gone after
deletion), every phase (examples, coverage, fuzzing, and stateful runs along the document's links).

Bounded in time: each run has a time budget (``--max-time``; the stateful run its own, so that it follows many
links) and few examples per operation; the server's long polls are capped low (server.toml) so that no request
waits long. The seed is fixed: a failure reproduces.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import ServerProc

from xwhep.client import Client

HERE = Path(__file__).parent
SEED = 20261204


@pytest.fixture(params=["admin", "standard user"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[ServerProc, str, str]]:
    """A server of its own for each role (what one run creates, changes or deletes never meets the other run),
    and the role's bearer token."""
    home = tmp_path_factory.mktemp("schemathesis")
    # long polls answer within 2 s (the document allows clients to ask for up to 600 s)
    (home / "server.toml").write_text("max_long_poll = 2\nmax_wait = 2\n")
    s = ServerProc(home=home, log=home / "server.log").start()
    try:
        admin = s.client()
        if request.param == "admin":
            token = admin.login()
        else:
            admin.create_user("alice", password="alice-password", level="STANDARD_USER")
            token = Client(s.url, login="alice", password="alice-password", ca=str(s.ca)).login()
        yield s, request.param, token
    finally:
        s.stop()


@pytest.mark.parametrize(("phases", "budget"), [("examples,coverage,fuzzing", 30), ("stateful", 20)])
def test_schemathesis_finds_nothing(served: tuple[ServerProc, str, str], phases: str, budget: int,
                                    tmp_path: Path) -> None:
    srv, role, token = served
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(HERE / "schemathesis.toml"),
           "run", f"{srv.url}/openapi.json", "--checks", "all", "--phases", phases,
           "--max-examples", "8", "--max-time", str(budget), "--seed", str(SEED), "--no-shrink",
           "--request-timeout", "10", "--tls-verify", str(srv.ca),
           "-H", f"Authorization: Bearer {token}", "--report", "junit", "--report-dir", str(tmp_path)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=budget * 4, stdin=subprocess.DEVNULL,
                       cwd=tmp_path)  # its cache directory goes there, not into the work tree
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"Schemathesis ({role}, {phases}) found problems:\n{out[-20000:]}"
    assert "Tested:" in out
    if phases == "stateful":  # the document's links are followed, not only declared
        covered = re.search(r"API Links:\s+(\d+) covered", out)
        assert covered and int(covered.group(1)) >= 5, out[-5000:]
    assert srv.log is not None and "Traceback" not in srv.log.read_text()
