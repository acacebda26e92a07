"""A real browser (Debian's chromium, driven by Playwright) against a real server and a real worker.

Never ``playwright install``: the browser is /usr/bin/chromium from Debian (.ci/run installs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from web.webgrid import Grid, make_grid, stop_grid


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    g = make_grid(tmp_path_factory.mktemp("webgrid"))
    try:
        yield g
    finally:
        stop_grid(g)


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1360, "height": 900})
    yield ctx
    ctx.close()
