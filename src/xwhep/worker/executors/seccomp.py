"""A seccomp filter for native jobs: no setuid or setgid file, no device node, ever.

Why: the job's uid 1000 maps to the uid that runs the worker, so with a worker running as root every file a job
creates in its job dir belongs to root on the host; a job that could set the setuid bit would leave a setuid-root
binary in the worker's workdir. The sandbox mounts /job ``nosuid,nodev`` (the bit is not honoured inside), but
the host's own mount of the workdir honours it. So the bits are refused at the source: any call that would put
``S_ISUID`` or ``S_ISGID`` on a file (``chmod`` and friends, ``open``/``creat``/``mkdir``/``mknod`` with such a
mode) fails with ``EPERM``, and so does ``mknod`` of a character or block device (a user namespace refuses those
anyway). ``openat2`` and ``io_uring_setup`` (whose modes cannot be inspected by a filter) fail with ``ENOSYS``,
so libraries fall back to the calls above. System calls of another ABI (i386 ``int 0x80``, x32) all fail.

The program is classic BPF built here (no libseccomp binding needed) for x86_64 and aarch64; bubblewrap loads it
with ``--seccomp FD`` right before it executes the job.
"""

from __future__ import annotations

import errno
import platform
import struct
from dataclasses import dataclass

__all__ = ["setuid_filter", "supported"]

# BPF opcodes (linux/filter.h, linux/bpf_common.h)
_LD_W_ABS = 0x00 | 0x00 | 0x20
_JEQ_K = 0x05 | 0x10 | 0x00
_JGE_K = 0x05 | 0x30 | 0x00
_JSET_K = 0x05 | 0x40 | 0x00
_AND_K = 0x04 | 0x50 | 0x00
_RET_K = 0x06 | 0x00

_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_EPERM = _ERRNO | errno.EPERM
_ENOSYS = _ERRNO | errno.ENOSYS

_SUID_SGID = 0o6000
_S_IFMT, _S_IFCHR, _S_IFBLK = 0o170000, 0o020000, 0o060000
_O_CREAT, _O_TMPFILE = 0o100, 0o20000000  # generic values (x86_64 and aarch64 alike)

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6] (little-endian: low word first)
_NR, _ARCH = 0, 4


def _arg(i: int) -> int:
    return 16 + 8 * i


@dataclass(frozen=True)
class _Abi:
    audit_arch: int
    x32_bit: bool
    # syscall → (index of the mode argument, index of the flags argument for the open family, or -1)
    modes: dict[int, tuple[int, int]]
    devices: tuple[int, ...]  # mknod-like: their mode must not name a device
    no_such: tuple[int, ...]  # openat2, io_uring_setup


_ABIS = {
    "x86_64": _Abi(0xC000003E, True,
                   {90: (1, -1), 91: (1, -1), 268: (2, -1), 452: (2, -1),  # chmod fchmod fchmodat fchmodat2
                    83: (1, -1), 258: (2, -1), 133: (1, -1), 259: (2, -1),  # mkdir mkdirat mknod mknodat
                    85: (1, -1), 2: (2, 1), 257: (3, 2)},  # creat open openat
                   (133, 259), (437, 425)),
    "aarch64": _Abi(0xC00000B7, False,
                    {52: (1, -1), 53: (2, -1), 452: (2, -1), 34: (2, -1), 33: (2, -1), 56: (3, 2)},
                    (33,), (437, 425)),
}


def supported() -> bool:
    """Whether a filter can be built for this machine."""
    return platform.machine() in _ABIS


def setuid_filter(machine: str | None = None) -> bytes:
    """The filter as ``struct sock_filter`` records, ready for ``bwrap --seccomp FD``."""
    abi = _ABIS[machine or platform.machine()]
    prog: list[tuple[int, object, object, int]] = []  # (code, jt, jf, k); jt/jf: label names or 0

    def emit(code: int, k: int = 0, jt: object = 0, jf: object = 0) -> None:
        prog.append((code, jt, jf, k))

    labels: dict[str, int] = {}

    def label(name: str) -> None:
        labels[name] = len(prog)

    emit(_LD_W_ABS, _ARCH)
    emit(_JEQ_K, abi.audit_arch, 0, "foreign")
    emit(_LD_W_ABS, _NR)
    if abi.x32_bit:
        emit(_JGE_K, 0x40000000, "foreign", 0)
    for nr in abi.no_such:
        emit(_JEQ_K, nr, "nosys", 0)
    for nr in abi.modes:
        emit(_JEQ_K, nr, f"check{nr}", 0)
    emit(_RET_K, _ALLOW)
    for nr, (mode, flags) in abi.modes.items():
        label(f"check{nr}")
        if flags >= 0:  # the mode of open/openat only counts when a file is created
            emit(_LD_W_ABS, _arg(flags))
            emit(_JSET_K, _O_CREAT | _O_TMPFILE, 0, "allow")
        emit(_LD_W_ABS, _arg(mode))
        emit(_JSET_K, _SUID_SGID, "deny", 0)
        if nr in abi.devices:
            emit(_AND_K, _S_IFMT)
            emit(_JEQ_K, _S_IFCHR, "deny", 0)
            emit(_JEQ_K, _S_IFBLK, "deny", 0)
        emit(_RET_K, _ALLOW)
    label("allow")
    emit(_RET_K, _ALLOW)
    label("deny")
    emit(_RET_K, _EPERM)
    label("nosys")
    emit(_RET_K, _ENOSYS)
    label("foreign")
    emit(_RET_K, _ENOSYS)

    out = bytearray()
    for pc, (code, jt, jf, k) in enumerate(prog):
        offsets = []
        for target in (jt, jf):
            off = 0 if target == 0 else labels[str(target)] - pc - 1
            if not 0 <= off <= 255:
                raise AssertionError(f"seccomp filter: jump out of range at {pc}")
            offsets.append(off)
        out += struct.pack("<HBBI", code, offsets[0], offsets[1], k)
    return bytes(out)
