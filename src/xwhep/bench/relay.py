"""Benchmark 5, relay: streams through the server's relay vs ``ssh -L`` (skipped until the tunnels land).

Once ``xwproxy``/the relay exists this will measure, on loopback: bulk throughput through a relayed stream vs
an ``ssh -L`` forward of the same service (``relay_ratio_vs_ssh``), and the time to open a relayed connection
(``relay_connect_p50_ms``).
"""

from __future__ import annotations

from xwhep.bench.common import Result, Settings

KEYS = ["relay_ratio_vs_ssh", "relay_connect_p50_ms"]


def run(settings: Settings) -> Result:
    return Result("relay").skip(KEYS, "relay not implemented yet (waits for the tunnels issue)")
