"""The scheduler's pick: matching by class, fair share across owners, rank, FIFO, replicas on distinct hosts."""

from __future__ import annotations

from xwhep.core.matching import HostProfile, WorkProfile
from xwhep.core.model import AppType
from xwhep.server.scheduler import Scheduler


def profile(owner: str, **kw: object) -> WorkProfile:
    base: dict[str, object] = {"app_name": "a", "app_type": AppType.DEPLOYABLE,
                               "platforms": frozenset({"linux/x86_64"}), "owner": owner, "rights": 0x755}
    base.update(kw)
    return WorkProfile(**base)  # type: ignore[arg-type]


HOST = HostProfile(uid="h1", memory=2048, cores=4)


def test_fifo_within_one_owner() -> None:
    s = Scheduler()
    for i in range(5):
        s.add(f"w{i}", i, profile("alice"), None, None)
    assert s.pick(HOST, 3) == ["w0", "w1", "w2"]
    assert s.pick(HOST, 5) == ["w3", "w4"]
    assert s.pick(HOST, 1) == []


def test_fair_share_interleaves_owners() -> None:
    s = Scheduler()
    for i in range(10):  # alice submitted a big bag first
        s.add(f"a{i}", i, profile("alice"), None, None)
    for i in range(3):
        s.add(f"b{i}", 100 + i, profile("bob"), None, None)
    got = s.pick(HOST, 6)
    assert got[:2] == ["a0", "b0"] and set(got) == {"a0", "a1", "a2", "b0", "b1", "b2"}
    # an owner with many works running waits behind one with none
    s2 = Scheduler()
    s2.running["alice"] = 5
    s2.add("a", 1, profile("alice"), None, None)
    s2.add("b", 2, profile("bob"), None, None)
    assert s2.pick(HOST, 1) == ["b"]


def test_only_matching_classes_are_picked() -> None:
    s = Scheduler()
    s.add("big", 1, profile("alice", min_memory=10_000), None, None)
    s.add("arm", 2, profile("alice", platforms=frozenset({"linux/aarch64"})), None, None)
    s.add("ok", 3, profile("alice"), None, None)
    s.add("req", 4, profile("alice", requirements="host.cores >= 8"), None, None)
    assert s.pick(HOST, 10) == ["ok"]
    assert len(s) == 3, "non-matching works stay pending for other hosts"
    big = HostProfile(uid="h2", memory=20_000, cores=16)
    assert sorted(s.pick(big, 10)) == ["big", "req"]


def test_rank_orders_classes() -> None:
    s = Scheduler()
    s.add("low", 1, profile("alice", min_disk=1), "0", None)
    s.add("high", 2, profile("alice", min_disk=2), "host.memory", None)
    host = HostProfile(uid="h3", memory=2048, disk=100)
    assert s.pick(host, 1) == ["high"]


def test_replicas_never_share_a_host_and_discard_is_honoured() -> None:
    s = Scheduler()
    for i in range(3):
        s.add(f"r{i}", i, profile("alice"), None, "set1")
    s.add("x", 10, profile("alice"), None, None)
    s.discard("x")
    assert s.pick(HOST, 10) == ["r0"]
    s.replica_hosts["set1"].add("h1")
    assert s.pick(HOST, 10) == []
    assert s.pick(HostProfile(uid="other"), 10) == ["r1"]


def test_put_back_restores_picked_works_in_order() -> None:
    s = Scheduler()
    for i in range(4):
        s.add(f"w{i}", i, profile("alice"), None, "set" if i == 3 else None)
    hold: dict = {}
    assert s.pick(HOST, 2, hold=hold) == ["w0", "w1"]
    assert set(hold) == {"w0", "w1"} and len(s) == 2
    assert s.pick(HOST, 2) == ["w2", "w3"]  # the class is now empty
    assert s.pick(HOST, 1) == []
    s.put_back(hold)  # the claim of w0, w1 did not commit
    assert len(s) == 2
    assert s.pick(HOST, 5) == ["w0", "w1"]
