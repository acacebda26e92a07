"""Tunnel addresses and port lists (pure), and what the server accepts at submission."""

from __future__ import annotations

import pytest
from tunnels.tunnelgrid import Grid

from xwhep.client.sdk import XwError
from xwhep.core.tunnels import BadAddress, Target, parse_forwards, parse_ports, parse_target, work_address

UID = "0b7e9d3c-1d2e-4f5a-8b6c-7d8e9f0a1b2c"


def test_ports_and_forwards() -> None:
    assert parse_ports("8080, 8081") == [8080, 8081] and parse_ports(None) == []
    assert parse_forwards(f"xwproxy:abcdefghij,1234;xw://h:4330/{UID}:8080,1235") == [
        ("xwproxy:abcdefghij", 1234), (f"xw://h:4330/{UID}:8080", 1235)]
    for bad in ("0", "65536", "http"):
        with pytest.raises(BadAddress):
            parse_ports(bad)
    with pytest.raises(BadAddress, match="twice"):
        parse_forwards("xwproxy:abcdefghij,1234;xwproxy:klmnopqrst,1234")
    with pytest.raises(BadAddress):
        parse_forwards("nocomma")


def test_targets_round_trip() -> None:
    address = work_address("grid.example.org:4330", UID, 8080)
    assert address == f"xw://grid.example.org:4330/{UID}:8080"
    assert parse_target(address) == Target(work=UID, port=8080)
    assert parse_target(f"{UID}:22") == Target(work=UID, port=22)
    assert parse_target("xwproxy:Ab-_0123456789") == Target(proxy="xwproxy:Ab-_0123456789")
    for bad in ("xwproxy:", "xwproxy:no spaces here", "example.org:80", f"xw://h/{UID}", "localhost"):
        with pytest.raises(BadAddress):
            parse_target(bad)


def test_submission_refuses_a_malformed_forward_address(grid: Grid) -> None:
    with grid.client(grid.alice) as alice:
        with pytest.raises(XwError) as refused:
            alice.submit("fetch", forward_addresses="example.org:80,1234")
        assert refused.value.status == 400 and refused.value.field == "forward_addresses"
        with pytest.raises(XwError):
            alice.submit("fetch", forward_addresses="xwproxy:abcdefghij,1234;xwproxy:klmnopqrst,1234")
