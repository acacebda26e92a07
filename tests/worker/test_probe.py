"""The host probe against the real machine."""

from __future__ import annotations

import os
import platform
import shutil
import socket
from pathlib import Path

import psutil

import xwhep
from xwhep.worker.probe import cpu_speed_mhz, probe_host


def test_probe_describes_this_host(tmp_path: Path) -> None:
    d = probe_host(tmp_path)
    assert set(d) == {"name", "os", "cpu", "cpuspeed", "cores", "memory", "disk", "java", "apptypes", "version"}
    assert d["name"] == socket.gethostname()
    assert d["os"] == "linux"
    assert d["cpu"] == {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64"}.get(platform.machine(),
                                                                                         d["cpu"])
    assert d["cores"] == os.cpu_count()
    assert d["memory"] == psutil.virtual_memory().total >> 20
    assert abs(d["disk"] - (shutil.disk_usage(tmp_path).free >> 20)) < 64  # other tests write meanwhile
    assert d["java"] == (shutil.which("java") is not None)
    assert d["version"] == xwhep.__version__
    assert isinstance(d["cpuspeed"], int) and d["cpuspeed"] >= 0


def test_apptypes_follow_the_tools_on_path(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    assert probe_host(tmp_path, path=str(bindir))["apptypes"] == []
    assert probe_host(tmp_path, path=str(bindir))["java"] is False
    for tool in ("qemu-system-x86_64", "podman", "java"):
        p = bindir / tool
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    d = probe_host(tmp_path, path=str(bindir))
    assert d["apptypes"] == ["CONTAINER", "VM"]
    assert d["java"] is True


def test_cpu_speed_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\ncpu MHz\t\t: 2445.428\n")
    assert cpu_speed_mhz(info) == 2445
    real = cpu_speed_mhz()
    if "cpu MHz" in Path("/proc/cpuinfo").read_text():
        assert real > 0
