"""What crosses into and out of a VM guest, without booting one: the disks and seed the host makes (read back with
the real e2fsprogs and iso tools), and the result stream a guest writes, including hostile ones."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from xwhep.vm import guestio
from xwhep.vm.guestio import MAGIC_JOB, SeedContent

needs_tools = pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("debugfs")
                                      and shutil.which("genisoimage") and shutil.which("isoinfo")),
                                 reason="e2fsprogs and genisoimage are not installed")


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True,
                          check=True).stdout


@needs_tools
def test_job_disk_holds_the_job_dir_stdin_and_the_command(tmp_path: Path) -> None:
    job = tmp_path / "job"
    (job / "sub").mkdir(parents=True)
    (job / "a.txt").write_text("alpha")
    (job / "sub" / "b.bin").write_bytes(b"\x00\x01" * 1000)
    os.symlink("a.txt", job / "link")
    os.mkfifo(job / "fifo")  # never part of the inputs
    stdin = tmp_path / "stdin"
    stdin.write_text("the input stream")
    image = tmp_path / "job.raw"
    disk = guestio.make_job_disk(job, stdin, image, 64, tmp_path, SeedContent(
        argv=["python3", "-c", "print('it''s')"], env={"A": "x y", "B": "$HOME"}, script="echo ctx", net=True,
        max_procs=10))
    assert image.stat().st_size == disk.size and disk.result_offset >= 64 << 20
    assert disk.size - disk.result_offset >= disk.result_offset - (1 << 20)  # room for what the job may write
    assert image.read_bytes()[:len(MAGIC_JOB)] == MAGIC_JOB
    # the filesystem ends before the result area (the guest writes there without touching it)
    info = debugfs(image, "stats")
    blocks = int(re.search(r"Block count:\s+(\d+)", info).group(1))  # type: ignore[union-attr]
    bsize = int(re.search(r"Block size:\s+(\d+)", info).group(1))  # type: ignore[union-attr]
    assert blocks * bsize <= disk.result_offset - (1 << 20)
    assert debugfs(image, "cat /in/a.txt") == "alpha"
    assert debugfs(image, "cat /stdin") == "the input stream"
    listing = debugfs(image, "ls -l /in")
    assert "a.txt" in listing and "sub" in listing and "link" in listing and "fifo" not in listing
    binary = subprocess.run(["debugfs", "-R", "cat /in/sub/b.bin", str(image)], capture_output=True, check=True)
    assert binary.stdout == b"\x00\x01" * 1000
    assert debugfs(image, "cat /xw/agent.sh") == guestio.AGENT.read_text()
    assert debugfs(image, "cat /xw/job.env") == f"XW_NET=1\nXW_OUT_OFFSET={disk.result_offset}\nXW_MAX_PROCS=10\n"
    assert debugfs(image, "cat /xw/script") == "echo ctx"
    assert not (tmp_path / "stage").exists()  # the staged tree is gone
    assert (job / "a.txt").read_text() == "alpha"  # the job dir is untouched
    # run.sh, run by a real shell, gives the command exactly its argv and environment
    run = tmp_path / "run.sh"
    run.write_text(debugfs(image, "cat /xw/run.sh").replace("cd /job || exit 126", f"cd {tmp_path} || exit 126")
                   .replace("exec python3", "exec /usr/bin/env python3 -c 'import os,sys; print(sys.argv[1:], "
                            "os.environ[\"A\"], os.environ[\"B\"])' python3"))
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "script").write_text("echo from-the-script")
    out = subprocess.run(["sh", str(run), str(tmp_path / "ctx")], capture_output=True, text=True, check=True).stdout
    assert out == "from-the-script\n['python3', '-c', \"print('it''s')\"] x y $HOME\n"


@needs_tools
def test_seed_is_a_nocloud_iso_for_cloud_init(tmp_path: Path) -> None:
    iso = tmp_path / "seed.iso"
    guestio.make_seed(iso, SeedContent(argv=["true"], ssh_keys=["ssh-ed25519 AAAA test"], net=True), tmp_path)
    info = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True, check=True).stdout
    assert "Volume id: cidata" in info

    def cat(name: str) -> str:
        return subprocess.run(["isoinfo", "-R", "-x", f"/{name}", "-i", str(iso)], capture_output=True,
                              check=True).stdout.decode()

    user_data = cat("user-data")
    assert user_data.startswith("#cloud-config\n")
    doc = json.loads(user_data.split("\n", 1)[1])
    assert doc["users"] == [{"name": "xwjob", "uid": 1000, "gecos": "xwhep job", "shell": "/bin/sh",
                             "lock_passwd": True, "ssh_authorized_keys": ["ssh-ed25519 AAAA test"]}]
    assert doc["ssh_pwauth"] is False and doc["disable_root"] is True and "sudo" not in user_data
    assert "XWHEPJOB1" in doc["runcmd"][0][2]  # it starts the agent from the job disk
    assert cat("meta-data").startswith("instance-id: xw-")
    assert "10.0.2.15/24" in cat("network-config")
    # cloud-init's schema wants at least one key when the list is there: none, no list
    assert "ssh_authorized_keys" not in guestio.user_data([])


def test_env_names_a_shell_cannot_export_are_refused() -> None:
    with pytest.raises(guestio.GuestIOError, match="A-B"):
        guestio.run_script(["true"], {"A-B": "1"}, False)


# -- results -----------------------------------------------------------------------------------------------------------

OFFSET = 2 << 20


def result_disk(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    disk = tmp_path / "job.raw"
    with open(disk, "wb") as f:
        f.truncate(OFFSET + (4 << 20))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    with open(disk, "r+b") as f:
        f.seek(OFFSET)
        f.write(buf.getvalue())
    return disk


def reg(name: str, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    job, log = tmp_path / "job", tmp_path / "log"
    job.mkdir()
    log.mkdir()
    return job, log


def test_results_go_to_the_job_dir_and_the_logs(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    job, log = dirs
    (job / "input.txt").write_text("unchanged")
    (job / "changed.txt").write_text("before")
    disk = result_disk(tmp_path, [
        (reg("./log/rc"), b"7\n"), (reg("./log/stdout.txt"), b"out\n"), (reg("./log/stderr.txt"), b"err\n"),
        (special("./job", tarfile.DIRTYPE), None), (reg("./job/changed.txt"), b"after"),
        (reg("./job/new/deep/file.sh", 0o755), b"#!/bin/sh\n"),
        (special("./job/again.sh", tarfile.LNKTYPE, "./job/new/deep/file.sh"), None),
        (reg("./log/end"), b""),
    ])
    res = guestio.read_results(disk, OFFSET, job, log / "stdout.txt", log / "stderr.txt")
    assert res.written and res.complete and res.return_code == 7 and res.error is None
    assert res.files == ["changed.txt", "new/deep/file.sh", "again.sh"]
    assert (job / "input.txt").read_text() == "unchanged"
    assert (job / "changed.txt").read_text() == "after"
    assert (job / "new/deep/file.sh").stat().st_mode & 0o777 == 0o755
    assert (job / "again.sh").read_text() == "#!/bin/sh\n"
    assert (log / "stdout.txt").read_text() == "out\n" and (log / "stderr.txt").read_text() == "err\n"
    assert not [p for p in job.rglob(".xw-*")]  # no temp file left


def test_hostile_members_never_write_outside_the_job_dir(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    job, log = dirs
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("safe")
    os.symlink(outside, job / "escape")  # a link already in the job dir (a job may leave one)
    disk = result_disk(tmp_path, [
        (reg("./job/../outside/victim"), b"pwned"),
        (reg("/abs/victim"), b"pwned"),
        (reg("./job/escape/victim"), b"pwned"),  # through the link: must not follow it
        (special("./job/sym", tarfile.SYMTYPE, "/etc/passwd"), None),
        (special("./job/hard", tarfile.LNKTYPE, "/etc/passwd"), None),
        (special("./job/dev", tarfile.CHRTYPE), None),  # what an overlay whiteout looks like
        (reg("./log/rc"), b"0"),
        (reg("./log/end"), b""),
        (reg("./job/after-end"), b"late"),
    ])
    res = guestio.read_results(disk, OFFSET, job, log / "stdout.txt", log / "stderr.txt")
    assert res.complete and res.return_code == 0
    assert (outside / "victim").read_text() == "safe"
    assert sorted(p.name for p in job.iterdir()) == ["escape"]
    assert res.files == []
    assert len(res.skipped) == 7, res.skipped


def test_a_cut_short_stream_is_incomplete(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    job, log = dirs
    disk = result_disk(tmp_path, [(reg("./log/rc"), b"0"), (reg("./job/big"), b"x" * 100_000)])
    with open(disk, "r+b") as f:  # the guest ran out of room in the middle of job/big
        f.seek(OFFSET + 512 * 3 + 50_000)
        f.write(b"\0" * 100_000)
        f.truncate(OFFSET + 512 * 3 + 60_000)
    res = guestio.read_results(disk, OFFSET, job, log / "stdout.txt", log / "stderr.txt")
    assert res.written and not res.complete


def test_no_stream_and_an_agent_error(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    job, log = dirs
    empty = tmp_path / "empty.raw"
    with open(empty, "wb") as f:
        f.truncate(OFFSET + (1 << 20))
    assert guestio.read_results(empty, OFFSET, job, log / "o", log / "e") == guestio.GuestResult()
    disk = result_disk(tmp_path, [(reg("./log/error"), b"cannot mount the job disk\n"), (reg("./log/end"), b"")])
    res = guestio.read_results(disk, OFFSET, job, log / "o", log / "e")
    assert res.error == "cannot mount the job disk" and res.return_code is None
