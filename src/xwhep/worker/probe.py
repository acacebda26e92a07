"""The worker's description of its host, as sent to the server when registering.

Everything is measured on the real host; nothing is taken from configuration.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
from pathlib import Path
from typing import Any

import psutil

import xwhep
from xwhep.core.model import normalize_cpu, normalize_os

__all__ = ["APPTYPE_TOOLS", "cpu_speed_mhz", "probe_host"]

# Shared application types and the program whose presence on PATH makes the host able to run them.
APPTYPE_TOOLS = {"VM": "qemu-system-x86_64", "CONTAINER": "podman", "VIRTUALBOX": "VBoxManage"}


def cpu_speed_mhz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """Nominal CPU speed in MHz: ``/proc/cpuinfo`` first, then psutil; 0 when unknown."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == "cpu mhz":
                return int(float(value.strip()))
    except (OSError, ValueError):
        pass
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError, psutil.Error):
        freq = None
    if freq is not None and freq.current:
        return int(freq.current)
    return 0


def probe_host(workdir: Path, path: str | None = None) -> dict[str, Any]:
    """Describe this host: name, os, cpu, cpuspeed (MHz), cores, memory (MiB), free disk of ``workdir`` (MiB),
    java (bool), apptypes (shared app types really usable here) and the xwhep version.

    ``path`` overrides ``$PATH`` for finding java and the virtualization tools.
    """
    return {
        "name": socket.gethostname(),
        "os": normalize_os(platform.system()),
        "cpu": normalize_cpu(platform.machine()),
        "cpuspeed": cpu_speed_mhz(),
        "cores": os.cpu_count() or 1,
        "memory": psutil.virtual_memory().total >> 20,
        "disk": shutil.disk_usage(workdir).free >> 20,
        "java": shutil.which("java", path=path) is not None,
        "apptypes": sorted(t for t, tool in APPTYPE_TOOLS.items() if shutil.which(tool, path=path)),
        "version": xwhep.__version__,
    }
