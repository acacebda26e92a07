"""Fixtures of the client tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from client.pygrid import PyGrid, start_grid, stop_grid


@pytest.fixture(scope="session")
def pygrid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PyGrid]:
    """One server and two workers (pools 2 and 3) for the Python bridges' tests."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    grid = start_grid(tmp_path_factory.mktemp("pygrid"))
    try:
        yield grid
    finally:
        stop_grid(grid)
