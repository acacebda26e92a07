"""A bag's cap (``max_bag``) counts the works it makes, replicas included (issue 13: 11 specs × 1,000 replicas
made 11,000 works under a cap of 10,000)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cluster import ServerProc

from xwhep.client import XwError


def test_bag_cap_counts_replicas_not_specs(make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    srv = make_server()
    with srv.client() as admin:
        prog = tmp_path / "noop.sh"
        prog.write_text("#!/bin/sh\ntrue\n")
        admin.put_app("noop", binaries={"linux/x86_64": prog})
        with pytest.raises(XwError) as err:
            admin.submit_bag([{"app": "noop", "replicas": 1000, "label": f"s{i}"} for i in range(11)])
        assert err.value.status == 413 and err.value.field == "works"
        assert err.value.message.startswith("works: 11,000 works in one request (11 specs with their replicas), "
                                            "at most 10,000"), err.value.message
        assert admin.works() == []  # nothing half-made
        made = admin.submit_bag([{"app": "noop", "replicas": 1000, "label": f"s{i}"} for i in range(10)])
        assert len(made) == 10_000  # at the cap: accepted, every replica a work of its own
        assert len(admin.works()) == 10_000
