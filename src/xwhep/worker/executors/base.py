"""The executor interface: what a job is (:class:`JobSpec`), how it ended (:class:`JobOutcome`), and the two small
protocols every executor (native sandbox, VM, container, VirtualBox) implements.

Outcome statuses follow XtremWeb-HEP:

* ``COMPLETED`` — the application ran and exited by itself, whatever its return code (non-zero included);
* ``FAILED`` — the application was stopped because it broke a rule of the work (wall-clock limit);
* ``ERROR`` — the job could not run properly for a reason outside the application's logic (sandbox failed to
  start, memory limit exceeded, executor failure);
* ``ABORTED`` — the worker stopped the job on purpose (deactivation, server order); the work is rescheduled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

__all__ = ["ContainerSpec", "Executor", "ExecutorError", "JobOutcome", "JobSpec", "OutcomeStatus", "RunningJob",
           "VmContext", "VmSpec"]

OutcomeStatus = Literal["COMPLETED", "FAILED", "ERROR", "ABORTED"]


class ExecutorError(Exception):
    """The executor could not start the job at all (bad spec, missing tool)."""


@dataclass(kw_only=True)
class VmContext:
    """Contextualization of a VM job: what the guest's NoCloud seed carries beyond the job itself.

    ``ssh_authorized_keys`` go to the job user ``xwjob`` (ssh with a key only; images with cloud-init and sshd);
    ``script`` is a shell script the guest runs as ``xwjob`` in ``/job`` before the command (its failure is the
    job's exit code): e.g. to start a service on a listen port.
    """

    ssh_authorized_keys: list[str] = field(default_factory=list)
    script: str | None = None
    hostname: str = "xwjob"


@dataclass(kw_only=True)
class VmSpec:
    """What makes a job a virtual machine job (``JobSpec.vm``); executors ``qemu`` and ``virtualbox``.

    The guest boots ``kernel`` + ``initrd`` directly (``append`` is the kernel command line), or the template
    ``disk`` through its own boot loader, or both (a root disk booted by a given kernel). ``disk`` is never
    written: each run boots a copy-on-write overlay of it, removed afterwards. ``disk_format`` is stated, never
    guessed (a raw disk holding a qcow2 header must not be read as qcow2); QEMU reads all four, VirtualBox all but
    qcow2. ``memory_mb``/``cpus`` size the VM;
    ``disk_mb`` is the room the job gets in ``/job`` beyond its inputs. ``listen_ports`` are guest TCP ports the
    tunnel layer may connect to (through ``JobSpec.unix_socket_dir``, as for native jobs); a job argv already
    wrapped in the tunnel forwarder (``TunnelManager.wrap``) adds its ``--listen`` ports too.

    ``JobSpec.argv`` is the command run *in the guest* (in ``/job``, as the unprivileged ``xwjob``), with
    ``JobSpec.env`` and ``JobSpec.stdin``; ``JobSpec.wallclock`` bounds the whole VM, from power-on to power-off.
    """

    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    disk: Path | None = None
    disk_format: Literal["qcow2", "raw", "vdi", "vmdk"] = "qcow2"
    cpus: int = 1
    memory_mb: int = 256
    disk_mb: int = 256
    listen_ports: list[int] = field(default_factory=list)
    context: VmContext = field(default_factory=VmContext)


@dataclass(kw_only=True)
class ContainerSpec:
    """What makes a job a container job (``JobSpec.container``); executor ``podman``.

    ``image`` is a tarball on the worker (from its blob cache): a root filesystem (``image_format="rootfs"``,
    imported with ``podman import``) or an image archive (``"archive"``: docker-archive or oci-archive, loaded
    with ``podman load``). ``image_sha256`` names it in the local image store (computed when not given), so an
    image is imported once per worker. ``JobSpec.argv`` runs inside the container, in ``/job``.
    """

    image: Path
    image_format: Literal["rootfs", "archive"] = "rootfs"
    image_sha256: str | None = None


@dataclass(kw_only=True)
class JobSpec:
    """Everything an executor needs to run one job.

    ``jobdir`` is the job's private working directory (stage-in already done); it is the only host directory the
    job may write. ``logdir`` receives ``stdout.txt`` and ``stderr.txt``; it must lie outside ``jobdir`` so the
    captured streams are never mistaken for (or overwritten by) job outputs. ``argv[0]`` is resolved inside the
    job's environment (e.g. ``python3`` or ``/job/app``).

    Limits are optional; ``None`` means "not limited". ``cpu_quota`` counts CPUs (docker ``--cpus`` semantics:
    0.25 is a quarter of one CPU, 2.0 two full CPUs). ``max_procs`` counts the job's own processes and threads.
    ``unix_socket_dir`` (a host directory) appears as ``/xw/sockets`` inside, for tunnels to the job.

    ``vm`` makes the job a virtual machine (:class:`VmSpec`), ``container`` a container (:class:`ContainerSpec`);
    each executor refuses the kinds it does not run. Whatever the kind, the outputs end up the same way: files
    created or changed in ``jobdir``, ``stdout.txt``/``stderr.txt`` in ``logdir``, packed by the worker alike.
    """

    jobdir: Path
    logdir: Path
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdin: Path | None = None
    wallclock: float | None = None  # seconds
    memory_mb: int | None = None
    cpu_quota: float | None = None
    max_procs: int | None = None
    unix_socket_dir: Path | None = None
    vm: VmSpec | None = None
    container: ContainerSpec | None = None

    @property
    def stdout_path(self) -> Path:
        """Where the job's standard output is written."""
        return self.logdir / "stdout.txt"

    @property
    def stderr_path(self) -> Path:
        """Where the job's standard error is written."""
        return self.logdir / "stderr.txt"


@dataclass
class JobOutcome:
    """How a job ended.

    ``limits_applied`` has one key per *requested* limit (``memory``, ``cpu``, ``procs``, ``wallclock``): True if
    the executor really enforced it; ``limits_notes`` says why not (or how) for each of them.
    """

    status: OutcomeStatus
    return_code: int | None
    reason: str
    stdout: Path
    stderr: Path
    limits_applied: dict[str, bool]
    wall_s: float
    limits_notes: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class RunningJob(Protocol):
    """A started job."""

    @property
    def pid(self) -> int:
        """Host pid of the job's top process (the sandbox/VM monitor)."""
        ...

    def wait(self, timeout: float | None = None) -> JobOutcome:
        """Block until the job has ended and everything it started is gone; return its outcome.

        Raises :class:`TimeoutError` if ``timeout`` seconds pass first (the job keeps running).
        """
        ...

    def stop(self, reason: str) -> None:
        """End the whole job at once; its outcome becomes ``ABORTED`` with ``reason`` (if it was still running)."""
        ...


@runtime_checkable
class Executor(Protocol):
    """Runs jobs of one kind."""

    name: str

    def start(self, spec: JobSpec) -> RunningJob:
        """Start ``spec`` and return at once; raises :class:`ExecutorError` when it cannot even start."""
        ...
