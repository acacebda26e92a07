"""The README's two first commands work as written, in a fresh clone, for a user with an empty home directory.

A clone holds only committed files, which is what CI and a new user get. The commands are read from README.md
(the first two lines of its first ``sh`` block), not copied here, so the test follows the README. Each run builds
its own venv with pip, hence the generous timeouts.

``bash .ci/run`` runs the test suite itself: with ``XW_NESTED_SUITE=1`` the inner pytest keeps only ``tests/core``
(see ``pytest_collection_modifyitems`` in ``tests/conftest.py``), so this does not recurse into the whole suite.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(2 * TIMEOUT + 120),
    # inside the suite that .ci/run starts, never start it again (a second guard besides the conftest hook)
    pytest.mark.skipif(os.environ.get("XW_NESTED_SUITE") == "1", reason="nested run of the suite"),
]


def readme_commands() -> list[str]:
    """The first two command lines of the README's first ``sh`` block, comments stripped."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"^```sh\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no ```sh block"
    cmds = [shlex.join(shlex.split(line, comments=True)) for line in block.group(1).splitlines()]
    cmds = [c for c in cmds if c]
    assert len(cmds) >= 2, f"README's first sh block has fewer than two commands: {cmds}"
    return cmds[:2]


def test_readme_lists_the_demo_then_the_test_command() -> None:
    assert readme_commands() == ["bash scripts/demo.sh", "bash .ci/run"]


def fresh_clone(tmp_path: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "--git-dir"], capture_output=True).returncode != 0:
        pytest.skip(f"{REPO} is not a git work tree")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, capture_output=True, timeout=120)
    return clone


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment as a new user would have it: another HOME, and nothing of the test's venv."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith(("PYTEST_", "XW_"))}
    venv_bin = os.environ.get("VIRTUAL_ENV")
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
            if p and not (venv_bin and Path(p) == Path(venv_bin) / "bin") and Path(p) != REPO / ".venv" / "bin"]
    env.update(HOME=str(home), PATH=os.pathsep.join(path), **extra)
    return env


def run(cmd: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, executable="/bin/bash", cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def test_demo_command_runs_in_a_fresh_clone(tmp_path: Path) -> None:
    demo, _ = readme_commands()
    clone = fresh_clone(tmp_path)
    proc = run(demo, clone, user_env(tmp_path / "home"))
    assert proc.returncode == 0, f"{demo} exited {proc.returncode}\n{tail(proc.stdout)}\n{tail(proc.stderr)}"
    out = proc.stdout
    assert "== work COMPLETED" in out, tail(out)
    assert "numbers from stdin summed: 10" in out, tail(out)
    assert "greeting from the dirin: hello from the desktop grid" in out, tail(out)


def test_ci_command_runs_in_a_fresh_clone(tmp_path: Path) -> None:
    _, ci = readme_commands()
    clone = fresh_clone(tmp_path)
    proc = run(ci, clone, user_env(tmp_path / "home", XW_NESTED_SUITE="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{ci} exited {proc.returncode}\n{tail(proc.stdout)}\n{tail(proc.stderr)}"
    for step in ("== ruff check", "== mypy", "== pytest"):
        assert step in out, tail(out)
    summary = re.search(r"^=* ?\d+ passed.* in [\d.]+s.*$", proc.stdout, re.M)  # pytest's closing line
    assert summary and "failed" not in summary.group(0) and "error" not in summary.group(0), tail(out)
