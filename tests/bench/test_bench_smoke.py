"""``xw bench --smoke`` end to end: every benchmark runs small against real processes, so none of them rots."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xwhep.bench import KEYS

pytest.importorskip("matplotlib", reason="the bench extra is not installed: pip install 'xwhep[bench]'")


def test_smoke_run_writes_every_key_and_the_plot(tmp_path: Path) -> None:
    out = tmp_path / "results"
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "xwhep.bench", "--smoke", "--out", str(out),
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=180, check=False)
    elapsed = time.monotonic() - t
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "latest.json").read_text())
    assert doc["smoke"] is True and doc["date"] and doc["machine"]["cores"] >= 1
    for key in KEYS:
        assert key in doc, key
        value = doc[key]
        if value is None:
            assert doc["skipped"].get(key), f"{key} is null without a reason"
        else:
            assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
            assert key not in doc["skipped"], key
    # what must run everywhere the suite runs: our server's throughput on SQLite and the transfer
    assert doc["throughput_sqlite_works_per_s"] > 0, doc["details"]["throughput"]
    assert doc["upload_ratio_vs_raw"] > 0 and doc["download_ratio_vs_raw"] > 0, doc["skipped"]
    # the alive benchmark ran and measured (whether the small host count met the 100 ms budget is a measurement,
    # not something a test on a shared machine may assert)
    assert doc["alive_p99_ms"] is not None and doc["alive_p99_ms"] > 0 and doc["alive_hosts"] >= 0, doc["skipped"]
    assert (out / "latest.png").stat().st_size > 10_000
    assert "| `throughput_sqlite_works_per_s` |" in (out / "latest.md").read_text()
    assert "throughput_sqlite_works_per_s" in proc.stdout  # the printed table
    assert elapsed < 150, f"the smoke run took {elapsed:.0f} s: it must stay small (about 45 s here)"
