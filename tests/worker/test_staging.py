"""Stage-in: archive extraction guards, the blob cache under concurrency, placing blobs into job dirs."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from xwhep.worker.staging import BlobCache, StagingError, copy_or_link_into, safe_extract_zip

MiB = 1 << 20


def make_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def unix_entry(name: str, mode: int) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name)
    zi.create_system = 3  # Unix, so external_attr carries a mode
    zi.external_attr = mode << 16
    return zi


# --------------------------------------------------------------------------------------------- extraction
def test_extracts_files_dirs_and_exec_bit(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "a.zip", [
        ("data/in.txt", b"hello"),
        (unix_entry("bin/app", stat.S_IFREG | 0o4755), b"#!/bin/sh\n"),
        ("empty/", b""),
    ])
    dest = tmp_path / "job"
    files = safe_extract_zip(z, dest, max_bytes=MiB, max_files=10)
    assert sorted(p.relative_to(dest).as_posix() for p in files) == ["bin/app", "data/in.txt"]
    assert (dest / "data/in.txt").read_bytes() == b"hello"
    assert stat.S_IMODE((dest / "bin/app").stat().st_mode) == 0o755  # exec kept, setuid dropped
    assert stat.S_IMODE((dest / "data/in.txt").stat().st_mode) == 0o644
    assert (dest / "empty").is_dir()


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "..\\evil.txt", "/tmp/evil.txt",
                                  "C:/evil.txt"])
def test_zip_slip_entries_are_refused(tmp_path: Path, name: str) -> None:
    z = make_zip(tmp_path / "slip.zip", [("ok.txt", b"fine"), (name, b"pwned")])
    dest = tmp_path / "job"
    with pytest.raises(StagingError, match=r"escapes|absolute") as e:
        safe_extract_zip(z, dest, max_bytes=MiB, max_files=10)
    assert repr(name) in str(e.value)
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    assert not (dest / "ok.txt").exists()  # what this call had extracted is removed again


def test_symlink_entries_are_refused(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "link.zip", [(unix_entry("passwd", stat.S_IFLNK | 0o777), b"/etc/passwd")])
    with pytest.raises(StagingError, match="'passwd' is a symbolic link"):
        safe_extract_zip(z, tmp_path / "job", max_bytes=MiB, max_files=10)
    assert not os.path.lexists(tmp_path / "job" / "passwd")


def test_special_file_entries_are_refused(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "fifo.zip", [(unix_entry("pipe", stat.S_IFIFO | 0o644), b"")])
    with pytest.raises(StagingError, match="'pipe' is not a regular file"):
        safe_extract_zip(z, tmp_path / "job", max_bytes=MiB, max_files=10)


def test_existing_symlink_in_dest_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "job"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    z = make_zip(tmp_path / "a.zip", [("sub/x.txt", b"x")])
    with pytest.raises(StagingError, match="not a directory"):
        safe_extract_zip(z, dest, max_bytes=MiB, max_files=10)
    assert list(outside.iterdir()) == []


def test_zip_bomb_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    # 64 MiB of zeros deflate to ~64 KiB; headers that tell the truth are enough to refuse it at once.
    z = make_zip(tmp_path / "bomb.zip", [("zeros.bin", bytes(64 * MiB))])
    assert z.stat().st_size < MiB
    dest = tmp_path / "job"
    t = time.monotonic()
    with pytest.raises(StagingError, match=r"declares 67108864 bytes .* more than the 1048576 allowed"):
        safe_extract_zip(z, dest, max_bytes=MiB, max_files=10)
    assert time.monotonic() - t < 5
    assert not dest.exists() or list(dest.iterdir()) == []


def test_total_size_counts_across_entries(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "two.zip", [("a", bytes(600 * 1024)), ("b", bytes(600 * 1024))])
    with pytest.raises(StagingError, match="declares 1228800 bytes"):
        safe_extract_zip(z, tmp_path / "job", max_bytes=MiB, max_files=10)
    assert safe_extract_zip(z, tmp_path / "job2", max_bytes=2 * MiB, max_files=10)


def test_too_many_entries_are_refused(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "many.zip", [(f"f{i}", b"") for i in range(11)])
    with pytest.raises(StagingError, match="11 entries, more than the 10"):
        safe_extract_zip(z, tmp_path / "job", max_bytes=MiB, max_files=10)


def test_lying_size_header_is_caught(tmp_path: Path) -> None:
    # Shrink the sizes declared for an entry: the real data is larger than announced.
    z = make_zip(tmp_path / "liar.zip", [("x.bin", bytes(200_000))])
    raw = bytearray(z.read_bytes())
    with zipfile.ZipFile(z) as zf:
        info = zf.getinfo("x.bin")
    small = (10).to_bytes(4, "little")
    real = info.file_size.to_bytes(4, "little")
    raw = raw.replace(real, small)
    z.write_bytes(bytes(raw))
    dest = tmp_path / "job"
    with pytest.raises(StagingError, match=r"'x\.bin'"):
        safe_extract_zip(z, dest, max_bytes=MiB, max_files=10)
    assert not (dest / "x.bin").exists()


def test_not_a_zip(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(StagingError, match="not a readable zip"):
        safe_extract_zip(bad, tmp_path / "job", max_bytes=MiB, max_files=10)


# --------------------------------------------------------------------------------------------- blob cache
def blob(data: bytes) -> tuple[str, int, Callable[[Path], object]]:
    return hashlib.sha256(data).hexdigest(), len(data), lambda p: p.write_bytes(data)


def test_cache_fetches_once_and_verifies(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=MiB)
    sha, size, _ = blob(b"payload")
    calls = []

    def fetch(p: Path) -> None:
        calls.append(p)
        p.write_bytes(b"payload")

    path = cache.get_or_fetch(sha, size, fetch)
    assert path.read_bytes() == b"payload"
    assert cache.get_or_fetch(sha, size, fetch) == path
    assert len(calls) == 1
    assert calls[0].parent != path.parent  # downloaded to a temp file, then renamed into place
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert sha in cache


def test_checksum_mismatch_is_refused_and_nothing_committed(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=MiB)
    sha, size, good = blob(b"the real thing")
    with pytest.raises(StagingError, match=f"blob {sha}: checksum mismatch"):
        cache.get_or_fetch(sha, size, lambda p: p.write_bytes(b"the fake thing"))
    assert sha not in cache
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    with pytest.raises(StagingError, match="size mismatch"):
        cache.get_or_fetch(sha, size, lambda p: p.write_bytes(b"short"))
    assert sha not in cache
    assert cache.get_or_fetch(sha, size, good).read_bytes() == b"the real thing"


def test_two_threads_fetching_one_blob_download_once(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    sha, size, _ = blob(data)
    first_in_fetch, second_waiting, release = threading.Event(), threading.Event(), threading.Event()
    calls: list[str] = []

    def fetch(p: Path) -> None:
        calls.append(threading.current_thread().name)
        first_in_fetch.set()
        assert release.wait(20)
        p.write_bytes(data)

    cache = BlobCache(tmp_path / "cache", max_bytes=MiB, on_wait=lambda s: second_waiting.set())
    results: dict[str, Path] = {}

    def worker() -> None:
        results[threading.current_thread().name] = cache.get_or_fetch(sha, size, fetch)

    t1 = threading.Thread(target=worker, name="t1")
    t2 = threading.Thread(target=worker, name="t2")
    t1.start()
    assert first_in_fetch.wait(20)
    t2.start()
    assert second_waiting.wait(20)  # t2 found the download in progress and waits for it
    release.set()
    t1.join(20)
    t2.join(20)
    assert calls == ["t1"]
    assert results["t1"] == results["t2"]
    assert results["t2"].read_bytes() == data


def _proc_fetch(root: str, sha: str, size: int, data: bytes, log: str, started: object, waiting: object,
                release: object, out: object) -> None:
    def fetch(p: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        started.set()  # type: ignore[attr-defined]
        release.wait(20)  # type: ignore[attr-defined]
        p.write_bytes(data)

    cache = BlobCache(Path(root), max_bytes=MiB, on_wait=lambda s: waiting.set())  # type: ignore[attr-defined]
    out.put(str(cache.get_or_fetch(sha, size, fetch)))  # type: ignore[attr-defined]


def test_two_processes_fetching_one_blob_download_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    data = os.urandom(50_000)
    sha, size, _ = blob(data)
    log = tmp_path / "fetches.log"
    started, waiting, release = ctx.Event(), ctx.Event(), ctx.Event()
    out = ctx.Queue()
    args = (str(tmp_path / "cache"), sha, size, data, str(log), started, waiting, release, out)
    p1 = ctx.Process(target=_proc_fetch, args=args)
    p2 = ctx.Process(target=_proc_fetch, args=args)
    p1.start()
    assert started.wait(20)
    p2.start()
    assert waiting.wait(20)
    release.set()
    paths = {out.get(timeout=20), out.get(timeout=20)}
    p1.join(20)
    p2.join(20)
    assert (p1.exitcode, p2.exitcode) == (0, 0)
    assert len(log.read_text().splitlines()) == 1
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == data


def test_lru_eviction_respects_recency_and_pins(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=250)
    a, b, c, d = (blob(bytes([i]) * 100) for i in range(4))
    cache.get_or_fetch(*a)
    cache.get_or_fetch(*b)
    cache.get_or_fetch(*a)  # a is now more recent than b
    cache.get_or_fetch(*c)  # 300 > 250: the least recently used (b) goes
    assert a[0] in cache and c[0] in cache and b[0] not in cache
    assert cache.total_bytes() == 200

    with cache.pinned(a[0]):  # a is now the least recently used, but a job is using it
        cache.get_or_fetch(*d)  # 300 > 250: a is skipped, the next LRU (c) goes
        assert a[0] in cache and d[0] in cache and c[0] not in cache
        with cache.use(*c) as path_c:  # fetched again and pinned: a and c pinned, so d goes though more recent
            assert path_c.read_bytes() == bytes([2]) * 100
            assert a[0] in cache and c[0] in cache and d[0] not in cache
    assert cache.total_bytes() == 200
    assert cache.evict() == []  # within the limit: nothing more to do


def test_pin_held_by_another_process_prevents_eviction(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    cache = BlobCache(tmp_path / "cache", max_bytes=100)
    a, b = blob(b"a" * 100), blob(b"b" * 100)
    cache.get_or_fetch(*a)
    holding, done = ctx.Event(), ctx.Event()

    def hold() -> None:
        with BlobCache(tmp_path / "cache", max_bytes=100).pinned(a[0]):
            holding.set()
            done.wait(20)

    p = ctx.Process(target=hold)
    p.start()
    try:
        assert holding.wait(20)
        cache.get_or_fetch(*b)  # 200 > 100, but a is pinned by the other process and b by this call
        assert a[0] in cache and b[0] in cache
        assert cache.evict() == [b[0]]  # pins beat recency: the unpinned b goes, the older a stays
    finally:
        done.set()
        p.join(20)
    cache.get_or_fetch(*b)
    assert a[0] not in cache and b[0] in cache  # unpinned now, the LRU a is evicted for b


def test_bad_sha_is_rejected(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=MiB)
    with pytest.raises(ValueError):
        cache.get_or_fetch("../../etc/passwd", None, lambda p: None)


# --------------------------------------------------------------------------------------------- placing blobs
def test_copy_into_job_dir_keeps_the_cache_safe(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=MiB)
    data = os.urandom(3 * MiB + 5)
    cached = cache.get_or_fetch(*blob(data))
    dest = tmp_path / "job" / "bin" / "app"
    how = copy_or_link_into(cached, dest, executable=True)
    assert how in ("copy", "reflink")
    assert dest.read_bytes() == data
    assert dest.stat().st_ino != cached.stat().st_ino
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    dest.write_bytes(b"job scribbles on its copy")
    assert cached.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["app"]  # no temp file left beside it
