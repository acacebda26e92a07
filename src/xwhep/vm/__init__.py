"""Virtual machines for xwhep jobs: the images (:mod:`.images`) and what crosses into and out of a guest
(:mod:`.guestio`). The executors that boot them live in :mod:`xwhep.worker.executors` (QEMU, VirtualBox).

Guest protocol 1 — what a VM job's guest is given and must give back; the same for every image and hypervisor:

1. The worker attaches three disks beside the image's own: the **job disk** (ext4, first bytes ``XWHEPJOB1``:
   ``in/`` holds the job dir, ``stdin`` the job's standard input), the **result disk** (raw, first bytes
   ``XWHEPOUT1``, otherwise empty) and the **seed** (a cloud-init NoCloud ISO labelled ``cidata``, first bytes
   ``XWHEPSEED1``: ``user-data``, ``meta-data``, ``network-config`` and ``xw/`` with ``agent.sh``, ``run.sh``,
   ``job.env`` and the optional contextualization ``script``).
2. Something in the guest runs ``sh SEED/xw/agent.sh SEED`` as root once the seed is mounted: the minimal image's
   ``/init`` (guest/init) does, and in a cloud-init image the seed's own ``user-data`` does (``runcmd``), after
   making the user ``xwjob`` (uid 1000, no password, no sudo, the work's ssh keys).
3. The agent (guest/agent.sh) mounts the job disk, makes ``/job`` an overlay of ``in/`` so that exactly the files
   the job creates or changes land in the overlay's upper dir, brings up ``eth0`` as 10.0.2.15 when the job has
   listen ports, and runs ``run.sh`` as ``xwjob`` in ``/job`` (environment, contextualization script, command),
   stdin from the job disk, stdout and stderr to files. It then kills whatever ``xwjob`` left running, writes
   one tar stream at 1 MiB on the result disk — ``log/rc``, ``log/stdout.txt``, ``log/stderr.txt``, ``job/``,
   and ``log/end`` last (or ``log/error`` alone when the agent itself failed) — syncs and powers off.
4. The console carries progress lines starting with ``xwhep-guest:`` (``job-start``, ``job-end rc=N``,
   ``results-written``, ``error: …``), which the executors use for timings and error reports only: the results
   are what the result disk says.

The host never mounts a disk the guest wrote (see :func:`xwhep.vm.guestio.read_results`).
"""
