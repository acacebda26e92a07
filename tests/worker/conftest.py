"""VM images and executors for the worker's VM and container tests.

The images are built once per machine (cached by xwhep.vm.images under $XWHEP_VM_CACHE or /var/cache/xwhep/vm,
keyed by the package versions), so a test session only builds them when the packages changed. Without QEMU or the
image tools the tests that need them skip locally but fail in CI, where .ci/run installs them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from xwhep.vm import images
from xwhep.worker.executors.qemu import QemuExecutor

VM_TOOLS = ("qemu-system-x86_64", "qemu-img", "bwrap", "mkfs.ext4", "genisoimage", "apt-get", "dpkg-deb", "depmod",
            "cpio")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def minimal_image() -> images.VmImage:
    """The minimal image (Debian cloud kernel + busybox initramfs with the xwhep init)."""
    missing = [t for t in VM_TOOLS if shutil.which(t) is None]
    if missing:
        _unavailable(f"not installed: {', '.join(missing)}")
    try:
        return images.build_minimal()
    except images.ImageError as exc:
        _unavailable(str(exc))
        raise


@pytest.fixture(scope="session")
def debian_image(minimal_image: images.VmImage) -> images.VmImage:
    """The Debian cloud-init + openssh-server image (minutes to build the first time on a machine)."""
    if shutil.which("mmdebstrap") is None:
        _unavailable("mmdebstrap is not installed")
    try:
        return images.build_debian()
    except images.ImageError as exc:
        _unavailable(str(exc))
        raise


@pytest.fixture(scope="session")
def qemu_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qemu-worker")


@pytest.fixture(scope="session")
def qemu(minimal_image: images.VmImage, qemu_workdir: Path) -> Iterator[QemuExecutor]:
    """A QEMU executor whose accelerator was probed once for the session."""
    ex = QemuExecutor(qemu_workdir, probe_kernel=minimal_image.kernel, probe_initrd=minimal_image.initrd)
    ex.probe()
    yield ex
