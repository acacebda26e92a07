"""Stage-out: find what a job produced and pack it into one checksummed result file.

The result of a work is every file of the job dir that is new or modified since stage-in (compared with a
:func:`snapshot` taken right after stage-in), plus the captured stdout/stderr when not empty.

Symbolic links, since the job could create any: a link whose target resolves outside the job dir is refused
(:class:`PackingError`) — packing it would hand the worker's files to the client. A link staying inside the job
dir is stored as a regular file with its target's content when the target is a regular file; links to
directories and dangling links are skipped. Directories themselves, FIFOs, sockets and devices are never packed
(an empty new directory does not appear in the result; a FIFO is never opened, so it cannot block the worker).

Everything is streamed in chunks; no file is ever held in memory. Packing runs after the job's whole process
tree is gone, so nothing can change the job dir underneath.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["PackedResult", "PackingError", "Snapshot", "pack_results", "snapshot"]

_CHUNK = 1 << 20
Snapshot = dict[str, tuple[int, int, int]]  # relpath → (size, mtime_ns, inode)


class PackingError(Exception):
    """The job dir holds something that must not be returned (e.g. a symlink leading out of it)."""


@dataclass(frozen=True)
class PackedResult:
    """The packed result: a zip (``zipped``) or the lone result file as is; ``files`` are the names inside."""

    path: Path
    sha256: str
    size: int
    files: list[str]
    zipped: bool


def _walk(jobdir: Path) -> dict[str, os.stat_result]:
    """lstat of every non-directory entry under ``jobdir`` (links are listed, never followed)."""
    out: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(jobdir, followlinks=False):
        rel_dir = os.path.relpath(dirpath, jobdir)
        # os.walk lists symlinks to directories among dirnames (without descending): they are entries too.
        for name in [*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]:
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            try:
                out[rel] = os.lstat(full)
            except FileNotFoundError:
                continue
    return out


def snapshot(jobdir: Path) -> Snapshot:
    """Record every file of ``jobdir`` (take it right after stage-in): relpath → (size, mtime_ns, inode).

    Returns only once the filesystem clock has moved past the newest recorded mtime, so that a file rewritten
    right after (same size, same timestamp tick) still shows a different mtime (git's "racy" entries problem;
    file timestamps advance in coarse ticks of a few ms). Costs at most one tick, and only after a fresh stage-in.
    """
    snap = {rel: (st.st_size, st.st_mtime_ns, st.st_ino) for rel, st in _walk(jobdir).items()}
    if snap:
        _wait_fs_clock_past(jobdir, max(v[1] for v in snap.values()))
    return snap


def _wait_fs_clock_past(d: Path, mtime_ns: int, timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fd, probe = tempfile.mkstemp(dir=d, prefix=".xw-clock-")
        try:
            now_ns = os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)
            os.unlink(probe)
        if now_ns > mtime_ns:
            return
        time.sleep(0.001)  # the filesystem clock has no event to wait on; one tick is a few ms


def _inside(root: Path, target: Path) -> bool:
    return target == root or root in target.parents


def _select(jobdir: Path, before: Snapshot) -> list[tuple[str, Path]]:
    """(archive name, path to read) of the new or modified regular files, after checking every symlink."""
    root = jobdir.resolve()
    chosen: list[tuple[str, Path]] = []
    for rel, st in sorted(_walk(jobdir).items()):
        full = jobdir / rel
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(full))
            if not _inside(root, target):
                raise PackingError(f"{rel} is a symbolic link leading out of the job dir ({os.readlink(full)})")
            if before.get(rel) == (st.st_size, st.st_mtime_ns, st.st_ino):
                continue
            try:
                tst = os.stat(target)
            except FileNotFoundError:
                continue  # dangling: nothing to return
            if stat.S_ISREG(tst.st_mode):
                chosen.append((rel, target))
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if before.get(rel) == (st.st_size, st.st_mtime_ns, st.st_ino):
            continue
        chosen.append((rel, full))
    return chosen


def _stream_name(wanted: str, taken: set[str]) -> str:
    # A job may itself create stdout.txt; its own file keeps the name and the captured stream moves aside.
    name = wanted
    while name in taken:
        name = "xw-" + name
    return name


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while b := f.read(_CHUNK):
            h.update(b)
            size += len(b)
    return h.hexdigest(), size


def _zip_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    t = time.gmtime(max(mtime, 315532800))  # zip cannot express dates before 1980
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


def _open_member(name: str, path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise PackingError(f"{name}: cannot read the result file: {e.strerror}") from e


def pack_results(
    jobdir: Path, before_snapshot: Snapshot, stdout_path: Path | None, stderr_path: Path | None, out_path: Path
) -> PackedResult | None:
    """Pack the job's results into ``out_path``; return ``None`` if there is nothing to return.

    Members are the new/modified files of ``jobdir`` (relative paths, sorted) followed by ``stdout.txt`` and
    ``stderr.txt`` when non-empty. With exactly one member, ``out_path`` receives that file as is (``zipped`` is
    False); otherwise a zip in that order. Raises :class:`PackingError` for a symlink leading out of ``jobdir`` or
    an unreadable result file; ``out_path`` must lie outside ``jobdir``.
    """
    root = jobdir.resolve()
    if _inside(root, out_path.resolve()):
        raise ValueError(f"the result {out_path} must be written outside the job dir {jobdir}")
    members = _select(jobdir, before_snapshot)
    taken = {name for name, _ in members}
    for wanted, p in (("stdout.txt", stdout_path), ("stderr.txt", stderr_path)):
        if p is not None and p.is_file() and p.stat().st_size > 0:
            name = _stream_name(wanted, taken)
            taken.add(name)
            members.append((name, p))
    if not members:
        return None

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.part")
    try:
        if len(members) == 1:
            with _open_member(*members[0]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
            zipped = False
        else:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
                for name, src_path in members:
                    with _open_member(name, src_path) as src:
                        st = os.fstat(src.fileno())
                        info = zipfile.ZipInfo(name, date_time=_zip_time(st.st_mtime))
                        info.compress_type = zipfile.ZIP_DEFLATED
                        info.external_attr = ((0o755 if st.st_mode & 0o111 else 0o644) | stat.S_IFREG) << 16
                        info.file_size = st.st_size  # lets zipfile pick zip64 up front for big members
                        with zf.open(info, "w", force_zip64=st.st_size > 0x7FFFFFFF) as dst:
                            shutil.copyfileobj(src, dst, _CHUNK)
            zipped = True
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    sha, size = _hash_file(out_path)
    return PackedResult(out_path, sha, size, [name for name, _ in members], zipped)
