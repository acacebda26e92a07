"""Access rights and the one decision function ``can(actor, action, object)`` (DESIGN §6).

Rights are XWHEP's hexadecimal nibbles: 0x700 private, 0x750 group, 0x755 public; owner/group/other ×
read(4)/write(2)/execute(1), plus the sticky bit 0x1000 (readable by virtual workers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from xwhep.core.model import UsageLevel

PRIVATE = 0x700
GROUP = 0x750
PUBLIC = 0x755
STICKY = 0x1000
_MAX = 0x1777

_BITS = {"r": 4, "w": 2, "x": 1}
_SHIFT = {"u": 8, "g": 4, "o": 0}
_SYMBOLIC = re.compile(r"^([ugoa]*)([+\-=])([rwxt]*)$")


class BadRights(ValueError):
    """An access-rights string that is neither hex, octal-digits nor symbolic."""


class Action(StrEnum):
    LIST = "list"
    READ = "read"
    WRITE = "write"  # modify
    EXECUTE = "execute"  # submit against an app, run a work, open a stream to it
    DELETE = "delete"
    CHMOD = "chmod"


def format_rights(value: int) -> str:
    """``0x755`` style text."""
    return f"0x{value:x}"


def parse_rights(text: str, current: int = PRIVATE) -> int:
    """Parse ``0x755``, ``755`` (digits as people mean them, not decimal), ``1755``, or ``go-rwx,o+r``.

    Symbolic forms apply to ``current``.
    """
    t = text.strip().lower()
    if not t:
        raise BadRights("empty access rights")
    if t.startswith("0x"):
        try:
            value = int(t[2:], 16)
        except ValueError:
            raise BadRights(f"bad hexadecimal access rights {text!r}") from None
        _check_nibbles(value, text)
        return value
    if t.isdigit():
        # '0755' → '755', '0700' → '700'; '0000' must stay a number, not become ''
        digits = (t.lstrip("0") or "0") if len(t) > 3 else t
        if len(digits) > 4 or any(c not in "01234567" for c in digits):
            raise BadRights(f"bad access rights {text!r}: digits must be 0-7, like 755 or 1755")
        value = int(digits, 16)
        _check_nibbles(value, text)
        return value
    value = current
    for clause in t.split(","):
        m = _SYMBOLIC.match(clause)
        if not m:
            raise BadRights(f"bad symbolic access rights {clause!r}: expected like go-rwx or o+r")
        who, op, perms = m.groups()
        shifts = [_SHIFT[c] for c in (who or "a").replace("a", "ugo")]
        mask = 0
        for s in shifts:
            for p in perms:
                if p != "t":
                    mask |= _BITS[p] << s
        sticky = STICKY if "t" in perms else 0
        if op == "+":
            value |= mask | sticky
        elif op == "-":
            value &= ~(mask | sticky)
        else:
            for s in shifts:
                value &= ~(0x7 << s)
            value |= mask | sticky
    return value


def _check_nibbles(value: int, text: str) -> None:
    if value > _MAX or value < 0 or any(((value >> s) & 0xF) > 7 for s in (0, 4, 8)) or (value >> 12) > 1:
        raise BadRights(f"bad access rights {text!r}: each of owner/group/other is 0-7, sticky is 0x1000")


@dataclass(frozen=True)
class Actor:
    """Who asks: a user uid, its usage level and its user group."""

    uid: str
    level: UsageLevel
    usergroup: str | None = None


@dataclass(frozen=True)
class Owned:
    """What is asked about: any object's owner, the owner's group and its rights."""

    owner: str
    rights: int
    owner_group: str | None = None


def _bits_for(actor: Actor, obj: Owned) -> int:
    if actor.uid == obj.owner:
        return (obj.rights >> 8) & 0x7
    if actor.usergroup is not None and actor.usergroup == obj.owner_group:
        return (obj.rights >> 4) & 0x7
    return obj.rights & 0x7


def can(actor: Actor, action: Action, obj: Owned) -> bool:
    """Decide whether ``actor`` may do ``action`` on ``obj``.

    - the administrator may do anything;
    - a group administrator may do anything on objects of its group's members;
    - the owner may always read, write, delete and chmod; it executes per the owner bits;
    - workers act only through their tasks (checked by the caller): nothing here, but a virtual worker may read
      (and run) objects with the sticky bit;
    - levels below WORKER_USER (XWHEP's fine-grained list/get levels) get nothing from rights alone;
    - everybody else gets the group bits (same group as the owner) or the other bits.
    """
    if actor.level >= UsageLevel.SUPER_USER:
        return True
    if actor.level == UsageLevel.ADVANCED_USER and actor.usergroup and actor.usergroup == obj.owner_group:
        return True
    if actor.level in (UsageLevel.WORKER_USER, UsageLevel.VWORKER_USER):
        return (actor.level == UsageLevel.VWORKER_USER and bool(obj.rights & STICKY)
                and action in (Action.READ, Action.LIST, Action.EXECUTE))
    if actor.level < UsageLevel.WORKER_USER:
        return False
    if actor.uid == obj.owner:
        if action == Action.EXECUTE:
            return bool((obj.rights >> 8) & 0x1)
        return True
    bits = _bits_for(actor, obj)
    if action in (Action.READ, Action.LIST):
        return bool(bits & 0x4)
    if action == Action.EXECUTE:
        return bool(bits & 0x1) and bool(bits & 0x4)
    if action in (Action.WRITE,):
        return bool(bits & 0x2)
    return False  # delete and chmod: owner, group admin or admin only


def clamp_to(rights: int, ceiling: int) -> int:
    """A work is never more open than its app: keep only the bits the app grants (owner bits kept)."""
    return (rights & (ceiling | 0x700)) | (rights & STICKY & ceiling)
