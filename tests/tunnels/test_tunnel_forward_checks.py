"""Forward addresses (issue 13): checked when the work is submitted, not only when its job connects; and a job
whose server proxy has nothing listening behind it learns why, as does the proxy's owner.

Real server, worker (bubblewrap), xwproxy and xwsubmit processes (the shared tunnel grid).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from tunnels.tunnelgrid import FINAL, Grid, Proxy, needs_bwrap, result_files, wait_for, xw

pytestmark = [needs_bwrap, pytest.mark.timeout(180)]


def _submit_refused(conf: Path, *args: str) -> str:
    p = xw("submit", conf, *args, check=False)
    assert p.returncode == 1 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("xwsubmit: error: forward_addresses: "), p.stderr
    return p.stderr


def test_job_to_job_address_needs_the_right_to_execute_the_target(grid: Grid) -> None:
    """xw://server/UID:PORT of a work the submitter may not execute was accepted at submission."""
    private = grid.submit(grid.alice, "web", "8080", "--xwlistenport", "8080", "--xwrights", "0x700")
    readable = grid.submit(grid.alice, "web", "8080", "--xwlistenport", "8080", "--xwrights", "0x740")
    server = grid.server.conf()["server"].split("//", 1)[1]
    try:
        for target in (private, readable):
            address = f"xw://{server}/{target}:8080"
            # bob (another group) may not even read them: as for an unknown work (no existence leak)
            assert f"{address}: no work {target}" in _submit_refused(
                grid.bob, "fetch", "http://localhost:1234/", "--xwforwardaddresses", f"{address},1234")
        # carol (alice's group) may read the 0x740 one, not execute it
        assert "carol may not execute work" in _submit_refused(
            grid.carol, "fetch", "http://localhost:1234/", "--xwforwardaddresses",
            f"xw://{server}/{readable}:8080,1234")
        # a port the target does not listen on
        assert "does not listen on port 9999" in _submit_refused(
            grid.alice, "fetch", "http://localhost:1234/", "--xwforwardaddresses",
            f"xw://{server}/{private}:9999,1234")
        # its owner may
        ok = grid.submit(grid.alice, "fetch", "http://localhost:1234/", "--xwforwardaddresses",
                         f"xw://{server}/{private}:8080,1234")
        grid.end(ok)
    finally:
        grid.end(private)
        grid.end(readable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_nothing_listening_behind_a_server_proxy_is_explained_in_both_logs(grid: Grid, tmp_path: Path) -> None:
    """The job got a bare reset and neither side said why."""
    port = _free_port()  # nothing listens there
    with Proxy(grid.alice, "--xwlistenport", str(port)) as proxy:
        address = proxy.line()
        uid = grid.submit(grid.alice, "fetch", "http://localhost:1234/page.txt", "--xwforwardaddresses",
                          f"{address},1234")
        try:
            work = grid.wait_status(uid, FINAL)
            files = result_files(grid.admin, uid, tmp_path)
            why = f"nothing listens on the client's port {port}"
            wait_for(lambda: why in proxy.stderr, 15, "xwproxy to say why")
        finally:
            grid.end(uid)
    assert work["return_code"] != 0 and "fetched.txt" not in files
    stderr = next(v for k, v in files.items() if "stderr" in k).decode()
    # the job's side: the forwarder's line on the job's stderr (next to curl's own complaint)
    assert f"xwfwd: localhost:1234: {address}: {why}" in stderr or \
        f"xwfwd: localhost:1234: refused: {address}: {why}" in stderr, stderr
    # the client's side
    assert f"xwproxy: error: a job's connection was refused: {why}" in proxy.stderr, proxy.stderr
