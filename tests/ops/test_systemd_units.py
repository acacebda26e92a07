"""contrib/systemd: the units parse and verify (systemd-analyze, without booting systemd), their command lines
match the real commands, and the worker's hardening is what bubblewrap tolerates (checked with bwrap itself)."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
BREAK_BWRAP = ("ProtectKernelTunables", "ProtectKernelLogs", "ProtectProc", "PrivateDevices", "ProtectControlGroups",
               "RestrictNamespaces", "PrivateUsers", "SystemCallFilter")


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((UNITS / name).read_text())
    return parser


def test_units_parse_and_say_what_they_run() -> None:
    server, worker = _unit("xwhep-server.service"), _unit("xwhep-worker.service")
    for unit in (server, worker):
        assert set(unit.sections()) == {"Unit", "Service", "Install"}
        assert unit["Service"]["NoNewPrivileges"] == "yes" and unit["Service"]["ProtectSystem"] == "strict"
        assert unit["Service"]["Restart"] == "on-failure" and unit["Install"]["WantedBy"] == "multi-user.target"
    s = server["Service"]
    for key in ("ProtectKernelTunables", "ProtectControlGroups", "RestrictNamespaces", "PrivateDevices"):
        assert s[key] == "yes", key
    assert s["CapabilityBoundingSet"] == "" and s["SystemCallFilter"] == "@system-service"
    w = worker["Service"]
    assert w["Delegate"] == "yes"  # per-job cgroups under the service's own
    assert not [k for k in BREAK_BWRAP if k in w], "an option that breaks the bubblewrap sandbox"
    # the command lines use options the real commands have
    bindir = Path(sys.executable).parent
    for unit, command in ((server, ["server", "--help"]), (worker, None)):
        argv = shlex.split(unit["Service"]["ExecStart"])
        exe = bindir / Path(argv[0]).name
        assert exe.exists(), f"{argv[0]} is not a command of the package"
        help_argv = [str(exe), *(command or ["run", "--help"])]
        shown = subprocess.run(help_argv, capture_output=True, text=True, timeout=60,
                               env={**os.environ, "COLUMNS": "200"})
        assert shown.returncode == 0, shown.stderr
        for opt in (a.split("=")[0] for a in argv[1:] if a.startswith("--")):
            assert opt in shown.stdout, f"{unit['Unit']['Description']}: {opt} is not an option of {argv[0]}"


def test_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (the units were parsed above)")
    bindir = Path(sys.executable).parent
    names = []
    for unit in UNITS.glob("*.service"):  # verify checks that the commands exist: point them at this install
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/xwhep/bin/", f"{bindir}/"))
        names.append(unit.name)
    r = subprocess.run([analyze, "verify", *names], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr  # unknown keys are warnings on stderr


def test_bubblewrap_runs_under_the_worker_units_restrictions(tmp_path: Path) -> None:
    bwrap, setpriv, unshare = shutil.which("bwrap"), shutil.which("setpriv"), shutil.which("unshare")
    if os.geteuid() != 0 or not (bwrap and setpriv and unshare):
        pytest.skip("needs root, bwrap, setpriv and unshare to play an unprivileged service user")
    sandbox = [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
               "/bin/true"]
    as_service = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs"]
    ok = subprocess.run([*as_service, *sandbox], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, f"bwrap under NoNewPrivileges as a plain user: {ok.stderr}"
    # what ProtectKernelTunables does (a read-only overmount of /proc/sys) makes the sandbox's /proc impossible
    script = (f"mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
              f"{shlex.join([*as_service, *sandbox])}")
    broken = subprocess.run([unshare, "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert broken.returncode != 0 and "proc" in broken.stderr
