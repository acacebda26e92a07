"""``xw``'s dispatch, in process: operations go to the classic implementation untouched, ``worker`` to the worker's
command line (loaded lazily), the rest to Typer."""

from __future__ import annotations

import sys
import types

import pytest
from typer.testing import CliRunner

from xwhep.client import classic, cli


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return int(exc.value.code or 0)


def test_operations_run_the_classic_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, list[str], str, bool]] = []

    def fake_run(name: str, argv: list[str], prog: str | None = None, xw_mode: bool = False) -> int:
        seen.append((name, list(argv), str(prog), xw_mode))
        return 7

    monkeypatch.setattr(classic, "run", fake_run)
    assert exit_code(["submit", "app", "--", "--xwlabel", "-h"]) == 7
    assert exit_code(["jobs", "--format", "xml"]) == 7
    assert seen == [("submit", ["app", "--", "--xwlabel", "-h"], "xw submit", True),
                    ("jobs", ["--format", "xml"], "xw jobs", True)]


def test_worker_forwards_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[list[str]] = []
    fake = types.ModuleType("xwhep.worker.cli")
    fake.main = lambda argv: got.append(argv) or 5  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xwhep.worker.cli", fake)
    assert exit_code(["worker", "--config", "w.conf", "--help"]) == 5
    assert got == [["--config", "w.conf", "--help"]]


def test_worker_missing_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "xwhep.worker.cli", None)  # makes the import fail
    assert exit_code(["worker"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xw worker: error: the worker is not available")


def test_typer_app_lists_and_forwards() -> None:
    runner = CliRunner()
    res = runner.invoke(cli.app, ["--help"])
    assert res.exit_code == 0
    for name in ("server", "worker", "submit", "works", "jobs", "why", "wait", "results", "login", "cancel"):
        assert name in res.output
    res = runner.invoke(cli.app, ["works", "--xwbogus"])
    assert res.exit_code == 2
