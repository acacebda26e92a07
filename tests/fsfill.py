"""Filling a (small, test-made) file system to its last byte: the disk-full condition for real."""

from __future__ import annotations

from pathlib import Path


def fill_up(fs: Path, name: str = "filler") -> Path:
    """Fill the file system holding ``fs`` with one file (remove it to free the space again)."""
    path = fs / name
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):  # then the last partial pieces
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return path
