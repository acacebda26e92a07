"""A server that cannot start says why in one line on stderr and exits non-zero, without a traceback: the port
taken, a bad database URL, a read-only, full or unwritable home; and one server per home (a lock the kernel drops
when the holder dies, even by kill -9). Real processes, through both entry points."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import ServerProc
from fsfill import fill_up

ENTRY_POINTS = {
    "python -m xwhep.server": [sys.executable, "-m", "xwhep.server"],
    "xw server": [str(Path(sys.executable).parent / "xw"), "server"],
}


def _start(home: Path, *args: str, entry: str = "python -m xwhep.server", prefix: tuple[str, ...] = (),
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a server that is expected not to start; its exit status and output."""
    cmd = [*prefix, *ENTRY_POINTS[entry], "--home", str(home), "--port", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _one_line_refusal(r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert r.returncode != 0, f"started: {r.stdout}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{r.stderr}"
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _root_or_skip() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("this test drops root's capabilities: CI runs as root")
        pytest.skip("needs root")


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_port_already_taken_is_one_line(tmp_path: Path, entry: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [*ENTRY_POINTS[entry], "--home", str(tmp_path / "home"), "--port", str(port)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    _one_line_refusal(r, "already in use", str(port))


@pytest.mark.parametrize("url", ["nosuchdriver://x/y", "postgresql://nobody@127.0.0.1:1/none", "::not a url::"])
def test_bad_database_url_is_one_line(tmp_path: Path, url: str) -> None:
    _one_line_refusal(_start(tmp_path / "home", "--db", url), "database")


def test_unwritable_home_is_one_line(tmp_path: Path) -> None:
    _root_or_skip()
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    # root without CAP_DAC_OVERRIDE: file permissions apply to it as to anyone
    drop = ("setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search")
    _one_line_refusal(_start(parent / "home", prefix=drop), "Permission denied", "not writable")


def test_read_only_home_is_one_line(tmpfs: Callable[[str], Path]) -> None:
    fs = tmpfs("size=16m")
    home = fs / "home"
    first = ServerProc(home=home).start()  # a home that worked, then its file system turned read-only
    first.stop()
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    _one_line_refusal(_start(home), "read-only")
    _one_line_refusal(_start(fs / "fresh"), "read-only")


def test_full_home_is_one_line(tmpfs: Callable[[str], Path]) -> None:
    fs = tmpfs("size=2m")
    fill_up(fs)
    line = _one_line_refusal(_start(fs / "home"))
    assert "full" in line or "No space left" in line, line


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_second_server_on_the_same_home_refuses_and_changes_nothing(tmp_path: Path, entry: str) -> None:
    first = ServerProc(home=tmp_path / "home").start()
    try:
        assert first.proc is not None
        watched = [first.admin_conf, first.worker_conf, first.home / "xwhep.db", first.home / "secret"]
        before = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in watched[:2]}
        r = _start(first.home, entry=entry)
        _one_line_refusal(r, f"home {first.home} is in use by server pid {first.proc.pid}")
        after = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in watched[:2]}
        assert after == before, "the refused server rewrote a client config"
        assert first.client().version()["api"] == "v1", "the first server still serves"
    finally:
        first.stop()


def test_home_lock_is_gone_after_kill_9(tmp_path: Path) -> None:
    first = ServerProc(home=tmp_path / "home").start()
    assert first.proc is not None
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    first.proc = None
    second = ServerProc(home=tmp_path / "home").start()  # the kernel dropped the lock with the process
    try:
        assert second.proc is not None
        assert (second.home / "server.lock").read_text().split() == [str(second.proc.pid)]
        assert second.client().version()["api"] == "v1"
    finally:
        second.stop()
