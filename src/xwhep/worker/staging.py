"""Stage-in: safe extraction of job archives, a local blob cache keyed by sha256, placing blobs into job dirs.

Everything a job receives comes from the network and is untrusted: archive entry names, archive headers (sizes,
types) and the bytes of downloads are all checked here before anything is used.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

__all__ = ["BlobCache", "StagingError", "copy_or_link_into", "safe_extract_zip", "sha256_file"]

_CHUNK = 1 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class StagingError(Exception):
    """Untrusted input was refused (unsafe archive entry, oversize archive, checksum mismatch...)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(_CHUNK):
            h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- zip extraction
def _entry_parts(name: str) -> list[str]:
    # The zip spec mandates "/", but archives made on Windows may carry "\" — treat both as separators so
    # "..\\x" cannot slip through as a single odd-looking name.
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise StagingError(f"archive entry {name!r} has an absolute path")
    parts = [p for p in PurePosixPath(norm).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise StagingError(f"archive entry {name!r} escapes the destination ('..')")
    if any("\0" in p for p in parts):
        raise StagingError(f"archive entry {name!r} contains a NUL byte")
    return parts


def safe_extract_zip(zip_path: Path, dest: Path, max_bytes: int, max_files: int) -> list[Path]:
    """Extract ``zip_path`` into ``dest`` and return the files written, refusing anything unsafe.

    Refused with :class:`StagingError` naming the entry: absolute names, ``..`` components, symbolic links and
    other non-regular entries (from the Unix mode in ``external_attr``), more than ``max_files`` entries, and more
    than ``max_bytes`` of *decompressed* data: refused before anything is written when the headers declare more,
    and counted in real bytes while streaming, so headers that lie do not help a zip bomb either (CPython's
    zipfile also stops an entry at its declared size and then checks its CRC).
    Only the executable bit of entry modes is kept (files become 0644/0755, never setuid). On refusal the files
    this call created are removed again; directories it created may remain (empty).
    """
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    written: list[Path] = []
    total = 0
    try:
        try:
            zf = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, OSError) as e:
            raise StagingError(f"{zip_path.name}: not a readable zip archive: {e}") from e
        with zf:
            infos = zf.infolist()
            if len(infos) > max_files:
                raise StagingError(f"archive has {len(infos)} entries, more than the {max_files} allowed")
            declared = sum(i.file_size for i in infos)
            if declared > max_bytes:
                raise StagingError(f"archive declares {declared} bytes once extracted, more than the {max_bytes} "
                                   "allowed (zip_max_mb): refused")
            for info in infos:
                name = info.filename
                parts = _entry_parts(name)
                mode = info.external_attr >> 16
                ftype = stat.S_IFMT(mode)
                if ftype == stat.S_IFLNK:
                    raise StagingError(f"archive entry {name!r} is a symbolic link")
                is_dir = name.endswith(("/", "\\")) or ftype == stat.S_IFDIR
                if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise StagingError(f"archive entry {name!r} is not a regular file (mode {mode:o})")
                if not parts:
                    if is_dir:
                        continue
                    raise StagingError(f"archive entry {name!r} has an empty name")
                target = root.joinpath(*parts)
                if is_dir:
                    _mkdirs_inside(root, target, name)
                    continue
                _mkdirs_inside(root, target.parent, name)
                total = _extract_one(zf, info, target, root, total, max_bytes, written)
                os.chmod(target, 0o755 if mode & 0o111 else 0o644)
    except BaseException:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    return written


def _mkdirs_inside(root: Path, d: Path, name: str) -> None:
    # Walk down one component at a time so a pre-existing symlink in dest can never redirect the extraction.
    cur = root
    for part in d.relative_to(root).parts:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            cur.mkdir()
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise StagingError(f"archive entry {name!r}: {cur.relative_to(root)} exists and is not a directory")


def _extract_one(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, root: Path, total: int,
                 max_bytes: int, written: list[Path]) -> int:
    name = info.filename
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise StagingError(f"archive entry {name!r}: cannot create {target.relative_to(root)}: {e.strerror}") from e
    written.append(target)
    try:
        with os.fdopen(fd, "wb") as out, zf.open(info) as src:
            while True:
                # Read at most what is still allowed (+1 to detect overflow): a bomb is cut off after max_bytes.
                chunk = src.read(min(_CHUNK, max_bytes - total + 1))
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise StagingError(
                        f"archive expands beyond {max_bytes} bytes (stopped in entry {name!r}): refused")
                out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError) as e:
        raise StagingError(f"archive entry {name!r} is corrupt or unsupported: {e}") from e
    return total


# --------------------------------------------------------------------------------------------- blob cache
@contextlib.contextmanager
def _flocked(path: Path, mode: int) -> Iterator[int]:
    """Hold an flock on ``path``, making sure it is still the file at that path once locked.

    flock locks belong to the open file description, so separate opens conflict even inside one process: the
    same lock serialises threads and processes alike. The inode check matters because the evictor unlinks lock
    files: a waiter that opened the old inode must not believe it holds the new one.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)  # closing the last fd of the description releases the lock


class BlobCache:
    """Blobs stored by sha256 under ``root``, evicted least-recently-used beyond ``max_bytes``.

    * :meth:`get_or_fetch` returns the blob, downloading it at most once even when several threads or processes
      ask at the same time (an exclusive per-blob lock file; the others wait, then reuse the result);
    * the download goes to a temp file, is checked (size and sha256) and only then renamed into place, so a
      half-written or wrong blob is never visible;
    * :meth:`pinned` / :meth:`use` hold a shared per-blob lock while a job uses a blob; eviction only takes blobs
      whose lock it can get exclusively, so a blob in use is never removed;
    * recency is the blob's atime, set explicitly on each access (the mount's atime options do not matter).

    ``max_bytes`` is a soft limit: pinned blobs are kept even if that leaves the cache above it.
    ``on_wait(sha256)`` is called when a request has to wait for another download of the same blob.
    """

    def __init__(self, root: Path, max_bytes: int, on_wait: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.on_wait = on_wait
        self._blobs = self.root / "blobs"
        self._locks = self.root / "locks"
        self._tmp = self.root / "tmp"
        for d in (self._blobs, self._locks, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._evict_mutex = threading.Lock()
        self._clean_tmp()

    # ------------------------------------------------------------------------------------------------- paths
    def path_of(self, sha256: str) -> Path:
        """Where the blob ``sha256`` lives in the cache (whether present or not)."""
        return self._blobs / sha256[:2] / sha256

    def __contains__(self, sha256: str) -> bool:
        return self.path_of(_check_sha(sha256)).is_file()

    def _pin_lock(self, sha: str) -> Path:
        return self._locks / f"{sha}.pin"

    def _fetch_lock(self, sha: str) -> Path:
        return self._locks / f"{sha}.fetch"

    # ------------------------------------------------------------------------------------------------- API
    @contextlib.contextmanager
    def pinned(self, sha256: str) -> Iterator[None]:
        """Protect blob ``sha256`` from eviction for the duration of the block (threads and processes alike)."""
        sha = _check_sha(sha256)
        with _flocked(self._pin_lock(sha), fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def use(self, sha256: str, size: int | None, fetch: Callable[[Path], object]) -> Iterator[Path]:
        """:meth:`get_or_fetch` and keep the blob pinned until the block ends."""
        with self.pinned(sha256):
            yield self.get_or_fetch(sha256, size, fetch)

    def get_or_fetch(self, sha256: str, size: int | None, fetch: Callable[[Path], object]) -> Path:
        """Path of blob ``sha256``, calling ``fetch(tmp_path)`` to download it if it is not cached yet.

        ``fetch`` must write the blob's bytes to the path it is given. The result is refused with
        :class:`StagingError` (and nothing is stored) if its size differs from ``size`` (when given) or its sha256
        from ``sha256``. The returned path stays valid until evicted: use :meth:`use` or :meth:`pinned` to keep it.
        """
        sha = _check_sha(sha256)
        final = self.path_of(sha)
        with self.pinned(sha):
            if final.is_file():
                self._touch(final)
                return final
            with self._fetch_locked(sha):
                if final.is_file():  # another thread/process downloaded it while we waited
                    self._touch(final)
                    return final
                self._download(sha, size, fetch, final)
            # Still pinned here, so the blob just fetched cannot be the one evicted to make room for it.
            self.evict()
        return final

    def evict(self) -> list[str]:
        """Remove least-recently-used, unpinned blobs until the cache fits ``max_bytes``; return their sha256."""
        removed: list[str] = []
        with self._evict_mutex:
            entries = []
            total = 0
            for p in self._blobs.glob("??/*"):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                total += st.st_size
                entries.append((st.st_atime_ns, p.name, st.st_size))
            entries.sort()
            for _, sha, size in entries:
                if total <= self.max_bytes:
                    break
                if self._try_remove(sha):
                    total -= size
                    removed.append(sha)
        return removed

    def total_bytes(self) -> int:
        """Bytes currently held by committed blobs."""
        return sum(p.stat().st_size for p in self._blobs.glob("??/*") if p.is_file())

    # ------------------------------------------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _fetch_locked(self, sha: str) -> Iterator[None]:
        path = self._fetch_lock(sha)
        try:
            with _flocked(path, fcntl.LOCK_EX | fcntl.LOCK_NB):
                yield
                return
        except BlockingIOError:
            pass
        if self.on_wait is not None:
            self.on_wait(sha)
        with _flocked(path, fcntl.LOCK_EX):
            yield

    def _download(self, sha: str, size: int | None, fetch: Callable[[Path], object], final: Path) -> None:
        tmp = self._tmp / f"{sha}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
        try:
            fetch(tmp)
            if not tmp.is_file():
                raise StagingError(f"blob {sha}: the download produced no file")
            got_size = tmp.stat().st_size
            if size is not None and got_size != size:
                raise StagingError(f"blob {sha}: size mismatch (expected {size} bytes, got {got_size})")
            got = sha256_file(tmp)
            if got != sha:
                raise StagingError(f"blob {sha}: checksum mismatch (got {got})")
            # Read-only: a cached blob is shared by every later job and must never change.
            os.chmod(tmp, 0o444)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)  # atomic: readers see nothing or the whole verified blob
            self._touch(final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @staticmethod
    def _touch(p: Path) -> None:
        st = p.stat()
        os.utime(p, ns=(time.time_ns(), st.st_mtime_ns))

    def _try_remove(self, sha: str) -> bool:
        lock = self._pin_lock(sha)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # pinned by a job (here or in another process)
            try:
                if os.fstat(fd).st_ino != os.stat(lock).st_ino:
                    return False
            except FileNotFoundError:
                return False
            with contextlib.suppress(FileNotFoundError):
                self.path_of(sha).unlink()
            # Anyone fetching holds the pin lock shared, which we exclude: the lock files can go too. Waiters on
            # the old inodes notice (inode check in _flocked) and retry.
            with contextlib.suppress(FileNotFoundError):
                self._fetch_lock(sha).unlink()
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            return True
        finally:
            os.close(fd)

    def _clean_tmp(self) -> None:
        # Leftovers of a worker that died mid-download: the pid in the name tells whether the owner still runs.
        for p in self._tmp.glob("*.part"):
            parts = p.name.split(".")
            try:
                pid = int(parts[1])
            except (IndexError, ValueError):
                continue
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
            if not alive:
                with contextlib.suppress(OSError):
                    p.unlink()


def _check_sha(sha256: str) -> str:
    sha = sha256.lower()
    if not _SHA_RE.match(sha):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return sha


# --------------------------------------------------------------------------------------------- placing blobs
def copy_or_link_into(blob_path: Path, dest: Path, executable: bool = False) -> str:
    """Place a cached blob at ``dest`` (in a job dir) and return how: ``"reflink"`` or ``"copy"``.

    Never a hard link: a hard link shares the inode with the cache, and the job — the owner of that inode as seen
    from its user namespace — could ``chmod`` it writable and alter the cached blob for every later job. A reflink
    (copy-on-write clone, on btrfs/xfs) is as cheap as a link but private; otherwise a plain copy, done by the
    kernel (``copy_file_range``/``sendfile``) without going through Python memory.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    how = "copy"
    with open(blob_path, "rb") as src:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    fcntl.ioctl(out.fileno(), _FICLONE, src.fileno())
                    how = "reflink"
                except OSError as e:
                    if e.errno not in _NO_REFLINK:
                        raise
                    _kernel_copy(src, out)
            os.chmod(tmp, 0o755 if executable else 0o644)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    return how


_FICLONE = 0x40049409  # ioctl number of FICLONE (linux/fs.h)
_NO_REFLINK = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM, errno.EBADF)


def _kernel_copy(src: BinaryIO, out: BinaryIO) -> None:
    # copy_file_range keeps the data in the kernel (and lets filesystems share extents); some kernels refuse it
    # across filesystems, then a chunked copy does the same with bounded memory.
    in_fd, out_fd = src.fileno(), out.fileno()
    try:
        while os.copy_file_range(in_fd, out_fd, _CHUNK):
            pass
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            raise
    src.seek(0)
    out.seek(0)
    out.truncate()
    shutil.copyfileobj(src, out, _CHUNK)
