"""``xw://host/uid`` URIs and bare uids."""

from __future__ import annotations

import uuid

import pytest

from xwhep.core.uri import BadUri, is_uid, looks_like_ref, make_uri, new_uid, to_uid

UID = "0b6f4f9e-2d4a-4c1e-9a57-3f3d2b1c0a99"


@pytest.mark.parametrize(
    "ref",
    [
        UID,
        UID.upper(),
        f"  {UID}  ",
        f"xw://host/{UID}",
        f"xw://xw.example.org/{UID}",
        f"xw://host:4443/{UID}",
        f"xw://127.0.0.1:4443/{UID}",
        f"xw://[::1]:4443/{UID}",
        f"xw://host/{UID}/",
        f"xw://host:4443/{UID.upper()}/",
    ],
)
def test_to_uid(ref: str) -> None:
    assert to_uid(ref) == UID


@pytest.mark.parametrize(
    "ref",
    [
        "xw://host/notauuid",
        f"http://x/{UID}",
        f"https://host/{UID}",
        "",
        "   ",
        f"xw:///{UID}",
        f"xw://host/{UID}//",
        f"xw://host/dir/{UID}",
        f"xw://host/{UID}?x=1",
        f"xw://host/{UID}#frag",
        f"xw://ho st/{UID}",
        "xw://host/",
        "xw://host",
        UID[:-1],
        UID.replace("-", ""),  # uuid.UUID accepts it; we only accept the canonical form
        "{" + UID + "}",
        f"urn:uuid:{UID}",
        f"{UID}x",
    ],
)
def test_malformed(ref: str) -> None:
    with pytest.raises(BadUri):
        to_uid(ref)
    assert not looks_like_ref(ref)


def test_message_names_the_input() -> None:
    with pytest.raises(BadUri, match="notauuid"):
        to_uid("xw://host/notauuid")


def test_bad_uri_is_a_value_error() -> None:
    assert issubclass(BadUri, ValueError)


def test_is_uid() -> None:
    assert is_uid(UID)
    assert is_uid(UID.upper())  # case does not matter; to_uid lowercases
    assert not is_uid(UID.replace("-", ""))
    assert not is_uid("nope")
    assert not is_uid("")


def test_new_uid_is_a_fresh_time_ordered_v7() -> None:
    uids = [new_uid() for _ in range(1000)]
    assert len(set(uids)) == 1000
    assert all(is_uid(u) and uuid.UUID(u).version == 7 for u in uids)
    # time-ordered: the 48-bit millisecond prefix never goes back
    stamps = [int(u.replace("-", "")[:12], 16) for u in uids]
    assert stamps == sorted(stamps)


@pytest.mark.parametrize("host", ["host", "host:4443", "10.0.0.1:4443"])
def test_make_uri_round_trip(host: str) -> None:
    uri = make_uri(host, UID)
    assert uri == f"xw://{host}/{UID}"
    assert to_uid(uri) == UID
    assert looks_like_ref(uri)
