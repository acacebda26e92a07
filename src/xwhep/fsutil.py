"""File writing shared by the client, the server and the worker."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` with ``mode``, atomically and durably: a random temporary name in the same
    directory (a shared directory cannot trick us into writing through someone's symlink or pre-made file), the
    mode set before any byte is written (a key is never readable by others, not even for a moment), fsync, then
    a rename (a crash never leaves half a key, certificate or config behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
