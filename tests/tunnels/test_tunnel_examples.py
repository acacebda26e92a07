"""The four classic internode examples of XtremWeb-HEP, through the relay, with real clients:

1. client → job: curl against a ``python3 -m http.server`` job, through ``xwproxy UID --xwlistenport``;
2. job → client: a job fetches from an HTTP server on the client, through a server proxy;
3. job ↔ job: a job fetches from another job's listen port;
4. ssh into a job: ``ssh -p PORT -i KEY`` to an sshd started inside a job (key-only).
"""

from __future__ import annotations

import http.server
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tunnels.tunnelgrid import Grid, Proxy, curl_until_ok, needs_bwrap, put_script, result_files, wait_for, xw

pytestmark = [needs_bwrap, pytest.mark.timeout(180)]


@pytest.fixture
def client_site(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An HTTP server on the client's loopback (a random port), serving a directory."""
    root = tmp_path / "client-site"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(root), **kw)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1], root
    finally:
        srv.shutdown()
        srv.server_close()


def test_example1_curl_reaches_an_http_server_in_a_job(grid: Grid, tmp_path: Path) -> None:
    site = tmp_path / "env" / "site"
    site.mkdir(parents=True)
    (site / "index.html").write_text("hello from inside the job\n")
    uid = grid.submit(grid.alice, "web", "8080", "--xwlistenport", "8080", "--xwenv", str(tmp_path / "env"))
    try:
        grid.running(uid)
        xml = xw("works", grid.alice, "--xwformat", "xml", uid).stdout
        assert 'listenport="8080"' in xml
        tunnels = re.search(r'tunnels="([^"]+)"', xml)
        assert tunnels and tunnels.group(1).endswith(f"/{uid}:8080"), xml
        with Proxy(grid.alice, uid, "--xwlistenport", "0") as proxy:
            port = proxy.port()
            assert curl_until_ok(f"http://127.0.0.1:{port}/index.html") == "hello from inside the job\n"
            for _ in range(3):  # and again: every connection is its own stream
                assert curl_until_ok(f"http://127.0.0.1:{port}/index.html", 10).startswith("hello from inside")
        events = [e for e in grid.admin.events(uid) if e["action"] == "tunnel.open"]
        assert events and all(e["actor"] == grid.users["alice"] for e in events), events
    finally:
        grid.end(uid)


def test_example1_several_ports_map_in_order(grid: Grid, tmp_path: Path) -> None:
    site = tmp_path / "env" / "site"
    site.mkdir(parents=True)
    (site / "index.html").write_text("first port\n")
    uid = grid.submit(grid.alice, "web", "8080", "8081", "--xwlistenport", "8080,8081", "--xwenv",
                      str(tmp_path / "env"))
    try:
        grid.running(uid)
        with Proxy(grid.alice, uid, "--xwlistenport", "0,0") as proxy:
            first, second = proxy.line(), proxy.line()
            assert first.endswith(f"{uid}:8080") and second.endswith(f"{uid}:8081"), (first, second)
            p1, p2 = (int(x.split()[0].rsplit(":", 1)[1]) for x in (first, second))
            assert curl_until_ok(f"http://127.0.0.1:{p1}/index.html") == "first port\n"
            assert curl_until_ok(f"http://127.0.0.1:{p2}/index.html") == "second port 8081\n"
    finally:
        grid.end(uid)


def test_xwproxy_listens_on_loopback_only_and_fails_in_one_line(grid: Grid, tmp_path: Path) -> None:
    uid = grid.submit(grid.alice, "web", "8080", "--xwlistenport", "8080")
    try:
        grid.running(uid)
        with Proxy(grid.alice, uid, "--xwlistenport", "0") as proxy:
            port = proxy.port()
            out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
            local = [line.split()[3] for line in out.splitlines()]
            assert local == [f"127.0.0.1:{port}"], out
        too_many = Proxy(grid.alice, uid, "--xwlistenport", "0,0").start()
        assert too_many.proc is not None and too_many.proc.wait(30) == 2
        assert too_many.stderr.count("\n") == 1 and "at most as many local ports" in too_many.stderr
    finally:
        grid.end(uid)
    bad = Proxy(grid.alice, "xw://nowhere/" + "0" * 8 + "-0000-4000-8000-" + "0" * 12, "--xwlistenport", "0").start()
    assert bad.proc is not None and bad.proc.wait(30) == 1
    assert bad.stderr.startswith("xwproxy: error: ") and "Traceback" not in bad.stderr, bad.stderr


def test_example2_a_job_fetches_from_the_client(grid: Grid, client_site: tuple[int, Path], tmp_path: Path) -> None:
    port, root = client_site
    (root / "page.txt").write_text("served by the client\n")
    with Proxy(grid.alice, "--xwlistenport", str(port)) as proxy:
        address = proxy.line()
        assert address.startswith("xwproxy:"), address
        uid = grid.submit(grid.alice, "fetch", "http://localhost:1234/page.txt", "--xwforwardaddresses",
                          f"{address},1234")
        try:
            work = grid.wait_status(uid, {"COMPLETED", "ERROR", "FAILED"})
            files = result_files(grid.admin, uid, tmp_path)
            assert work["return_code"] == 0, files
            assert files["fetched.txt"] == b"served by the client\n"
        finally:
            grid.end(uid)


def test_example3_job_to_job(grid: Grid, tmp_path: Path) -> None:
    site = tmp_path / "env" / "site"
    site.mkdir(parents=True)
    (site / "data.txt").write_text("from the service job\n")
    service = grid.submit(grid.alice, "web", "8080", "--xwlistenport", "8080", "--xwenv", str(tmp_path / "env"))
    try:
        grid.running(service)
        xml = xw("works", grid.alice, "--xwformat", "xml", service).stdout
        address = re.search(r'tunnels="([^",]+)"', xml)
        assert address, xml
        with Proxy(grid.alice, service, "--xwlistenport", "0") as proxy:  # wait until the service answers
            curl_until_ok(f"http://127.0.0.1:{proxy.port()}/data.txt")
        client = grid.submit(grid.alice, "fetch", "http://localhost:1234/data.txt", "--xwforwardaddresses",
                             f"{address.group(1)},1234")
        try:
            work = grid.wait_status(client, {"COMPLETED", "ERROR", "FAILED"})
            files = result_files(grid.admin, client, tmp_path)
            assert work["return_code"] == 0, files
            assert files["fetched.txt"] == b"from the service job\n"
        finally:
            grid.end(client)
        # the relay writes tunnel.open events in batches after the stream is up (never on its path): wait for it
        wait_for(lambda: any(e["action"] == "tunnel.open" and client in (e.get("detail") or "")
                             for e in grid.admin.events(service)), 10, "the tunnel.open event of the client job")
    finally:
        grid.end(service)


SSHD_APP = """#!/bin/sh
# sshd: key-only sshd on port 2222 inside the job, as the job's own user
chmod 600 hostkey
exec /usr/sbin/sshd -D -e -f ./sshd_config -p 2222
"""

SSHD_CONFIG = """HostKey /job/hostkey
AuthorizedKeysFile /job/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
PidFile none
ListenAddress 127.0.0.1
"""


@pytest.mark.skipif(not shutil.which("ssh") or not shutil.which("ssh-keygen") or not Path("/usr/sbin/sshd").exists(),
                    reason="openssh client and server are needed")
def test_example4_ssh_into_a_job(grid: Grid, tmp_path: Path) -> None:
    env = tmp_path / "env"
    env.mkdir()
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(env / "hostkey")], check=True)
    (env / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    (env / "sshd_config").write_text(SSHD_CONFIG)
    put_script(grid.admin, tmp_path, "sshd", SSHD_APP)
    uid = grid.submit(grid.alice, "sshd", "--xwlistenport", "2222", "--xwenv", str(env))
    try:
        grid.running(uid)
        with Proxy(grid.alice, uid, "--xwlistenport", "0") as proxy:
            port = proxy.port()
            ssh = ["ssh", "-p", str(port), "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o",
                   "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                   "xwjob@127.0.0.1"]

            def login() -> str | None:
                r = subprocess.run([*ssh, "echo", "hello"], capture_output=True, text=True, timeout=30)
                return r.stdout if r.returncode == 0 else None

            assert wait_for(login, 60, "ssh into the job", interval=0.3) == "hello\n"
            who = subprocess.run([*ssh, "id -un; hostname; cat /etc/hostname 2>/dev/null; pwd"], capture_output=True,
                                 text=True, timeout=30).stdout.split()
            assert who[:2] == ["xwjob", "xwjob"] and "/job" in who, who
            # key-only: a password login is refused
            r = subprocess.run(["ssh", "-p", str(port), "-o", "StrictHostKeyChecking=no", "-o",
                                "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o",
                                "PreferredAuthentications=password", "xwjob@127.0.0.1", "true"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    finally:
        grid.end(uid)
