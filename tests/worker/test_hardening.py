"""Worker hardening of issue 13 §3, through a real worker process: the zip bound from the config, and what a job
can learn of the host (the worker's paths) from inside its sandbox."""

from __future__ import annotations

import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from cluster import ServerProc
from sdkworker import wait_status
from workerproc import WorkerProc, put_app

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.timeout(180),
]

MiB = 1 << 20
FINAL = {"COMPLETED", "ERROR", "FAILED"}
FAST = ["--alive-period", "0.5", "--alive-timeout", "30"]


def deflate_bomb(path: Path, real: int, declared: int, crc: int = 0) -> Path:
    """A zip holding one entry of ``real`` zero bytes (deflated about 1000:1) whose headers declare ``declared``.

    Built without compressing ``real`` bytes: a deflate block of 1 MiB of zeros ends with a full flush (byte
    aligned, no back-references), so the same block repeated is a valid stream of n MiB.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    n, rest = divmod(real, MiB)
    t = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = t.compress(bytes(rest)) + t.flush()
    csize = n * len(block) + len(tail)
    name = b"zeros.bin"
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, csize, declared, len(name), 0))
        f.write(name)
        for _ in range(n):
            f.write(block)
        f.write(tail)
        cd = f.tell()
        f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x0314, 20, 0, 8, 0, 0x21, crc, csize, declared,
                            len(name), 0, 0, 0, 0, 0o100644 << 16, 0))
        f.write(name)
        end = f.tell()
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, end - cd, cd, 0))
    return path


@pytest.fixture
def grid(make_server: Callable[..., ServerProc], tmp_path: Path) -> Iterator[tuple[ServerProc, WorkerProc]]:
    server = make_server(args=FAST)
    worker = WorkerProc(server, tmp_path / "w", pool=1, sections={"worker": {"zip_max_mb": 1}}).start()
    try:
        worker.wait_status(lambda s: bool(s.get("host")), 30, "the worker to register")
        yield server, worker
    finally:
        worker.stop()


@pytest.mark.parametrize(("case", "declared"), [("honest headers", 4_000_000_000), ("lying headers", 900_000)])
def test_zip_max_mb_from_the_config_bounds_what_a_bomb_writes(grid: tuple[ServerProc, WorkerProc], tmp_path: Path,
                                                              case: str, declared: int) -> None:
    # Issue 13 §3: a 5 MB dirin made the worker write 4 GiB before refusing; zip_max_mb was never read.
    server, worker = grid
    c = server.client()
    bomb = deflate_bomb(tmp_path / "bomb.zip", real=4_000_000_000, declared=declared)
    assert 3 * MiB < bomb.stat().st_size < 5 * MiB
    data = c.put_data(bomb, name="bomb.zip")
    app = put_app(c, tmp_path, "ran", "#!/bin/sh\necho ran > ran.txt\n")
    assert worker.proc is not None
    io = psutil.Process(worker.proc.pid)
    before = io.io_counters().write_chars
    uid = str(c.submit(app, dirin=data["uid"])["uid"])
    assert wait_status(c, uid, FINAL, timeout=60) == "ERROR"
    written = io.io_counters().write_chars - before
    # what the worker wrote meanwhile: the download into its cache, at most the bound (+ one buffer), a little
    # bookkeeping (status file, log lines); not the 4 GB the zip expands to
    assert written <= bomb.stat().st_size + 2 * MiB + 512 * 1024, (case, written)
    w = c.work(uid)
    if declared > MiB:  # refused on the declared size: nothing extracted at all
        assert "declares 4000000000 bytes" in w["reason"] and "more than the 1048576 allowed" in w["reason"], w
    else:  # the headers lie: the entry stops at its declared size, then fails its checksum
        assert "zeros.bin" in w["reason"] and "corrupt" in w["reason"], w
    assert w["reason"].startswith("staging:") and w["result"] is None, w
    assert not list((worker.workdir / "jobs").iterdir())
    c.close()


PROBE_APP = r"""#!/bin/sh
# Everything a job can read about the processes and mounts around it.
for p in /proc/[0-9]*; do
  echo "== $p"; tr '\0' ' ' < $p/cmdline; echo; tr '\0' ' ' < $p/environ; echo
  for f in $p/fd/*; do readlink "$f"; done
  readlink $p/cwd $p/root $p/exe
done
cat /proc/self/mountinfo /proc/self/mounts /proc/self/cgroup
cat
"""


def test_job_sees_neither_the_workdir_nor_the_tmp_path(grid: tuple[ServerProc, WorkerProc], tmp_path: Path) -> None:
    # Issue 13 §3: the host workdir path showed inside the job (/proc/1/cmdline, mountinfo).
    server, worker = grid
    c = server.client()
    stdin = tmp_path / "stdin.txt"
    stdin.write_text("from stdin\n")
    app = put_app(c, tmp_path, "probe", PROBE_APP)
    uid = str(c.submit(app, args="a b", stdin=str(stdin))["uid"])
    assert wait_status(c, uid, FINAL, timeout=60) == "COMPLETED"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = c.fetch_result(uid, out_dir).read_text()
    assert "== /proc/1" in out and " /job rw,nosuid,nodev" in out and out.endswith("from stdin\n"), out
    secrets = {str(worker.workdir), str(worker.workdir.resolve()), str(worker.root), str(tmp_path), "pytest-of-",
               str(server.home)}
    leaks = [line for line in out.splitlines() if any(s in line for s in secrets)]
    assert not leaks, leaks
    c.close()
