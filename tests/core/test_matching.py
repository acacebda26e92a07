"""Matchmaking: each requirement of a work against a host, both ways, and the ``xw why`` summary."""

from __future__ import annotations

from dataclasses import replace

import pytest

from xwhep.core.matching import Check, HostProfile, WorkProfile, explain, matches, summarize
from xwhep.core.model import AppType, UsageLevel

L = UsageLevel

# A public worker that fits BASE_WORK; each test changes one thing.
BASE_HOST = HostProfile(
    uid="11111111-1111-4111-8111-111111111111",
    name="node1",
    os="linux",
    cpu="x86_64",
    cpuspeed=3000,
    cores=4,
    memory=8192,
    disk=50000,
    packages={"python": "3.11.2", "gcc": "12.2.0"},
    owner="worker-user",
    owner_level=L.WORKER_USER,
)
BASE_WORK = WorkProfile(
    app_name="sim",
    app_type=AppType.DEPLOYABLE,
    platforms=frozenset({"linux/x86_64"}),
    owner="alice",
    owner_group="g1-uid",
    owner_group_label="physics",
    rights=0x755,
)


def check(work: WorkProfile, host: HostProfile, name: str) -> Check:
    found = [c for c in explain(work, host) if c.name == name]
    assert len(found) == 1, f"expected one {name!r} check, got {explain(work, host)}"
    return found[0]


def only_failure(work: WorkProfile, host: HostProfile) -> str:
    failed = [c.name for c in explain(work, host) if not c.ok]
    assert len(failed) == 1, failed
    return failed[0]


def test_base_pair_matches() -> None:
    assert matches(BASE_WORK, BASE_HOST)
    assert all(c.ok for c in explain(BASE_WORK, BASE_HOST))


def test_checks_only_what_the_work_asks() -> None:
    names = [c.name for c in explain(BASE_WORK, BASE_HOST)]
    assert names == ["binary", "worker identity"]


class TestBinary:
    def test_binary_for_host_platform(self) -> None:
        assert check(BASE_WORK, BASE_HOST, "binary").ok

    @pytest.mark.parametrize(("os", "cpu"), [("macosx", "x86_64"), ("linux", "aarch64"), ("win64", "x86_64")])
    def test_no_binary_for_host_platform(self, os: str, cpu: str) -> None:
        host = replace(BASE_HOST, os=os, cpu=cpu)
        c = check(BASE_WORK, host, "binary")
        assert not c.ok
        assert f"{os}/{cpu}" in c.detail
        assert "linux/x86_64" in c.detail  # says what the app has
        assert only_failure(BASE_WORK, host) == "binary"
        assert not matches(BASE_WORK, host)

    def test_one_of_several_binaries(self) -> None:
        work = replace(BASE_WORK, platforms=frozenset({"linux/x86_64", "macosx/aarch64"}))
        assert matches(work, replace(BASE_HOST, os="macosx", cpu="aarch64"))

    def test_no_binary_at_all(self) -> None:
        work = replace(BASE_WORK, platforms=frozenset())
        c = check(work, BASE_HOST, "binary")
        assert not c.ok
        assert "none" in c.detail

    def test_java_jar_on_java_host(self) -> None:
        work = replace(BASE_WORK, platforms=frozenset({"java"}))
        assert matches(work, replace(BASE_HOST, java=True, os="win64"))

    def test_java_jar_on_host_without_java(self) -> None:
        work = replace(BASE_WORK, platforms=frozenset({"java"}))
        host = replace(BASE_HOST, java=False)
        assert not check(work, host, "binary").ok
        assert only_failure(work, host) == "binary"


class TestSharedApp:
    @pytest.mark.parametrize(("app_type", "shared"), [(AppType.VM, "VM"), (AppType.CONTAINER, "CONTAINER")])
    def test_shared_type(self, app_type: AppType, shared: str) -> None:
        work = replace(BASE_WORK, app_type=app_type, platforms=frozenset())
        assert check(work, replace(BASE_HOST, apptypes=frozenset({shared})), "shared app").ok
        assert matches(work, replace(BASE_HOST, apptypes=frozenset({shared})))
        c = check(work, replace(BASE_HOST, apptypes=frozenset({"OTHER"})), "shared app")
        assert not c.ok
        assert shared in c.detail

    def test_shared_app_by_name(self) -> None:
        work = replace(BASE_WORK, app_type=AppType.SHARED, app_name="blast", platforms=frozenset())
        assert matches(work, replace(BASE_HOST, apptypes=frozenset({"blast", "VM"})))
        host = replace(BASE_HOST, apptypes=frozenset({"VM"}))
        assert not matches(work, host)
        assert only_failure(work, host) == "shared app"

    def test_no_binary_check_for_shared(self) -> None:
        work = replace(BASE_WORK, app_type=AppType.VM, platforms=frozenset())
        assert "binary" not in [c.name for c in explain(work, BASE_HOST)]


class TestPackages:
    @pytest.mark.parametrize("wanted", [{"python": "3.11"}, {"python": "3"}, {"python": "3.11.2"},
                                        {"python": ""}, {"python": "*"}, {"python": "3.11", "gcc": "12"}])
    def test_present(self, wanted: dict[str, str]) -> None:
        work = replace(BASE_WORK, packages=wanted)
        assert check(work, BASE_HOST, "packages").ok
        assert matches(work, BASE_HOST)

    @pytest.mark.parametrize(
        ("wanted", "missing"),
        [
            ({"python": "3.12"}, "python 3.12"),
            ({"python": "3.1"}, "python 3.1"),  # a prefix is a whole version component, 3.1 is not 3.11
            ({"gcc": "12.2.0.1"}, "gcc 12.2.0.1"),
            ({"perl": ""}, "perl"),
            ({"perl": "5", "python": "3.11"}, "perl 5"),
        ],
    )
    def test_missing(self, wanted: dict[str, str], missing: str) -> None:
        work = replace(BASE_WORK, packages=wanted)
        c = check(work, BASE_HOST, "packages")
        assert not c.ok
        assert c.detail == f"missing {missing}"
        assert only_failure(work, BASE_HOST) == "packages"


class TestMinimums:
    @pytest.mark.parametrize(("field", "host_field", "have"), [
        ("min_memory", "memory", 8192), ("min_cpuspeed", "cpuspeed", 3000), ("min_disk", "disk", 50000)])
    def test_minimum(self, field: str, host_field: str, have: int) -> None:
        name = host_field
        exact = replace(BASE_WORK, **{field: have})
        assert check(exact, BASE_HOST, name).ok  # equal is enough
        assert check(replace(BASE_WORK, **{field: have - 1}), BASE_HOST, name).ok
        over = replace(BASE_WORK, **{field: have + 1})
        c = check(over, BASE_HOST, name)
        assert not c.ok
        assert str(have + 1) in c.detail
        assert str(have) in c.detail
        assert only_failure(over, BASE_HOST) == name


class TestProject:
    def test_host_serves_works_project_by_label(self) -> None:
        host = replace(BASE_HOST, project="physics")
        assert check(BASE_WORK, host, "project").ok
        assert matches(BASE_WORK, host)

    def test_host_serves_works_project_by_group_uid(self) -> None:
        assert check(BASE_WORK, replace(BASE_HOST, project="g1-uid"), "project").ok

    def test_host_serves_another_project(self) -> None:
        host = replace(BASE_HOST, project="biology")
        c = check(BASE_WORK, host, "project")
        assert not c.ok
        assert "biology" in c.detail
        assert only_failure(BASE_WORK, host) == "project"

    def test_host_project_refuses_works_without_group(self) -> None:
        work = replace(BASE_WORK, owner_group=None, owner_group_label=None)
        assert not matches(work, replace(BASE_HOST, project="physics"))


class TestExpectedHost:
    @pytest.mark.parametrize("expected", [BASE_HOST.uid, "node1"])
    def test_expected_host(self, expected: str) -> None:
        work = replace(BASE_WORK, expected_host=expected)
        assert check(work, BASE_HOST, "expected host").ok
        assert matches(work, BASE_HOST)

    @pytest.mark.parametrize("expected", ["22222222-2222-4222-8222-222222222222", "node2"])
    def test_another_host(self, expected: str) -> None:
        work = replace(BASE_WORK, expected_host=expected)
        c = check(work, BASE_HOST, "expected host")
        assert not c.ok
        assert expected in c.detail
        assert only_failure(work, BASE_HOST) == "expected host"


class TestIncoming:
    def test_listen_ports_on_open_host(self) -> None:
        work = replace(BASE_WORK, needs_incoming=True)
        assert matches(work, replace(BASE_HOST, incoming=True))

    def test_listen_ports_on_closed_host(self) -> None:
        work = replace(BASE_WORK, needs_incoming=True)
        host = replace(BASE_HOST, incoming=False)
        c = check(work, host, "incoming connections")
        assert not c.ok
        assert "does not accept" in c.detail
        assert only_failure(work, host) == "incoming connections"

    def test_no_listen_ports_any_host(self) -> None:
        assert matches(BASE_WORK, replace(BASE_HOST, incoming=False))
        assert matches(BASE_WORK, replace(BASE_HOST, incoming=True))


class TestIdentity:
    @pytest.mark.parametrize("level", [L.WORKER_USER, L.VWORKER_USER, L.SUPER_USER])
    def test_public_worker_public_work(self, level: UsageLevel) -> None:
        host = replace(BASE_HOST, owner_level=level)
        c = check(BASE_WORK, host, "worker identity")
        assert c.ok
        assert "public" in c.detail

    @pytest.mark.parametrize("level", [L.WORKER_USER, L.VWORKER_USER, L.SUPER_USER])
    @pytest.mark.parametrize("rights", [0x700, 0x750, 0x751, 0x754, 0x1700])
    def test_private_work_runs_on_public_worker(self, level: UsageLevel, rights: int) -> None:
        """Issue 13: a work ran on public workers only if it was itself 0x755, which forced every work to be
        world-readable. Running a work is not reading it: public workers run private works."""
        work = replace(BASE_WORK, rights=rights)
        c = check(work, replace(BASE_HOST, owner_level=level), "worker identity")
        assert c.ok
        assert c.detail == "public worker"

    @pytest.mark.parametrize("rights", [0x700, 0x750, 0x755])
    def test_private_worker_of_the_owner(self, rights: int) -> None:
        host = replace(BASE_HOST, owner="alice", owner_level=L.STANDARD_USER)
        work = replace(BASE_WORK, rights=rights)
        c = check(work, host, "worker identity")
        assert c.ok
        assert "owner" in c.detail

    @pytest.mark.parametrize("rights", [0x700, 0x750, 0x755])
    def test_private_worker_of_another_user(self, rights: int) -> None:
        host = replace(BASE_HOST, owner="bob", owner_level=L.STANDARD_USER, owner_group="g1-uid")
        work = replace(BASE_WORK, rights=rights)
        c = check(work, host, "worker identity")
        assert not c.ok
        assert "another user" in c.detail

    @pytest.mark.parametrize("rights", [0x700, 0x750, 0x755])
    def test_group_worker_runs_its_groups_works_whatever_their_rights(self, rights: int) -> None:
        host = replace(BASE_HOST, owner="gadm", owner_level=L.ADVANCED_USER, owner_group="g1-uid")
        assert matches(replace(BASE_WORK, rights=rights), host)
        c = check(replace(BASE_WORK, rights=rights, owner_group="g2-uid"), host, "worker identity")
        assert not c.ok
        assert c.detail == "group worker of another group"


class TestRequirements:
    def test_requirement_true(self) -> None:
        work = replace(BASE_WORK, requirements='host.memory >= 4096 && host.os == "linux"')
        c = check(work, BASE_HOST, "requirements")
        assert c.ok
        assert "true" in c.detail

    def test_requirement_false(self) -> None:
        work = replace(BASE_WORK, requirements="host.memory >= 65536")
        c = check(work, BASE_HOST, "requirements")
        assert not c.ok
        assert "false" in c.detail
        assert only_failure(work, BASE_HOST) == "requirements"

    def test_requirement_sees_the_host_description(self) -> None:
        work = replace(BASE_WORK, requirements='host.packages.python.startsWith("3.11") && host.name == "node1"')
        assert matches(work, BASE_HOST)
        assert not matches(work, replace(BASE_HOST, name="node2"))

    def test_broken_requirement_never_matches(self) -> None:
        assert not matches(replace(BASE_WORK, requirements="host.nosuch > 1"), BASE_HOST)
        assert not matches(replace(BASE_WORK, requirements="host.memory >"), BASE_HOST)


def test_profile_key_identifies_a_match_class() -> None:
    assert BASE_WORK.key() == replace(BASE_WORK).key()
    assert BASE_WORK.key() != replace(BASE_WORK, min_memory=1).key()
    hash(BASE_WORK.key())


class TestSummarize:
    def test_counts(self) -> None:
        work = replace(BASE_WORK, min_memory=4096)
        hosts = [
            BASE_HOST,  # fits
            replace(BASE_HOST, uid="h2", memory=8192),  # fits
            replace(BASE_HOST, uid="h3", memory=1024),  # too small
            replace(BASE_HOST, uid="h4", os="win64"),  # no binary
            replace(BASE_HOST, uid="h5", os="win64", memory=512),  # both
        ]
        rows = {name: (ok, total, sample) for name, ok, total, sample in summarize(work, hosts)}
        assert rows["binary"][:2] == (3, 5)
        assert "win64/x86_64" in rows["binary"][2]
        assert rows["memory"][:2] == (3, 5)
        assert "1024" in rows["memory"][2]  # the first failure's detail
        assert rows["worker identity"] == (5, 5, "")
        assert rows["all"] == (2, 5, "")

    def test_all_row_is_last_and_orders_are_stable(self) -> None:
        rows = summarize(BASE_WORK, [BASE_HOST])
        assert [r[0] for r in rows] == ["binary", "worker identity", "all"]
        assert rows[-1] == ("all", 1, 1, "")

    def test_no_hosts(self) -> None:
        assert summarize(BASE_WORK, []) == [("all", 0, 0, "")]

    def test_accepts_any_iterable(self) -> None:
        rows = summarize(BASE_WORK, (h for h in [BASE_HOST, replace(BASE_HOST, os="win64")]))
        assert rows[-1] == ("all", 1, 2, "")
