"""Virtual machines for xwhep jobs: the images (:mod:`.images`) and what crosses into and out of a guest
(:mod:`.guestio`). The executors that boot them live in :mod:`xwhep.worker.executors` (QEMU, VirtualBox).

Guest protocol 1 — what a VM job's guest is given and must give back; the same for every image and hypervisor:

1. The worker attaches one **job disk** beside the image's own disk, if any: a raw file whose first bytes are
   ``XWHEPJOB1`` and whose ext4 filesystem holds ``in/`` (the job dir), ``stdin`` (the job's standard input) and
   ``xw/`` (``agent.sh``, the job's ``run.sh``, ``job.env``, the contextualization ``script``); past the
   filesystem, at ``XW_OUT_OFFSET`` (in ``job.env``), is room for the results. An image that boots with cloud-init
   also gets a **seed**: a NoCloud ISO labelled ``cidata`` (``user-data``, ``meta-data``, ``network-config``).
2. Something in the guest finds the job disk by its magic, mounts it at ``/xw/disk`` and runs
   ``sh /xw/disk/xw/agent.sh /xw/disk DEVICE`` as root: the minimal image's ``/init`` (guest/init) does; the Debian
   image's ``xwhep-agent.service`` does once cloud-init has made the user ``xwjob`` (uid 1000, no password, no sudo,
   the work's ssh keys), and the seed's ``runcmd`` does the same in other cloud-init images.
3. The agent (guest/agent.sh) makes ``/job`` an overlay of ``in/``, so that exactly the files the job creates or
   changes land in the overlay's upper dir, brings up ``eth0`` as 10.0.2.15 when the job has listen ports, and
   runs ``run.sh`` as ``xwjob`` in ``/job`` (environment, contextualization script, command), stdin from the job
   disk, stdout and stderr to files. It then kills whatever ``xwjob`` left running, writes one tar stream at
   ``XW_OUT_OFFSET`` — ``log/rc``, ``log/stdout.txt``, ``log/stderr.txt``, ``job/``, and ``log/end`` last (or
   ``log/error`` alone when the agent itself failed) — syncs and powers off.
4. The console carries progress lines starting with ``xwhep-guest:`` (``job-start``, ``job-end rc=N``,
   ``results-written``, ``error: …``), which the executors use for timings and error reports only: the results
   are what the job disk says.

The host never mounts a disk the guest wrote (see :func:`xwhep.vm.guestio.read_results`).
"""
