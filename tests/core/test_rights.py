"""Access rights: parsing every accepted spelling, and the one decision function ``can``."""

from __future__ import annotations

import pytest

from xwhep.core.model import UsageLevel
from xwhep.core.rights import (
    GROUP,
    PRIVATE,
    PUBLIC,
    STICKY,
    Action,
    Actor,
    BadRights,
    Owned,
    can,
    clamp_to,
    format_rights,
    parse_rights,
)

L = UsageLevel
A = Action


class TestParse:
    @pytest.mark.parametrize(
        ("text", "value"),
        [
            ("0x755", 0x755),
            ("0X755", 0x755),
            ("  0x750 ", 0x750),
            ("0x1700", 0x1700),
            ("0x0", 0),
            ("755", 0x755),  # digits as people mean them: not decimal 755, not octal 0o755
            ("0755", 0x755),
            ("1755", 0x1755),  # sticky
            ("700", 0x700),
            ("0700", 0x700),
            ("750", 0x750),
            ("000", 0),
            ("0000", 0),
            ("0", 0),
        ],
    )
    def test_numeric(self, text: str, value: int) -> None:
        assert parse_rights(text) == value

    def test_digits_are_the_same_as_hex(self) -> None:
        assert parse_rights("755") == parse_rights("0x755") == PUBLIC
        assert parse_rights("755") != 755
        assert parse_rights("755") != 0o755

    def test_sticky_digits(self) -> None:
        value = parse_rights("1755")
        assert value & STICKY
        assert value & ~STICKY == PUBLIC

    @pytest.mark.parametrize(
        ("text", "current", "value"),
        [
            ("go-rwx", 0x755, 0x700),
            ("o+r", 0x750, 0x754),
            ("u=rwx,g=rx,o=", 0x777, 0x750),
            ("u=rwx,g=rx,o=", 0x000, 0x750),
            ("a+x", 0x600, 0x711),
            ("+x", 0x600, 0x711),  # no "who" means all, as chmod
            ("a+x", 0x755, 0x755),
            ("+t", 0x700, 0x1700),
            ("o+t", 0x755, 0x1755),
            ("-t", 0x1755, 0x755),
            ("g+w", 0x750, 0x770),
            ("a-w", 0x777, 0x555),
            ("go=r", 0x777, 0x744),
            ("ug+rwx,o-rwx", 0x005, 0x770),
        ],
    )
    def test_symbolic(self, text: str, current: int, value: int) -> None:
        assert parse_rights(text, current) == value

    def test_symbolic_default_base_is_private(self) -> None:
        assert parse_rights("g+rx") == PRIVATE | 0x050

    def test_equal_keeps_sticky_unless_named(self) -> None:
        assert parse_rights("o=", 0x1755) == 0x1750

    @pytest.mark.parametrize(
        "text",
        ["999", "0x8ff", "0x800", "0x7f0", "0x2755", "0x10000", "0x", "0x-1", "0xzz", "abc", "", "   ", "u+q",
         "8", "7558", "12755", "2755", "q+r", "u+r,", "u+r;o+r", "0o755", "-0x755", "७५५"],
    )
    def test_bad(self, text: str) -> None:
        with pytest.raises(BadRights):
            parse_rights(text)

    def test_bad_message_quotes_the_input(self) -> None:
        with pytest.raises(BadRights, match="999"):
            parse_rights("999")
        with pytest.raises(BadRights, match="u\\+q"):
            parse_rights("u+q")

    def test_bad_rights_is_a_value_error(self) -> None:
        assert issubclass(BadRights, ValueError)

    @pytest.mark.parametrize("value", [0, 0x700, 0x750, 0x755, 0x1755, 0x777])
    def test_format_round_trip(self, value: int) -> None:
        assert parse_rights(format_rights(value)) == value

    def test_format(self) -> None:
        assert format_rights(0x755) == "0x755"
        assert format_rights(0x1700) == "0x1700"


# --- can() -------------------------------------------------------------------------------------------------------

OWNER = Actor("alice", L.STANDARD_USER, "g1")
MEMBER = Actor("bob", L.STANDARD_USER, "g1")
OTHER = Actor("carol", L.STANDARD_USER, "g2")
ADMIN = Actor("root", L.SUPER_USER)
GROUP_ADMIN = Actor("gadm", L.ADVANCED_USER, "g1")
OTHER_GROUP_ADMIN = Actor("hadm", L.ADVANCED_USER, "g2")
WORKER = Actor("w", L.WORKER_USER)
VWORKER = Actor("vw", L.VWORKER_USER)
ACTORS = {
    "owner": OWNER,
    "member": MEMBER,
    "other": OTHER,
    "admin": ADMIN,
    "groupadmin": GROUP_ADMIN,
    "worker": WORKER,
    "vworker": VWORKER,
}

# Letters: r read, w write, x execute, d delete, c chmod. "" is "nothing".
ALL = "rwxdc"
EXPECTED: dict[int, dict[str, str]] = {
    0x700: {"owner": ALL, "member": "", "other": "", "admin": ALL, "groupadmin": ALL, "worker": "", "vworker": ""},
    0x750: {"owner": ALL, "member": "rx", "other": "", "admin": ALL, "groupadmin": ALL, "worker": "",
            "vworker": ""},
    0x755: {"owner": ALL, "member": "rx", "other": "rx", "admin": ALL, "groupadmin": ALL, "worker": "",
            "vworker": ""},
    0x1700: {"owner": ALL, "member": "", "other": "", "admin": ALL, "groupadmin": ALL, "worker": "",
             "vworker": "rx"},
}
LETTER = {A.READ: "r", A.WRITE: "w", A.EXECUTE: "x", A.DELETE: "d", A.CHMOD: "c"}
CASES = [
    (who, action, rights, LETTER[action] in EXPECTED[rights][who])
    for rights in EXPECTED
    for who in ACTORS
    for action in LETTER
]


@pytest.mark.parametrize(
    ("who", "action", "rights", "allowed"),
    CASES,
    ids=[f"{w}-{a.value}-{r:#x}-{'yes' if ok else 'no'}" for w, a, r, ok in CASES],
)
def test_can_table(who: str, action: Action, rights: int, allowed: bool) -> None:
    obj = Owned(owner="alice", rights=rights, owner_group="g1")
    assert can(ACTORS[who], action, obj) is allowed


@pytest.mark.parametrize("rights", list(EXPECTED))
@pytest.mark.parametrize("who", list(ACTORS))
def test_list_follows_read(who: str, rights: int) -> None:
    obj = Owned(owner="alice", rights=rights, owner_group="g1")
    assert can(ACTORS[who], A.LIST, obj) == can(ACTORS[who], A.READ, obj)


class TestCanEdges:
    def test_group_admin_of_another_group_is_just_other(self) -> None:
        for rights in EXPECTED:
            obj = Owned("alice", rights, "g1")
            for action in LETTER:
                assert can(OTHER_GROUP_ADMIN, action, obj) == can(OTHER, action, obj)

    def test_no_group_is_not_a_shared_group(self) -> None:
        loner = Actor("dave", L.STANDARD_USER, None)
        obj = Owned("erin", 0x750, None)
        assert not can(loner, A.READ, obj)
        assert not can(Actor("gadm", L.ADVANCED_USER, None), A.DELETE, obj)

    def test_owner_execute_follows_owner_bit(self) -> None:
        obj = Owned("alice", 0x600, "g1")
        assert not can(OWNER, A.EXECUTE, obj)
        assert can(OWNER, A.READ, obj)
        assert can(OWNER, A.CHMOD, obj)

    def test_write_bit_grants_write_but_never_delete_or_chmod(self) -> None:
        obj = Owned("alice", 0x777, "g1")
        for actor in (MEMBER, OTHER):
            assert can(actor, A.WRITE, obj)
            assert not can(actor, A.DELETE, obj)
            assert not can(actor, A.CHMOD, obj)

    def test_execute_needs_read_too(self) -> None:
        obj = Owned("alice", 0x711, "g1")
        for actor in (MEMBER, OTHER, WORKER, VWORKER):
            assert not can(actor, A.EXECUTE, obj), actor

    def test_workers_never_modify_even_public_writable(self) -> None:
        obj = Owned("alice", 0x1777, "g1")
        for worker in (WORKER, VWORKER):
            for action in (A.WRITE, A.DELETE, A.CHMOD):
                assert not can(worker, action, obj)

    def test_plain_worker_ignores_sticky(self) -> None:
        assert not can(WORKER, A.READ, Owned("alice", 0x1700, "g1"))
        assert can(VWORKER, A.READ, Owned("alice", 0x1700, "g1"))

    def test_mandated_user_is_not_admin(self) -> None:
        mandated = Actor("m", L.MANDATED_USER, "g2")
        assert not can(mandated, A.READ, Owned("alice", PRIVATE, "g1"))


class TestClamp:
    @pytest.mark.parametrize(
        ("rights", "ceiling", "value"),
        [
            (PUBLIC, PRIVATE, PRIVATE),
            (PUBLIC, GROUP, GROUP),
            (GROUP, PUBLIC, GROUP),  # clamping never opens
            (PRIVATE, PUBLIC, PRIVATE),
            (0x777, PUBLIC, PUBLIC),
            (0x1755, PUBLIC, PUBLIC),  # sticky only if the app is sticky
            (0x1755, 0x1755, 0x1755),
            (0x1755, 0x1700, 0x1700),
            (PUBLIC, 0x1700, PRIVATE),
            (PUBLIC, 0x055, PUBLIC),  # owner bits are always kept
            (0x700, 0x000, 0x700),
        ],
    )
    def test_clamp(self, rights: int, ceiling: int, value: int) -> None:
        assert clamp_to(rights, ceiling) == value

    def test_clamp_is_never_more_open_than_either(self) -> None:
        for rights in range(0, 0x2000, 0x11):
            for ceiling in (PRIVATE, GROUP, PUBLIC, 0x1755, 0x1700):
                out = clamp_to(rights, ceiling)
                assert out & ~rights == 0
                assert out & ~(ceiling | 0x700) == 0
