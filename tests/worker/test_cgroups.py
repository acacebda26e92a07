"""Per-job cgroups on the real hierarchies of this host (hybrid v1 + v2 here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from xwhep.worker.cgroups import Hierarchy, JobCgroup, discover, remove_stale


@pytest.fixture
def cg() -> Iterator[JobCgroup]:
    c = JobCgroup.create()
    yield c
    assert c.remove()
    assert not any(d.exists() for d in c.directories)


def gated(cg: JobCgroup, code: str) -> subprocess.Popen[bytes]:
    """Start a Python process that waits for a line on stdin, put it in ``cg``, then let it run ``code``."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()\n" + code],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    cg.add_pid(p.pid)
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.close()
    p.stdin = None  # so communicate() does not flush the closed pipe
    return p


def test_discover_finds_our_own_cgroups() -> None:
    hs = discover()
    mine = Path("/proc/self/cgroup").read_text()
    assert {h.version for h in hs} >= {1} or {h.version for h in hs} == {2}
    for h in hs:
        assert h.own_dir.is_dir()
        assert os.getpid() in {int(x) for x in (h.own_dir / "cgroup.procs").read_text().split()}
        if h.version == 1:
            assert any(line.endswith(":" + h.own_path) and sorted(h.controllers)[0] in line
                       for line in mine.splitlines())


def test_discover_strips_the_root_of_a_namespaced_mount(tmp_path: Path) -> None:
    (tmp_path / "memory" / "abc").mkdir(parents=True)
    (tmp_path / "unified" / "svc").mkdir(parents=True)
    (tmp_path / "unified" / "svc" / "cgroup.controllers").write_text("memory pids\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/process_api/abc\n2:devices:/\n0::/svc\n")
    info = tmp_path / "mountinfo"
    info.write_text(
        f"35 31 0:32 /process_api {tmp_path}/memory rw,relatime - cgroup cgroup rw,memory\n"
        f"41 31 0:38 / {tmp_path}/unified rw,relatime - cgroup2 cgroup2 rw\n"
        f"22 1 0:21 / /proc rw - proc proc rw\n"
    )
    hs = discover(proc, info)
    assert hs == [
        Hierarchy(1, frozenset({"memory"}), tmp_path / "memory", "/abc"),
        Hierarchy(2, frozenset({"memory", "pids"}), tmp_path / "unified", "/svc"),
    ]
    assert hs[0].own_dir == tmp_path / "memory" / "abc"


def test_create_makes_children_under_our_own_cgroups(cg: JobCgroup) -> None:
    assert cg.name.startswith(f"xwhep-{os.getpid()}-")
    parents = {d.parent for d in cg.directories}
    assert parents <= {h.own_dir for h in discover()}
    assert all(d.is_dir() and d.name == cg.name for d in cg.directories)
    assert cg.has("memory") and cg.has("pids") and cg.has("cpu")


def test_kill_all_reaches_a_daemonized_grandchild(cg: JobCgroup) -> None:
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        print(os.getpid(), flush=True)\n"
        "        os.close(1)\n"
        "        while True: time.sleep(3600)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
    )
    p = gated(cg, code)
    out, _ = p.communicate(timeout=20)  # EOF once the daemon has closed its stdout
    daemon = psutil.Process(int(out))
    assert p.returncode == 0
    # It escaped everything a process group or our process tree would catch...
    assert daemon.ppid() != os.getpid()
    assert os.getsid(daemon.pid) != os.getsid(0)
    assert daemon.pid in cg.pids()
    # ...but not the cgroup.
    assert cg.kill_all()
    assert cg.pids() == set()
    assert not daemon.is_running() or daemon.status() == psutil.STATUS_ZOMBIE


def test_memory_limit_oom_kills_and_is_accounted(cg: JobCgroup) -> None:
    ok, why = cg.set_memory_limit(32 << 20)
    assert ok, why
    p = gated(cg, "x = b'a' * (200 << 20)\nprint('survived')")
    out, _ = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert out == b""
    stats = cg.memory_stats()
    assert stats.limit_bytes == 32 << 20
    assert stats.oom_kills is not None and stats.oom_kills >= 1
    assert stats.max_usage_bytes is not None and stats.max_usage_bytes >= 30 << 20


def test_pids_max_bounds_forks(cg: JobCgroup) -> None:
    ok, why = cg.set_pids_max(3)
    assert ok, why
    code = (
        "import os\n"
        "r, w = os.pipe()\n"
        "n = 0\n"
        "for _ in range(10):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.close(w); os.read(r, 1); os._exit(0)\n"
        "        n += 1\n"
        "    except BlockingIOError:\n"
        "        break\n"
        "print(n)\n"
    )
    p = gated(cg, code)
    out, _ = p.communicate(timeout=30)
    assert int(out) == 2


def test_cpu_quota_is_written(cg: JobCgroup) -> None:
    ok, why = cg.set_cpu_quota(0.25)
    assert ok, why
    cpu_dir = next(d for d in cg.directories if (d / "cpu.cfs_quota_us").exists() or (d / "cpu.max").exists())
    if (cpu_dir / "cpu.cfs_quota_us").exists():
        assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "25000"
        assert (cpu_dir / "cpu.cfs_period_us").read_text().strip() == "100000"
    else:
        assert (cpu_dir / "cpu.max").read_text().split() == ["25000", "100000"]
    with pytest.raises(ValueError):
        cg.set_cpu_quota(0)


def test_remove_stale_cleans_up_after_a_dead_worker() -> None:
    prefix = f"xwtest{uuid.uuid4().hex[:6]}-"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = JobCgroup.create(name=f"{prefix}{dead.pid}-job1")
    live = JobCgroup.create(name=f"{prefix}{os.getpid()}-job2")
    try:
        p = gated(stale, "import time\nprint('up', flush=True)\ntime.sleep(3600)")
        assert p.stdout is not None and p.stdout.readline() == b"up\n"
        removed = remove_stale(prefix)
        assert sorted(removed) == sorted(stale.directories)
        assert p.wait(timeout=10) == -signal.SIGKILL
        assert all(d.is_dir() for d in live.directories)
    finally:
        stale.remove()
        live.remove()
