"""The VM images, built for real from the Debian mirror (once per machine: cached by package versions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xwhep.vm import images


@pytest.fixture(scope="module")
def minimal() -> images.VmImage:
    try:
        return images.build_minimal()
    except images.ImageError as exc:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"required in CI: {exc}", pytrace=False)
        pytest.skip(str(exc))


def test_the_minimal_image_is_the_debian_cloud_kernel_and_a_busybox_initramfs(minimal: images.VmImage) -> None:
    kpkg, kversion = images.kernel_package()
    assert minimal.versions[kpkg] == kversion
    assert minimal.versions["busybox-static"] == images.package_version("busybox-static")
    assert minimal.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage (the x86 boot protocol's magic)
    def cpio(*args: str) -> str:
        with open(minimal.initrd, "rb") as f:
            return subprocess.run(["cpio", "--quiet", *args], stdin=f, capture_output=True, text=True,
                                  check=True).stdout

    names = cpio("-it").split()
    assert {"init", "bin/busybox", "modlist", "etc/passwd"} <= set(names)
    modlist = cpio("-i", "--to-stdout", "modlist").split()
    # loaded in this order: a module after those it needs; and every module the guest needs is there
    assert modlist.index("virtio.ko") < modlist.index("virtio_blk.ko")
    assert {"virtio_pci.ko", "virtio_blk.ko", "virtio_net.ko", "overlay.ko", "isofs.ko"} <= set(modlist)
    assert all(f"mods/{m}" in names for m in modlist)


def test_a_second_build_comes_from_the_cache(minimal: images.VmImage) -> None:
    before = (minimal.directory / "manifest.json").stat().st_mtime_ns
    again = images.build_minimal()
    assert again.directory == minimal.directory
    assert (minimal.directory / "manifest.json").stat().st_mtime_ns == before


def test_the_cli_prints_the_manifest_or_one_error_line(minimal: images.VmImage, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "xwhep.vm", "build", "minimal"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["directory"] == str(minimal.directory)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = subprocess.run([sys.executable, "-m", "xwhep.vm", "build", "minimal", "--cache", str(blocker / "c")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
    assert "Traceback" not in bad.stderr
