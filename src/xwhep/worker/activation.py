"""Activation policies: when the worker may run jobs on this host.

Every policy answers ``is_active(now) -> (active, reason)``; the reason is meant for logs and the worker's
status. :func:`parse_policy` builds the policy of a worker configuration section.

Time windows use XtremWeb-HEP's cron-like syntax, comma-separated clauses of ``DAYS HOURS``::

    "Mon-Fri 18-8, Sat-Sun *"

* ``DAYS``: ``*``, a day (``Mon``, ``monday``…), or a range ``Fri-Mon`` (wrapping over the week end allowed);
  several can be joined with ``+`` (``Mon+Wed+Fri``);
* ``HOURS``: ``*`` (all day), an hour ``9`` (09:00–09:59), or a range ``8-18`` = 08:00–17:59 (end excluded,
  ``24`` allowed as an end); ``18-8`` wraps past midnight = 18:00–07:59. Several can follow each other
  (``Mon 8-12 14-18``). Omitted hours mean all day.

Like cron, the day and the hour are checked independently on the current date: ``Mon-Fri 18-8`` is active on
Monday 03:00 and on Friday 23:00, not on Saturday 03:00 (add ``Sat 0-8`` for that).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import psutil

__all__ = [
    "AllOf",
    "Always",
    "CpuLoad",
    "PauseFile",
    "Policy",
    "TimeWindows",
    "UserIdle",
    "detect_idle_seconds",
    "idle_from_times",
    "other_load_percent",
    "parse_policy",
]


@runtime_checkable
class Policy(Protocol):
    """An activation policy."""

    def is_active(self, now: datetime | None = None) -> tuple[bool, str]:
        """Whether the worker may run jobs at ``now`` (local time; default: now), and why."""
        ...


class Always:
    """Always active."""

    def is_active(self, now: datetime | None = None) -> tuple[bool, str]:
        """Always ``(True, ...)``."""
        return True, "always active"

    def __repr__(self) -> str:
        return "Always()"


# --------------------------------------------------------------------------------------------- time windows
_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_DAY_NAMES = {d: i for i, d in enumerate(_DAYS)} | {
    n: i for i, n in enumerate(["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"])
}


def _day(tok: str, clause: str) -> int:
    try:
        return _DAY_NAMES[tok.lower()]
    except KeyError:
        raise ValueError(f"time windows: unknown day {tok!r} in {clause!r} (use Mon..Sun)") from None


def _parse_days(tok: str, clause: str) -> frozenset[int]:
    if tok == "*":
        return frozenset(range(7))
    days: set[int] = set()
    for part in tok.split("+"):
        if "-" in part:
            a, _, b = part.partition("-")
            start, end = _day(a, clause), _day(b, clause)
            i = start
            days.add(i)
            while i != end:  # walks over Sunday→Monday for ranges such as Fri-Mon
                i = (i + 1) % 7
                days.add(i)
        else:
            days.add(_day(part, clause))
    return frozenset(days)


def _hour(tok: str, clause: str, allow_24: bool) -> int:
    if not tok.isdigit():
        raise ValueError(f"time windows: bad hour {tok!r} in {clause!r} (use 0-23)")
    h = int(tok)
    if h > 23 and not (allow_24 and h == 24):
        raise ValueError(f"time windows: hour {h} out of range in {clause!r}")
    return h


def _parse_hours(tok: str, clause: str) -> frozenset[int]:
    if tok == "*":
        return frozenset(range(24))
    if "-" not in tok:
        return frozenset({_hour(tok, clause, allow_24=False)})
    a, _, b = tok.partition("-")
    start, end = _hour(a, clause, allow_24=False), _hour(b, clause, allow_24=True)
    if start == end:
        raise ValueError(f"time windows: empty or ambiguous hour range {tok!r} in {clause!r} (use *)")
    if start < end:
        return frozenset(range(start, end))
    return frozenset(range(start, 24)) | frozenset(range(0, end))


@dataclass(frozen=True)
class _Clause:
    text: str
    days: frozenset[int]
    hours: frozenset[int]


class TimeWindows:
    """Active inside the windows of ``spec`` (see the module docstring for the syntax).

    Raises :class:`ValueError` naming the faulty part on bad syntax.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.clauses: list[_Clause] = []
        if not spec or not spec.strip():
            raise ValueError("time windows: empty specification")
        for raw in spec.split(","):
            clause = raw.strip()
            if not clause:
                raise ValueError(f"time windows: empty clause in {spec!r}")
            toks = clause.split()
            days = _parse_days(toks[0], clause)
            hours: frozenset[int] = frozenset()
            for t in toks[1:] or ["*"]:
                hours |= _parse_hours(t, clause)
            self.clauses.append(_Clause(clause, days, hours))

    def is_active(self, now: datetime | None = None) -> tuple[bool, str]:
        """Active if some clause contains ``now``'s weekday and hour."""
        now = now or datetime.now()
        for c in self.clauses:
            if now.weekday() in c.days and now.hour in c.hours:
                return True, f"inside time window {c.text!r}"
        return False, f"{_DAYS[now.weekday()].title()} {now:%H:%M} is outside time windows {self.spec!r}"

    def __repr__(self) -> str:
        return f"TimeWindows({self.spec!r})"


# --------------------------------------------------------------------------------------------- CPU load
def other_load_percent(busy_delta: float, own_delta: float, elapsed: float, ncpu: int) -> float:
    """CPU load of other processes, in percent of the whole machine, over one interval.

    ``busy_delta`` is the machine's busy CPU seconds over the interval (all CPUs), ``own_delta`` the CPU seconds
    of the worker's own process tree; both are turned into percentages clamped to 0–100 before subtracting.
    """
    if elapsed <= 0 or ncpu <= 0:
        raise ValueError("elapsed and ncpu must be positive")
    return max(0.0, _pct(busy_delta, elapsed, ncpu) - _pct(own_delta, elapsed, ncpu))


def _pct(cpu_seconds: float, elapsed: float, ncpu: int) -> float:
    # Clamped: the kernel's per-CPU and per-process accounting are sampled at slightly different moments.
    return min(100.0, max(0.0, cpu_seconds / (elapsed * ncpu) * 100.0))


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    # Not busy: idle, iowait, and steal (time the hypervisor gave to other VMs — no process here used it).
    # guest/guest_nice are already counted inside user/nice on Linux.
    not_busy = t.idle + sum(getattr(t, f, 0.0) for f in ("iowait", "steal", "guest", "guest_nice"))
    return float(sum(t) - not_busy)


def _tree_seconds(root: psutil.Process) -> float:
    total = 0.0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = [root]
    for p in procs:
        try:
            ct = p.cpu_times()
        except psutil.Error:
            continue
        # children_* holds the reaped children, so jobs that ended during the interval still count as ours.
        total += ct.user + ct.system + (ct.children_user + ct.children_system if p is root else 0.0)
    return total


@dataclass(frozen=True)
class CpuSample:
    """One measurement of :class:`CpuLoad`, in percent of the whole machine."""

    total: float
    own: float
    other: float


class CpuLoad:
    """Active while the CPU load of *other* processes (total minus the worker's own tree, jobs included) is
    below ``threshold`` percent of the machine.

    Each call compares with the previous sample when it is at least ``interval`` seconds old, so a worker polling
    regularly never blocks; otherwise (first call) it measures over ``interval`` seconds.
    """

    def __init__(self, threshold: float, interval: float = 1.0, root_pid: int | None = None) -> None:
        if not 0 < threshold <= 100:
            raise ValueError("cpu load threshold must be in (0, 100]")
        self.threshold = threshold
        self.interval = interval
        self._root = psutil.Process(root_pid or os.getpid())
        self._ncpu = psutil.cpu_count() or 1
        self._last: tuple[float, float, float] | None = None

    def _snap(self) -> tuple[float, float, float]:
        return time.monotonic(), _busy_seconds(), _tree_seconds(self._root)

    def measure(self) -> CpuSample:
        """Load since the last sample (waiting until ``interval`` has passed if needed)."""
        if self._last is None:
            self._last = self._snap()
        wait = self._last[0] + self.interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # a measurement needs an interval; there is nothing to wait on instead
        cur = self._snap()
        t0, busy0, own0 = self._last
        self._last = cur
        elapsed = cur[0] - t0
        total = _pct(cur[1] - busy0, elapsed, self._ncpu)
        own = _pct(cur[2] - own0, elapsed, self._ncpu)
        return CpuSample(total, own, other_load_percent(cur[1] - busy0, cur[2] - own0, elapsed, self._ncpu))

    def is_active(self, now: datetime | None = None) -> tuple[bool, str]:
        """Active when other processes use less than ``threshold`` percent of the CPUs."""
        s = self.measure()
        if s.other < self.threshold:
            return True, f"CPU load of other processes {s.other:.0f}% < {self.threshold:g}%"
        return False, f"CPU load of other processes {s.other:.0f}% >= {self.threshold:g}%"

    def __repr__(self) -> str:
        return f"CpuLoad({self.threshold!r})"


# --------------------------------------------------------------------------------------------- user idle
def idle_from_times(times: Iterable[float], now: float) -> float | None:
    """Idle seconds given the last-input timestamps of some devices (``None`` if there are none)."""
    ts = list(times)
    if not ts:
        return None
    return max(0.0, now - max(ts))


def _xprintidle() -> float | None:
    if not os.environ.get("DISPLAY") or not shutil.which("xprintidle"):
        return None
    try:
        out = subprocess.run(["xprintidle"], capture_output=True, text=True, timeout=2, check=True).stdout
        return int(out.strip()) / 1000.0
    except (subprocess.SubprocessError, ValueError, OSError):
        return None


def _device_times() -> list[float]:
    # Input devices and the terminals of logged-in users get their atime updated by keyboard/mouse activity.
    times = []
    for p in Path("/dev/input").glob("event*"):
        try:
            times.append(p.stat().st_atime)
        except OSError:
            pass
    try:
        users = psutil.users()
    except (OSError, psutil.Error):
        users = []
    for u in users:
        if not u.terminal:
            continue
        try:
            times.append(Path("/dev", u.terminal).stat().st_atime)
        except OSError:
            pass
    return times


def detect_idle_seconds() -> tuple[float | None, str]:
    """Seconds since the user's last input and how it was found; ``(None, why)`` when not detectable."""
    x = _xprintidle()
    if x is not None:
        return x, "X11 (xprintidle)"
    idle = idle_from_times(_device_times(), time.time())
    if idle is not None:
        return idle, "input devices / terminals"
    return None, "user idle time not detectable on this host (no X11 xprintidle, no input devices or terminals)"


class UserIdle:
    """Active once the user has been idle for ``min_idle_s`` seconds.

    Where idleness cannot be detected (a server without a console) the policy is active and says so.
    ``detector`` can replace :func:`detect_idle_seconds` (e.g. for a platform-specific probe).
    """

    def __init__(self, min_idle_s: float,
                 detector: Callable[[], tuple[float | None, str]] = detect_idle_seconds) -> None:
        if min_idle_s < 0:
            raise ValueError("min idle time must be >= 0")
        self.min_idle_s = min_idle_s
        self.detector = detector

    def is_active(self, now: datetime | None = None) -> tuple[bool, str]:
        """Active when the user is idle long enough (or when it cannot be known)."""
        idle, how = self.detector()
        if idle is None:
            return True, f"{how}; treated as idle"
        if idle >= self.min_idle_s:
            return True, f"user idle for {idle:.0f} s >= {self.min_idle_s:g} s ({how})"
        return False, f"user active {idle:.0f} s ago < {self.min_idle_s:g} s ({how})"

    def __repr__(self) -> str:
        return f"UserIdle({self.min_idle_s!r})"


# --------------------------------------------------------------------------------------------- combination
class AllOf:
    """Active when every policy is; stops at the first inactive one (later ones may be costly to measure)."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self.policies = list(policies)

    def is_active(self, now: datetime | None = None) -> tuple[bool, str]:
        """``(True, all reasons)`` or ``(False, the first refusing policy's reason)``."""
        now = now or datetime.now()
        reasons = []
        for p in self.policies:
            ok, why = p.is_active(now)
            if not ok:
                return False, why
            reasons.append(why)
        return True, "; ".join(reasons) or "always active"

    def __repr__(self) -> str:
        return f"AllOf({self.policies!r})"


_KEYS = {"policy", "time_windows", "cpu_load_max", "idle_min_s", "cpu_interval_s", "pause_file"}


class PauseFile:
    """The volunteer's own switch: inactive while ``path`` exists (``touch`` it to pause, remove it to resume)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()

    def is_active(self, now: datetime | None = None) -> tuple[bool, str]:
        if self.path.exists():
            return False, f"paused by {self.path}"
        return True, f"no pause file {self.path}"


def parse_policy(config: dict[str, Any]) -> Policy:
    """Build the policy of a worker configuration section.

    ``{}`` or ``{"policy": "always"}`` → :class:`Always`; otherwise any of ``time_windows`` (str),
    ``cpu_load_max`` (percent), ``idle_min_s`` (seconds) — with ``cpu_interval_s`` for the CPU measurement —
    combined with :class:`AllOf`. Unknown keys and bad values raise :class:`ValueError`.
    """
    unknown = set(config) - _KEYS
    if unknown:
        raise ValueError(f"activation: unknown setting(s) {', '.join(sorted(unknown))}")
    policy = config.get("policy")
    rest = {k for k in config if k != "policy"}
    if policy is not None:
        if policy != "always":
            raise ValueError(f"activation: unknown policy {policy!r} (use 'always' or the individual settings)")
        if rest:
            raise ValueError(f"activation: 'policy: always' cannot be combined with {', '.join(sorted(rest))}")
        return Always()
    parts: list[Policy] = []
    if "time_windows" in config:
        tw = config["time_windows"]
        if not isinstance(tw, str):
            raise ValueError("activation: time_windows must be a string")
        parts.append(TimeWindows(tw))
    if "cpu_load_max" in config:
        v = config["cpu_load_max"]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError("activation: cpu_load_max must be a number (percent)")
        interval = config.get("cpu_interval_s", 1.0)
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ValueError("activation: cpu_interval_s must be a positive number")
        parts.append(CpuLoad(float(v), float(interval)))
    elif "cpu_interval_s" in config:
        raise ValueError("activation: cpu_interval_s needs cpu_load_max")
    if "idle_min_s" in config:
        v = config["idle_min_s"]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError("activation: idle_min_s must be a number (seconds)")
        parts.append(UserIdle(float(v)))
    if "pause_file" in config:
        v = config["pause_file"]
        if not isinstance(v, str) or not v:
            raise ValueError("activation: pause_file must be a path")
        parts.append(PauseFile(Path(v)))
    if not parts:
        return Always()
    return parts[0] if len(parts) == 1 else AllOf(parts)

