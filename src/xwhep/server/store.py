"""Content-addressed blob store: a blob lives at ``blobs/ab/abcdef…`` named by its sha256.

An upload streams into a temporary file while hashing; only a verified blob is renamed into place, so a
truncated or corrupted upload never becomes visible. The same bytes are stored once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


class StoreError(ValueError):
    """An upload that does not match what was declared."""


@dataclass
class Staged:
    """An upload in progress: a temporary file plus its running hash and size."""

    path: Path
    fd: int
    hasher: hashlib._Hash  # type: ignore[name-defined]
    size: int = 0

    def write(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        view = memoryview(chunk)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(chunk)


class BlobStore:
    """Blobs on a local (or shared) filesystem under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def begin(self) -> Staged:
        """Start an upload into a fresh temporary file."""
        fd_path = self.tmp / f"up-{os.urandom(8).hex()}"
        fd = os.open(fd_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return Staged(fd_path, fd, hashlib.sha256())

    def abort(self, staged: Staged) -> None:
        """Drop an upload: nothing of it stays."""
        try:
            os.close(staged.fd)
        except OSError:
            pass
        staged.path.unlink(missing_ok=True)

    def commit(self, staged: Staged, size: int | None, sha256: str | None) -> tuple[str, int]:
        """Verify the upload against the declared size and sha256, then make it a blob.

        Returns (sha256, size). Raises :class:`StoreError` (and removes the temporary file) on mismatch.
        """
        os.close(staged.fd)
        digest = staged.hasher.hexdigest()
        try:
            if size is not None and staged.size != size:
                raise StoreError(f"size mismatch: declared {size} bytes, received {staged.size} (truncated?)")
            if sha256 is not None and digest != sha256.lower():
                raise StoreError(f"sha256 mismatch: declared {sha256.lower()}, received {digest}")
            target = self.path(digest)
            if target.exists():
                staged.path.unlink()
            else:
                target.parent.mkdir(exist_ok=True)
                os.replace(staged.path, target)
        except BaseException:
            staged.path.unlink(missing_ok=True)
            raise
        return digest, staged.size

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def usage(self) -> tuple[int, int]:
        """(number of blobs, total bytes)."""
        n = total = 0
        for sub in self.root.iterdir():
            if sub.name == "tmp" or not sub.is_dir():
                continue
            for f in sub.iterdir():
                n += 1
                total += f.stat().st_size
        return n, total
