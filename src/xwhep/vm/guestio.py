"""What a VM job's guest is given and gives back (guest protocol 1, see :mod:`xwhep.vm`).

* the **job disk** (:func:`make_job_disk`): one raw file. Its first part is an ext4 filesystem made on the host
  with ``mkfs.ext4 -d`` from a staged tree — ``in/`` (the job dir), ``stdin``, ``xw/`` (the agent, the job's
  ``run.sh``, ``job.env``, the contextualization script) — with the magic ``XWHEPJOB1`` in its first bytes (unused
  by ext4). Past the filesystem's end, at ``JobDisk.result_offset``, the guest agent writes one tar stream:
  ``log/rc``, ``log/error``, ``log/stdout.txt``, ``log/stderr.txt``, the ``job/`` tree (the files the job created
  or changed), then ``log/end``. One disk: every disk costs the guest's boot a probe (a tenth of a second each
  under TCG).
* the **seed** (:func:`make_seed`): a NoCloud ISO (volume ``cidata``: ``user-data``, ``meta-data``,
  ``network-config``), only for images that boot with cloud-init.

The host never mounts or parses a filesystem the guest wrote: :func:`read_results` reads the result stream with
Python's :mod:`tarfile` (bounded by the disk's size) and writes only regular files, under the job dir, through
directory file descriptors opened without following links.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = [
    "AGENT",
    "MAGIC_JOB",
    "GuestIOError",
    "GuestResult",
    "JobDisk",
    "SeedContent",
    "make_job_disk",
    "make_seed",
    "read_results",
    "run_script",
    "user_data",
]

MAGIC_JOB = b"XWHEPJOB1"
_ALIGN = 1 << 20  # the result stream starts on a MiB boundary (the agent writes it in 64 KiB blocks)
AGENT = Path(__file__).with_name("guest") / "agent.sh"
GUEST_MAC = "52:54:00:12:34:56"
GUEST_PATH = "/usr/local/bin:/usr/bin:/bin"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CHUNK = 1 << 20
_MAX_TEXT = 4096


class GuestIOError(Exception):
    """A disk or seed could not be made, or the results could not be read."""


def _run(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise GuestIOError(f"{what}: {argv[0]} is not installed") from None
    if proc.returncode != 0:
        raise GuestIOError(f"{what}: {argv[0]} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")


# -- job disk ------------------------------------------------------------------------------------------------------

def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # mkfs.ext4 -d copies the content: the staged tree only needs names
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dst)


def _stage(jobdir: Path, dest: Path) -> int:
    """Mirror ``jobdir`` into ``dest`` (hard links where possible); return the bytes of its regular files."""
    total = 0
    dest.mkdir()
    for dirpath, dirnames, filenames in os.walk(jobdir, followlinks=False):
        rel = Path(dirpath).relative_to(jobdir)
        for name in [*dirnames, *filenames]:
            src = Path(dirpath, name)
            dst = dest / rel / name
            st = src.lstat()
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)  # a link is a name: the guest resolves it in its own tree
            elif stat.S_ISDIR(st.st_mode):
                dst.mkdir()
            elif stat.S_ISREG(st.st_mode):
                _link_or_copy(src, dst)
                total += st.st_size
            # FIFOs, sockets, devices: never part of a job's inputs
    return total


@dataclass(frozen=True)
class JobDisk:
    """The job disk made: its file, total size, and where the guest writes its results."""

    path: Path
    size: int
    result_offset: int


def make_job_disk(jobdir: Path, stdin: Path | None, image: Path, min_mb: int, workdir: Path,
                  content: SeedContent) -> JobDisk:
    """Make the job disk ``image`` (see the module docstring) from ``jobdir`` (as ``in/``), ``stdin`` and the
    job's ``content`` (as ``xw/``).

    The filesystem has ``min_mb`` MiB of room for the job plus twice the inputs (the guest's overlay may copy them
    once); the result area after it is as large (the results cannot exceed what the job could write). ``workdir``
    holds the staged tree while ``mkfs.ext4 -d`` runs (same filesystem as ``jobdir``: hard links, no copies).
    """
    stage = workdir / "stage"
    try:
        stage.mkdir(mode=0o700)
        inputs = _stage(jobdir, stage / "in")
        if stdin is not None:
            _link_or_copy(stdin, stage / "stdin")
            inputs += stdin.stat().st_size
        fs_size = ((min_mb << 20) + 2 * inputs + (64 << 20) + _ALIGN - 1) & ~(_ALIGN - 1)
        result_offset = fs_size + _ALIGN
        _write_xw(stage / "xw", content, result_offset)
        with open(image, "wb") as f:
            f.truncate(result_offset + fs_size)
        # no journal: the host never reads this filesystem back, so a guest crash cannot hurt it; 256-byte inodes
        # keep nanosecond timestamps; the filesystem ends where the result area begins
        _run(["mkfs.ext4", "-q", "-F", "-L", "xwjob", "-O", "^has_journal", "-I", "256", "-m", "0",
              "-E", "root_owner=0:0,lazy_itable_init=1,nodiscard", "-d", str(stage), str(image),
              f"{fs_size >> 10}k"], "job disk")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    with open(image, "r+b") as f:
        f.write(MAGIC_JOB + b"\n")
    return JobDisk(image, result_offset + fs_size, result_offset)


# -- seed ------------------------------------------------------------------------------------------------------------

def run_script(argv: list[str], env: dict[str, str], script: bool) -> str:
    """The guest's ``xw/run.sh`` (run as ``sh run.sh DIR``): the job's environment, the contextualization script
    (``DIR/script``, as the job user, before the command; its failure is the job's), then ``exec`` of the command
    in ``/job``."""
    for k in env:
        if not _ENV_NAME.fullmatch(k):
            raise GuestIOError(f"environment variable name {k!r} cannot be passed into a VM (letters, digits, _)")
    lines = ["# made by the xwhep worker: the job's command, run by the guest agent as xwjob", "cd /job || exit 126",
             f"export PATH={shlex.quote(GUEST_PATH)} HOME=/job USER=xwjob LOGNAME=xwjob"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    if script:
        lines.append('sh "$1/script" || exit $?')
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def user_data(ssh_keys: list[str]) -> str:
    """cloud-init ``#cloud-config``: the unprivileged user ``xwjob`` (no sudo, no password, key-only ssh), and the
    agent started from the job disk by ``runcmd`` (YAML is a superset of JSON: no YAML writer needed)."""
    launch = (  # as guest/xwhep-agent-launch, for cloud-init images that do not have it
        "for d in /sys/block/*; do dev=/dev/${d##*/}; "
        "if [ \"$(dd if=$dev bs=512 count=1 2>/dev/null | head -c 9)\" = XWHEPJOB1 ]; then "
        "mkdir -p /xw/disk && mount -t ext4 -o nodev,nosuid $dev /xw/disk && "
        "exec sh /xw/disk/xw/agent.sh /xw/disk $dev; fi; "
        "done; echo 'xwhep-guest: error: no xwhep job disk' >/dev/console"
    )
    user: dict[str, object] = {"name": "xwjob", "uid": 1000, "gecos": "xwhep job", "shell": "/bin/sh",
                               "lock_passwd": True}
    if ssh_keys:  # cloud-init's schema wants at least one key when the list is there
        user["ssh_authorized_keys"] = list(ssh_keys)
    doc = {
        "users": [user],
        "disable_root": True,
        "ssh_pwauth": False,
        "ssh_genkeytypes": ["ed25519"],
        "runcmd": [["sh", "-c", launch]],
    }
    return "#cloud-config\n" + json.dumps(doc, indent=1) + "\n"


def _network_config() -> str:
    doc = {"version": 1, "config": [{"type": "physical", "name": "eth0", "mac_address": GUEST_MAC,
                                     "subnets": [{"type": "static", "address": "10.0.2.15/24",
                                                  "gateway": "10.0.2.2"}]}]}
    return json.dumps(doc, indent=1) + "\n"


@dataclass
class SeedContent:
    """What goes into a seed (see :func:`make_seed`)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ssh_keys: list[str] = field(default_factory=list)
    script: str | None = None
    net: bool = False
    max_procs: int | None = None
    hostname: str = "xwjob"


def _write_xw(d: Path, content: SeedContent, result_offset: int) -> None:
    """The job disk's ``xw/``: the agent, ``run.sh``, ``job.env`` and the contextualization script."""
    d.mkdir()
    files = {
        "run.sh": run_script(content.argv, content.env, content.script is not None),
        "job.env": f"XW_NET={1 if content.net else 0}\nXW_OUT_OFFSET={result_offset}\n"
                   + (f"XW_MAX_PROCS={int(content.max_procs)}\n" if content.max_procs else ""),
    }
    if content.script is not None:
        files["script"] = content.script
    for name, text in files.items():
        (d / name).write_text(text)
    shutil.copyfile(AGENT, d / "agent.sh")


def make_seed(iso: Path, content: SeedContent, workdir: Path) -> None:
    """Write the NoCloud seed ISO ``iso`` for cloud-init images; ``workdir`` holds its tree meanwhile."""
    root = workdir / "seed"
    try:
        root.mkdir()
        files = {
            "meta-data": f"instance-id: xw-{uuid.uuid4().hex}\nlocal-hostname: {content.hostname}\n",
            "user-data": user_data(content.ssh_keys),
        }
        if content.net:
            files["network-config"] = _network_config()
        for name, text in files.items():
            (root / name).write_text(text)
            (root / name).chmod(0o644)
        _run(["genisoimage", "-quiet", "-output", str(iso), "-volid", "cidata", "-joliet", "-rock", str(root)],
             "seed")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- results ---------------------------------------------------------------------------------------------------------

@dataclass
class GuestResult:
    """What the guest wrote on the result disk.

    ``complete`` is True when the stream ended with ``log/end`` (nothing was cut short); ``return_code`` is the
    job's exit code (None if the guest never ran it); ``error`` the agent's own failure, if any; ``files`` the job
    dir's files written back; ``skipped`` the members refused (with why).
    """

    written: bool = False
    complete: bool = False
    return_code: int | None = None
    error: str | None = None
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def skip(self, why: str) -> None:
        """Note a refused member (the first hundred: a stream of whiteouts must not fill the worker's memory)."""
        if len(self.skipped) < 100:
            self.skipped.append(why)


def _parts(name: str) -> list[str] | None:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts) or name.startswith("/"):
        return None
    return parts


def _open_dir(root_fd: int, parts: list[str]) -> int:
    """fd of directory ``parts`` under ``root_fd``, made as needed; never follows a symbolic link."""
    fd = os.dup(root_fd)
    try:
        for p in parts:
            try:
                os.mkdir(p, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_member(src: IO[bytes], dir_fd: int, name: str, mode: int, mtime: float) -> None:
    tmp = f".xw-{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
            os.fchmod(dst.fileno(), 0o755 if mode & 0o111 else 0o644)
        os.utime(tmp, (mtime, mtime), dir_fd=dir_fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # a link in the way is replaced, not followed
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _read_text(src: IO[bytes] | None) -> str:
    if src is None:
        return ""
    return src.read(_MAX_TEXT).decode(errors="replace").strip()


def _read_log(tf: tarfile.TarFile, m: tarfile.TarInfo, name: str, res: GuestResult, stdout: Path,
              stderr: Path) -> None:
    if name == "end":
        res.complete = True
    elif not m.isfile():
        return
    elif name == "rc":
        text = _read_text(tf.extractfile(m))
        res.return_code = int(text) if text.isdigit() else None
    elif name == "error":
        res.error = _read_text(tf.extractfile(m)) or "unknown error"
    elif name in ("stdout.txt", "stderr.txt"):
        src = tf.extractfile(m)
        assert src is not None
        target = stdout if name == "stdout.txt" else stderr
        dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _write_member(src, dfd, target.name, 0o644, m.mtime)
        finally:
            os.close(dfd)


def _write_job_file(tf: tarfile.TarFile, m: tarfile.TarInfo, rest: list[str], root_fd: int, written: set[str],
                    res: GuestResult) -> None:
    rel = "/".join(rest)
    src: IO[bytes] | None
    if m.islnk():  # a hard link to a file written before: written again under this name
        origin = _parts(m.linkname)
        if origin is None or origin[0] != "job" or "/".join(origin[1:]) not in written:
            res.skip(f"{rel}: hard link to a file not returned")
            return
        ofd = _open_dir(root_fd, origin[1:-1])
        try:
            src = os.fdopen(os.open(origin[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=ofd), "rb")
        finally:
            os.close(ofd)
    elif m.isfile():
        src = tf.extractfile(m)
    else:
        res.skip(f"{rel}: not a regular file")  # symbolic links, devices, overlay whiteouts
        return
    assert src is not None
    try:
        dfd = _open_dir(root_fd, rest[:-1])
    except OSError as e:
        src.close()
        res.skip(f"{rel}: {e.strerror}")
        return
    try:
        _write_member(src, dfd, rest[-1], m.mode, m.mtime)
    except IsADirectoryError:
        res.skip(f"{rel}: a directory of the job dir has that name")
        return
    except OSError as e:
        raise GuestIOError(f"cannot write {rel} into the job dir: {e.strerror}") from e
    finally:
        os.close(dfd)
        src.close()
    written.add(rel)
    res.files.append(rel)


def read_results(disk: Path, offset: int, jobdir: Path, stdout: Path, stderr: Path) -> GuestResult:
    """Read the tar stream the guest wrote on ``disk`` at ``offset``: files of ``job/`` into ``jobdir`` (only
    regular files, links between them as copies), the job's streams into ``stdout``/``stderr``; see
    :class:`GuestResult`.

    Members with unsafe names, links to anywhere, devices and whiteouts are skipped. Raises
    :class:`GuestIOError` only when ``jobdir`` itself cannot be written.
    """
    res = GuestResult()
    with open(disk, "rb") as f:
        f.seek(offset)
        if not f.read(512).strip(b"\0"):
            return res  # the guest wrote nothing
        f.seek(offset)
        res.written = True
        root_fd = os.open(jobdir, os.O_RDONLY | os.O_DIRECTORY)
        written: set[str] = set()  # job files written so far (targets of hard links)
        try:
            with tarfile.open(fileobj=f, mode="r|") as tf:
                for m in tf:
                    if res.complete:
                        res.skip(f"{m.name}: after log/end")
                        continue
                    parts = _parts(m.name)
                    if parts is None:
                        res.skip(f"{m.name}: unsafe name")
                        continue
                    top, rest = parts[0], parts[1:]
                    if top == "log" and len(rest) == 1:
                        _read_log(tf, m, rest[0], res, stdout, stderr)
                    elif top == "job" and rest and not m.isdir():
                        _write_job_file(tf, m, rest, root_fd, written, res)
        except (tarfile.TarError, EOFError) as e:
            res.skip(f"the result stream is damaged: {e}")
        finally:
            os.close(root_fd)
    return res
