"""VM images built from Debian packages only (nothing downloaded but from the configured Debian mirror).

* :func:`build_minimal`: the Debian cloud kernel (``apt-get download linux-image-…-cloud-amd64``, unpacked with
  ``dpkg-deb -x``) and a busybox initramfs (``busybox-static``, downloaded the same way) holding the virtio,
  iso9660 and overlay modules and the tiny ``/init`` of :mod:`xwhep.vm` (guest/init). Boots by direct kernel boot;
  no disk. A few seconds to build.
* :func:`build_debian`: a Debian 12 root filesystem made by ``mmdebstrap`` with systemd, cloud-init,
  openssh-server and the cloud kernel, packed as an ext4 qcow2 disk (label ``xwroot``) plus its kernel and initrd
  for direct kernel boot. A few minutes to build.

Images are cached under :func:`cache_dir`, in a directory named after a key of the package versions the host's
apt would install (and of the builder's own files), so a new kernel or a changed init means a new image and an
unchanged setup is never rebuilt. Each image directory holds a ``manifest.json`` (:class:`VmImage`) written last:
a directory without one is an interrupted build and is made again. Builds take a lock, so concurrent builders
(test sessions, workers) wait for each other instead of building twice; a new build removes the images of the
same kind it replaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ImageError", "VmImage", "build_debian", "build_minimal", "cache_dir", "package_version"]

GUEST = Path(__file__).with_name("guest")
BUILDER_VERSION = "1"
KERNEL_META = "linux-image-cloud-amd64"
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "isofs", "overlay")
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("systemd-sysv", "udev", "linux-image-cloud-amd64", "cloud-init", "openssh-server", "ifupdown",
                   "iproute2", "netbase")
DEBIAN_DISK_MB = 2048
MINIMAL_APPEND = "console=ttyS0 quiet panic=-1"
DEBIAN_APPEND = "root=LABEL=xwroot ro console=ttyS0 net.ifnames=0 quiet panic=-1"


class ImageError(Exception):
    """An image could not be built (a tool or a package is missing, a build step failed)."""


@dataclass
class VmImage:
    """A built image: what QEMU boots (paths inside :attr:`directory`) and how it was made."""

    kind: str  # "minimal" or "debian"
    directory: Path
    kernel: Path
    initrd: Path
    append: str
    disk: Path | None = None
    disk_format: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    build_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for k in ("directory", "kernel", "initrd", "disk"):
            if doc[k] is not None:
                doc[k] = str(doc[k])
        return doc

    @classmethod
    def load(cls, directory: Path) -> VmImage:
        doc = json.loads((directory / "manifest.json").read_text())
        for k in ("kernel", "initrd", "disk"):
            if doc.get(k):
                doc[k] = directory / Path(doc[k]).name  # the cache may have moved: names are what count
        doc["directory"] = directory
        return cls(**doc)


def cache_dir() -> Path:
    """``$XWHEP_VM_CACHE``, else ``/var/cache/xwhep/vm`` for root, else ``~/.cache/xwhep/vm``."""
    env = os.environ.get("XWHEP_VM_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/xwhep/vm")
    return Path.home() / ".cache" / "xwhep" / "vm"


def _run(argv: list[str], what: str, cwd: Path | None = None, timeout: float | None = None,
         input_text: str | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout,
                              input=input_text)
    except FileNotFoundError:
        raise ImageError(f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what}: {argv[0]} did not finish in {timeout} s") from None
    if proc.returncode != 0:
        raise ImageError(f"{what}: {' '.join(argv[:3])}… failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc.stdout


def _apt_show(pkg: str) -> dict[str, str]:
    out = _run(["apt-cache", "show", "--no-all-versions", pkg], f"package {pkg}")
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" ") and key not in fields:
            fields[key] = value.strip()
    if "Version" not in fields:
        raise ImageError(f"package {pkg}: apt knows no version of it (run apt-get update)")
    return fields


def package_version(pkg: str) -> str:
    """The version of ``pkg`` the host's apt would install (its candidate)."""
    return _apt_show(pkg)["Version"]


def kernel_package() -> tuple[str, str]:
    """(name, version) of the Debian cloud kernel the metapackage ``linux-image-cloud-amd64`` points at."""
    depends = _apt_show(KERNEL_META).get("Depends", "")
    for dep in depends.split(","):
        name = dep.strip().split(" ")[0]
        if name.startswith("linux-image-") and name != KERNEL_META:
            return name, package_version(name)
    raise ImageError(f"{KERNEL_META} depends on no kernel image ({depends!r})")


def _files_digest(*paths: Path) -> str:
    h = hashlib.sha256(BUILDER_VERSION.encode())
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(cache: Path, name: str) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _download(pkg: str, dest: Path) -> Path:
    """``apt-get download pkg`` into ``dest``; returns the .deb."""
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg], f"download {pkg}", cwd=dest,
         timeout=600)
    debs = sorted(dest.glob(f"{pkg}_*.deb"))
    if not debs:
        raise ImageError(f"download {pkg}: no .deb appeared")
    return debs[-1]


def _finish(tmp: Path, final: Path, image: VmImage) -> VmImage:
    tmp.chmod(0o755)  # mkdtemp made it private; the images are not secret and QEMU may run as another user
    (tmp / "manifest.json").write_text(json.dumps(image.to_json(), indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # the images this one replaces (older package versions): a VM still running one keeps its open files
    for old in final.parent.glob(f"{image.kind}-*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return VmImage.load(final)


# -- minimal image ----------------------------------------------------------------------------------------------

def _cpio(root: Path, out: Path) -> None:
    names = ["."]
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in sorted(dirnames) + sorted(filenames):
            names.append(n if rel == "." else f"{rel}/{n}")
    with open(out, "wb") as f:
        proc = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
                              input="\n".join(names).encode() + b"\n", stdout=f, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise ImageError(f"initramfs: cpio failed: {proc.stderr.decode(errors='replace')[-500:]}")


def _modules(kroot: Path, kver: str) -> list[Path]:
    _run(["depmod", "-b", str(kroot), kver], "kernel modules")
    chosen: list[Path] = []
    for mod in MODULES:
        out = _run(["modprobe", "-d", str(kroot), "-S", kver, "--show-depends", mod], f"module {mod}")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                p = Path(parts[1])
                if p not in chosen:
                    chosen.append(p)  # modprobe lists dependencies first: the load order
    return chosen


def _initramfs(kroot: Path, kver: str, busybox_root: Path, work: Path, out: Path) -> list[str]:
    """The busybox initramfs ``out`` for kernel ``kver`` (modules from ``kroot``); returns the modules in it."""
    ird = work / "initramfs"
    for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "mods", "xw"):
        (ird / d).mkdir(parents=True)
    shutil.copy2(busybox_root / "bin" / "busybox", ird / "bin" / "busybox")
    shutil.copyfile(GUEST / "init", ird / "init")
    (ird / "init").chmod(0o755)
    mods = _modules(kroot, kver)
    for m in mods:
        shutil.copyfile(m, ird / "mods" / m.name)
    (ird / "modlist").write_text("".join(m.name + "\n" for m in mods))
    (ird / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nxwjob:x:1000:1000:xwhep job:/job:/bin/sh\n")
    (ird / "etc" / "group").write_text("root:x:0:\nxwjob:x:1000:\n")
    _cpio(ird, out)  # uncompressed: nothing to inflate at boot (TCG is slow at it)
    shutil.rmtree(ird)
    return [m.name for m in mods]


def _busybox(work: Path) -> tuple[Path, str]:
    """busybox-static unpacked under ``work`` (its root) and its version."""
    version = package_version("busybox-static")
    root = work / "busybox"
    _run(["dpkg-deb", "-x", str(_download("busybox-static", work)), str(root)], "unpack busybox")
    return root, version


def build_minimal(cache: Path | None = None, force: bool = False) -> VmImage:
    """The minimal image (cloud kernel + busybox initramfs), from the cache or built now."""
    cache = cache or cache_dir()
    kpkg, kversion = kernel_package()
    bversion = package_version("busybox-static")
    key = hashlib.sha256(f"{kpkg}={kversion} busybox-static={bversion} "
                         f"{_files_digest(GUEST / 'init')}".encode()).hexdigest()[:16]
    final = cache / f"minimal-{key}"
    with _locked(cache, "minimal"):
        if (final / "manifest.json").is_file() and not force:
            return VmImage.load(final)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=".minimal-", dir=cache))
        try:
            work = tmp / "work"
            work.mkdir()
            kroot = work / "kernel"
            _run(["dpkg-deb", "-x", str(_download(kpkg, work)), str(kroot)], "unpack the kernel")
            broot, bversion = _busybox(work)
            kvers = sorted(p.name for p in (kroot / "lib" / "modules").iterdir())
            if len(kvers) != 1:
                raise ImageError(f"kernel package {kpkg} holds {len(kvers)} module trees")
            kver = kvers[0]
            shutil.copyfile(kroot / "boot" / f"vmlinuz-{kver}", tmp / "vmlinuz")
            _initramfs(kroot, kver, broot, work, tmp / "initrd.img")
            shutil.rmtree(work)
            image = VmImage(kind="minimal", directory=final, kernel=final / "vmlinuz", initrd=final / "initrd.img",
                            append=MINIMAL_APPEND,
                            versions={kpkg: kversion, "busybox-static": bversion, "kernel": kver},
                            build_seconds=round(time.monotonic() - t0, 2))
            return _finish(tmp, final, image)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# -- Debian image ---------------------------------------------------------------------------------------------------

def _mirrors() -> list[str]:
    base = os.environ.get("XWHEP_DEBIAN_MIRROR", "http://deb.debian.org/debian").rstrip("/")
    security = os.environ.get("XWHEP_DEBIAN_SECURITY", "http://deb.debian.org/debian-security").rstrip("/")
    return [f"deb {base} {DEBIAN_SUITE} main", f"deb {base} {DEBIAN_SUITE}-updates main",
            f"deb {security} {DEBIAN_SUITE}-security main"]


def build_debian(cache: Path | None = None, force: bool = False) -> VmImage:
    """The Debian cloud-init image (qcow2 root disk + its kernel and initrd), from the cache or built now."""
    cache = cache or cache_dir()
    versions = {p: package_version(p) for p in ("linux-image-cloud-amd64", "cloud-init", "openssh-server",
                                                  "systemd", "busybox-static")}
    kpkg, kversion = kernel_package()
    versions[kpkg] = kversion
    hook = GUEST / "debian-customize.sh"
    key = hashlib.sha256((json.dumps(versions, sort_keys=True) + " ".join(DEBIAN_PACKAGES) + " ".join(_mirrors())
                          + _files_digest(hook, GUEST / "init", GUEST / "xwhep-agent.service",
                                          GUEST / "xwhep-agent-launch")).encode()).hexdigest()[:16]
    final = cache / f"debian-{key}"
    with _locked(cache, "debian"):
        if (final / "manifest.json").is_file() and not force:
            return VmImage.load(final)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=".debian-", dir=cache))
        try:
            root = tmp / "root"
            mode = "root" if os.geteuid() == 0 else "unshare"
            _run(["mmdebstrap", f"--mode={mode}", "--variant=minbase", "--include=" + ",".join(DEBIAN_PACKAGES),
                  "--dpkgopt=force-unsafe-io", "--aptopt=Acquire::Languages \"none\"",
                  "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
                  "--dpkgopt=path-exclude=/usr/share/locale/*",
                  "--dpkgopt=path-include=/usr/share/locale/locale.alias",
                  # Debian's initramfs (initramfs-tools) is never made: the image boots with xwhep's own busybox
                  # initramfs (seconds faster under TCG, and minutes less to build)
                  "--essential-hook=chroot \"$1\" dpkg-divert --quiet --local --rename --add "
                  "/usr/sbin/update-initramfs && ln -s /bin/true \"$1/usr/sbin/update-initramfs\"",
                  f"--customize-hook=sh {hook} \"$1\"", DEBIAN_SUITE, str(root), *_mirrors()],
                 "mmdebstrap", timeout=1800)
            boot = root / "boot"
            kernels = sorted(boot.glob("vmlinuz-*"))
            if len(kernels) != 1:
                raise ImageError(f"the image holds {len(kernels)} kernels")
            kver = kernels[0].name.removeprefix("vmlinuz-")
            shutil.copyfile(kernels[0], tmp / "vmlinuz")
            work = tmp / "work"
            work.mkdir()
            broot, _ = _busybox(work)
            _initramfs(root, kver, broot, work, tmp / "initrd.img")
            shutil.rmtree(work)
            raw = tmp / "root.raw"
            with open(raw, "wb") as f:
                f.truncate(DEBIAN_DISK_MB << 20)
            _run(["mkfs.ext4", "-q", "-F", "-L", "xwroot", "-d", str(root), str(raw)], "root disk")
            shutil.rmtree(root)
            _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(tmp / "root.qcow2")], "root disk (qcow2)")
            raw.unlink()
            versions["kernel"] = kver
            image = VmImage(kind="debian", directory=final, kernel=final / "vmlinuz", initrd=final / "initrd.img",
                            append=DEBIAN_APPEND, disk=final / "root.qcow2", disk_format="qcow2",
                            versions=versions, build_seconds=round(time.monotonic() - t0, 1))
            return _finish(tmp, final, image)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
