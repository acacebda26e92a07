"""``xw bench``: the numbers that steer xwhep's design, measured against real server processes.

One module per benchmark (:mod:`.throughput`, :mod:`.dispatch`, :mod:`.scale`, :mod:`.transfer`,
:mod:`.relay`, :mod:`.sandbox`, :mod:`.observe`, :mod:`.vm`), lightweight simulated workers speaking the real
HTTP protocol (:mod:`.simworker`), and a runner (:mod:`.runner`) that prints a table and writes ``latest.json``,
``latest.md`` and ``latest.png`` into ``--out DIR``. Run it with ``xw bench`` or ``python -m xwhep.bench``;
``--smoke`` runs everything small in seconds (the test suite does, so the benchmarks never rot).

The benchmark dependencies (Dask, matplotlib, psycopg) come with the optional extra ``xwhep[bench]``.
"""

from __future__ import annotations

#: The headline numbers of ``latest.json``, each a number, or ``null`` with a reason under ``"skipped"``.
KEYS: tuple[str, ...] = (
    "throughput_sqlite_works_per_s",
    "throughput_postgres_works_per_s",
    "dask_tasks_per_s",
    "ratio_vs_dask",
    "dispatch_p50_ms",
    "dispatch_p99_ms",
    "alive_hosts",
    "alive_p99_ms",
    "upload_ratio_vs_raw",
    "download_ratio_vs_raw",
    "relay_ratio_vs_ssh",
    "relay_connect_p50_ms",
    "sandbox_overhead_ms",
    "observe_cost_pct",
    "vm_overhead_ratio",
    "vm_job_start_s",
    "vm_bare_boot_s",
    "container_overhead_ratio",
    "debian_ssh_ready_s",
)

#: The benchmarks, in the order the runner runs them.
BENCHMARKS: tuple[str, ...] = ("throughput", "dispatch", "scale", "transfer", "relay", "sandbox", "observe", "vm")
