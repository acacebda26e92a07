"""The grid shared by the tunnel tests (see tunnelgrid.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from tunnels.tunnelgrid import Grid, make_grid, stop_grid, tcpserv_proxy


@pytest.fixture(scope="session")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    g = make_grid(tmp_path_factory.mktemp("tunnels"))
    try:
        yield g
    finally:
        stop_grid(g)


@pytest.fixture(scope="module")
def tcpserv(grid: Grid) -> Iterator[tuple[str, int]]:
    """A running tcpserv job on port 7000 and an xwproxy to it: (work uid, local port)."""
    with tcpserv_proxy(grid) as served:
        yield served
