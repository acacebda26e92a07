"""Stage-out: selecting new/modified files, symlink guards, lone files, determinism."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from xwhep.worker.packing import PackingError, pack_results, snapshot


@pytest.fixture
def job(tmp_path: Path) -> Path:
    d = tmp_path / "job"
    (d / "in").mkdir(parents=True)
    (d / "in" / "data.txt").write_text("input data")
    (d / "app.sh").write_text("#!/bin/sh\n")
    (d / "config.ini").write_text("a=1\n")
    return d


@pytest.fixture
def logs(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "log"
    d.mkdir()
    out, err = d / "stdout.txt", d / "stderr.txt"
    out.write_text("")
    err.write_text("")
    return out, err


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_new_and_modified_files_are_packed_unmodified_ones_are_not(job: Path, logs: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    before = snapshot(job)
    assert set(before) == {"in/data.txt", "app.sh", "config.ini"}
    (job / "config.ini").write_text("a=2\n")  # modified (same size, new mtime)
    (job / "out").mkdir()
    (job / "out" / "result.dat").write_bytes(b"\x00\x01" * 1000)  # new
    (job / "in" / "data.txt").read_text()  # read only: unchanged
    os.utime(job / "app.sh")  # touched: mtime changes → counts as modified
    logs[0].write_text("hello from the job\n")
    r = pack_results(job, before, logs[0], logs[1], tmp_path / "result.zip")
    assert r is not None and r.zipped
    assert r.files == ["app.sh", "config.ini", "out/result.dat", "stdout.txt"]  # sorted, streams last
    with zipfile.ZipFile(r.path) as zf:
        assert zf.namelist() == r.files
        assert zf.read("config.ini") == b"a=2\n"
        assert zf.read("out/result.dat") == b"\x00\x01" * 1000
        assert zf.read("stdout.txt") == b"hello from the job\n"
        assert zf.testzip() is None
    assert r.sha256 == sha(r.path) and r.size == r.path.stat().st_size


def test_replaced_file_with_same_size_and_mtime_is_detected_by_inode(job: Path, tmp_path: Path) -> None:
    before = snapshot(job)
    st = (job / "config.ini").stat()
    (job / "new.ini").write_text("b=9\n")
    os.replace(job / "new.ini", job / "config.ini")
    os.utime(job / "config.ini", ns=(st.st_atime_ns, st.st_mtime_ns))
    r = pack_results(job, before, None, None, tmp_path / "r")
    assert r is not None and r.files == ["config.ini"]


def test_lone_file_is_not_zipped(job: Path, logs: tuple[Path, Path], tmp_path: Path) -> None:
    before = snapshot(job)
    (job / "answer.txt").write_text("42\n")
    r = pack_results(job, before, logs[0], logs[1], tmp_path / "result")
    assert r is not None
    assert not r.zipped
    assert r.files == ["answer.txt"]
    assert r.path.read_text() == "42\n"
    assert r.sha256 == hashlib.sha256(b"42\n").hexdigest()


def test_only_stderr_goes_alone(job: Path, logs: tuple[Path, Path], tmp_path: Path) -> None:
    before = snapshot(job)
    logs[1].write_text("Traceback...\n")
    r = pack_results(job, before, logs[0], logs[1], tmp_path / "result")
    assert r is not None and not r.zipped and r.files == ["stderr.txt"]
    assert r.path.read_text() == "Traceback...\n"


def test_nothing_to_return_gives_none(job: Path, logs: tuple[Path, Path], tmp_path: Path) -> None:
    before = snapshot(job)
    (job / "emptydir").mkdir()  # directories alone are not results
    assert pack_results(job, before, logs[0], logs[1], tmp_path / "result") is None
    assert not (tmp_path / "result").exists()


def test_symlink_out_of_the_job_dir_is_refused(job: Path, logs: tuple[Path, Path], tmp_path: Path) -> None:
    before = snapshot(job)
    secret = tmp_path / "worker-secret"
    secret.write_text("do not ship")
    (job / "out").mkdir()
    (job / "out" / "steal").symlink_to(secret)
    (job / "result.txt").write_text("ok")
    with pytest.raises(PackingError, match=r"out/steal is a symbolic link leading out of the job dir"):
        pack_results(job, before, logs[0], logs[1], tmp_path / "result.zip")
    assert not (tmp_path / "result.zip").exists()


@pytest.mark.parametrize("target", ["/etc/passwd", "../../", "/job/result.txt"])
def test_any_link_resolving_outside_is_refused(job: Path, tmp_path: Path, target: str) -> None:
    # "/job/..." is the job's own view inside the sandbox; on the host it points elsewhere, so it is refused too.
    before = snapshot(job)
    (job / "link").symlink_to(target)
    with pytest.raises(PackingError, match="link is a symbolic link"):
        pack_results(job, before, None, None, tmp_path / "result.zip")


def test_symlinks_staying_inside_are_stored_as_content(job: Path, tmp_path: Path) -> None:
    before = snapshot(job)
    (job / "real.txt").write_text("real content")
    (job / "alias.txt").symlink_to("real.txt")
    (job / "dirlink").symlink_to("in")  # a link to a directory: skipped
    (job / "dangling").symlink_to("missing.txt")  # nothing to return: skipped
    r = pack_results(job, before, None, None, tmp_path / "result.zip")
    assert r is not None and r.files == ["alias.txt", "real.txt"]
    with zipfile.ZipFile(r.path) as zf:
        assert zf.read("alias.txt") == b"real content"


def test_fifo_is_skipped_not_opened(job: Path, tmp_path: Path) -> None:
    before = snapshot(job)
    os.mkfifo(job / "pipe")
    (job / "out.txt").write_text("x")
    r = pack_results(job, before, None, None, tmp_path / "result")  # would block forever if the FIFO were read
    assert r is not None and r.files == ["out.txt"]


def test_job_file_named_stdout_txt_keeps_its_name(job: Path, logs: tuple[Path, Path], tmp_path: Path) -> None:
    before = snapshot(job)
    (job / "stdout.txt").write_text("written by the job")
    logs[0].write_text("captured")
    r = pack_results(job, before, logs[0], logs[1], tmp_path / "result.zip")
    assert r is not None and r.files == ["stdout.txt", "xw-stdout.txt"]
    with zipfile.ZipFile(r.path) as zf:
        assert zf.read("stdout.txt") == b"written by the job"
        assert zf.read("xw-stdout.txt") == b"captured"


def test_packing_is_deterministic(job: Path, tmp_path: Path) -> None:
    before = snapshot(job)
    for name in ("b.txt", "a.txt", "c/z.txt", "c/a.txt"):
        (job / name).parent.mkdir(exist_ok=True)
        (job / name).write_text(name)
    r1 = pack_results(job, before, None, None, tmp_path / "r1.zip")
    r2 = pack_results(job, before, None, None, tmp_path / "r2.zip")
    assert r1 is not None and r2 is not None
    assert r1.files == ["a.txt", "b.txt", "c/a.txt", "c/z.txt"]
    assert r1.sha256 == r2.sha256


def test_executable_bit_is_kept_in_the_zip(job: Path, tmp_path: Path) -> None:
    before = snapshot(job)
    (job / "tool").write_text("#!/bin/sh\n")
    os.chmod(job / "tool", 0o750)
    (job / "data").write_text("d")
    r = pack_results(job, before, None, None, tmp_path / "r.zip")
    assert r is not None
    with zipfile.ZipFile(r.path) as zf:
        assert (zf.getinfo("tool").external_attr >> 16) & 0o777 == 0o755
        assert (zf.getinfo("data").external_attr >> 16) & 0o777 == 0o644


def test_immediate_same_size_rewrite_after_snapshot_is_seen(tmp_path: Path) -> None:
    # Written, snapshotted and rewritten within one filesystem timestamp tick: still "modified".
    job = tmp_path / "job"
    job.mkdir()
    for i in range(20):
        f = job / f"f{i}.txt"
        f.write_text("old")
        before = snapshot(job)
        f.write_text("new")
        r = pack_results(job, before, None, None, tmp_path / f"r{i}")
        assert r is not None and r.files == [f.name]


def test_result_must_not_be_written_into_the_job_dir(job: Path) -> None:
    before = snapshot(job)
    (job / "out.txt").write_text("x")
    with pytest.raises(ValueError, match="outside the job dir"):
        pack_results(job, before, None, None, job / "result.zip")
