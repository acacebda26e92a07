"""Activation policies: time windows (pure), CPU load (real processes), user idle, combination, config parsing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from xwhep.worker.activation import (
    AllOf,
    Always,
    CpuLoad,
    TimeWindows,
    UserIdle,
    detect_idle_seconds,
    idle_from_times,
    other_load_percent,
    parse_policy,
)

# 2024-01-01 is a Monday.
MON, TUE, FRI, SAT, SUN = 1, 2, 5, 6, 7


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2024, 1, day, hour, minute)


# --------------------------------------------------------------------------------------------- time windows
def test_window_excluding_a_date_is_inactive_including_is_active() -> None:
    tw = TimeWindows("Mon-Fri 9-17")
    ok, why = tw.is_active(at(TUE, 10, 30))
    assert ok and "Mon-Fri 9-17" in why
    ok, why = tw.is_active(at(TUE, 17, 0))  # end hour excluded
    assert not ok and "outside" in why and "Tue 17:00" in why
    assert tw.is_active(at(TUE, 16, 59))[0]
    assert not tw.is_active(at(SAT, 10))[0]


def test_hour_range_wrapping_past_midnight() -> None:
    tw = TimeWindows("Mon-Fri 18-8, Sat-Sun *")
    assert tw.is_active(at(TUE, 18))[0]
    assert tw.is_active(at(TUE, 23, 59))[0]
    assert tw.is_active(at(TUE, 0))[0]
    assert tw.is_active(at(TUE, 7, 59))[0]
    assert not tw.is_active(at(TUE, 8))[0]
    assert not tw.is_active(at(TUE, 12))[0]
    assert tw.is_active(at(SAT, 12))[0] and tw.is_active(at(SUN, 3))[0]


def test_day_range_wrapping_over_the_week_end() -> None:
    tw = TimeWindows("Fri-Mon 10-12")
    assert [tw.is_active(at(d, 11))[0] for d in range(1, 8)] == [True, False, False, False, True, True, True]


def test_days_and_hours_are_checked_like_cron() -> None:
    # Saturday 03:00 is the tail of Friday night, but Saturday is not a listed day.
    tw = TimeWindows("Mon-Fri 18-8")
    assert not tw.is_active(at(SAT, 3))[0]
    assert tw.is_active(at(MON, 3))[0]


def test_single_days_multiple_hours_and_full_names() -> None:
    tw = TimeWindows("monday 8-12 14-18, Wed+Fri 9, sun")
    assert tw.is_active(at(MON, 9))[0] and tw.is_active(at(MON, 15))[0]
    assert not tw.is_active(at(MON, 13))[0]
    assert tw.is_active(at(3, 9, 59))[0] and not tw.is_active(at(3, 10))[0]  # Wednesday, hour 9 only
    assert tw.is_active(at(SUN, 23))[0]
    assert TimeWindows("* 0-24").is_active(at(TUE, 23))[0]


@pytest.mark.parametrize("spec, msg", [
    ("", "empty"),
    ("Mon-Fri 18-8,", "empty clause"),
    ("Mun 8-9", "unknown day 'Mun'"),
    ("Mon 25", "hour 25 out of range"),
    ("Mon 8-8", "ambiguous hour range"),
    ("Mon eight", "bad hour 'eight'"),
    ("Mon-Xyz *", "unknown day 'Xyz'"),
    ("Mon 24-2", "hour 24 out of range"),
])
def test_bad_syntax_is_a_clear_value_error(spec: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        TimeWindows(spec)


# --------------------------------------------------------------------------------------------- CPU load
def test_other_load_arithmetic() -> None:
    # 2 CPUs for 1 s: 1.5 CPU-s busy of which 1.0 was ours → others used 25% of the machine.
    assert other_load_percent(1.5, 1.0, 1.0, 2) == pytest.approx(25.0)
    assert other_load_percent(0.5, 1.0, 1.0, 2) == 0.0  # accounting skew never goes negative
    assert other_load_percent(9.0, 0.0, 1.0, 2) == 100.0
    with pytest.raises(ValueError):
        other_load_percent(1, 0, 0, 2)


BURN = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 30: pass\n"


def test_cpu_load_of_our_own_tree_does_not_count() -> None:
    # A busy child of ours (as a running job would be) is subtracted from the machine's load. The machine may
    # be shared, so the check compares with what the burner really consumed rather than with a fixed figure.
    burner = subprocess.Popen([sys.executable, "-c", BURN])
    proc = psutil.Process(burner.pid)
    ncpu = psutil.cpu_count() or 1
    try:
        policy = CpuLoad(threshold=50, interval=0.6)
        policy.measure()  # the first sample spans the burner's start-up
        t0, c0 = time.monotonic(), sum(proc.cpu_times()[:2])
        s = policy.measure()
        t1, c1 = time.monotonic(), sum(proc.cpu_times()[:2])
    finally:
        burner.kill()
        burner.wait()
    burner_pct = (c1 - c0) / ((t1 - t0) * ncpu) * 100
    assert burner_pct > 5  # it did run
    assert s.own >= 0.8 * burner_pct
    assert s.other == pytest.approx(max(0.0, s.total - s.own), abs=0.01)


def test_cpu_load_of_other_processes_deactivates() -> None:
    # A burner that is not our descendant (double fork: reparented away) is "someone else's" load.
    r = subprocess.run(
        ["/bin/sh", "-c", f'{sys.executable} -c "$0" >/dev/null 2>&1 & echo $!', BURN],
        capture_output=True, text=True, check=True,
    )
    pid = int(r.stdout)
    other = psutil.Process(pid)
    try:
        assert other.ppid() != os.getpid()
        ncpu = psutil.cpu_count() or 1
        policy = CpuLoad(threshold=40 / ncpu, interval=0.6)
        policy.measure()
        ok, why = policy.is_active()
        assert not ok, why
        assert "CPU load of other processes" in why
    finally:
        os.kill(pid, signal.SIGKILL)


def test_cpu_load_threshold_validation() -> None:
    with pytest.raises(ValueError):
        CpuLoad(0)
    with pytest.raises(ValueError):
        CpuLoad(150)


# --------------------------------------------------------------------------------------------- user idle
def test_idle_from_device_times(tmp_path: Path) -> None:
    tty = tmp_path / "tty1"
    kbd = tmp_path / "event0"
    tty.touch()
    kbd.touch()
    os.utime(tty, (1000.0, 1000.0))
    os.utime(kbd, (1250.0, 1000.0))
    assert idle_from_times([tty.stat().st_atime, kbd.stat().st_atime], now=1300.0) == pytest.approx(50.0)
    assert idle_from_times([], now=1300.0) is None


def test_user_idle_policy_decisions() -> None:
    assert UserIdle(300, detector=lambda: (400.0, "test")).is_active()[0]
    ok, why = UserIdle(300, detector=lambda: (20.0, "test")).is_active()
    assert not ok and "20 s ago" in why
    ok, why = UserIdle(300, detector=lambda: (None, "user idle time not detectable here")).is_active()
    assert ok and "not detectable" in why


def test_real_idle_detection_answers_consistently() -> None:
    idle, how = detect_idle_seconds()
    if idle is None:
        assert "not detectable" in how
    else:
        assert idle >= 0 and how


# --------------------------------------------------------------------------------------------- combination & config
def test_all_of_needs_every_policy() -> None:
    night = TimeWindows("* 18-8")
    busy_user = UserIdle(300, detector=lambda: (5.0, "test"))
    assert AllOf([Always(), night]).is_active(at(TUE, 20))[0]
    ok, why = AllOf([night, busy_user]).is_active(at(TUE, 20))
    assert not ok and "user active" in why
    ok, why = AllOf([night, busy_user]).is_active(at(TUE, 12))
    assert not ok and "outside time windows" in why


def test_parse_policy() -> None:
    assert isinstance(parse_policy({"policy": "always"}), Always)
    assert isinstance(parse_policy({}), Always)
    tw = parse_policy({"time_windows": "Mon-Fri 18-8"})
    assert isinstance(tw, TimeWindows)
    combo = parse_policy({"time_windows": "Mon-Fri 18-8", "cpu_load_max": 50, "idle_min_s": 300})
    assert isinstance(combo, AllOf)
    kinds = [type(p) for p in combo.policies]
    assert kinds == [TimeWindows, CpuLoad, UserIdle]
    assert combo.policies[1].threshold == 50  # type: ignore[attr-defined]
    assert combo.policies[2].min_idle_s == 300  # type: ignore[attr-defined]


@pytest.mark.parametrize("config, msg", [
    ({"policy": "sometimes"}, "unknown policy"),
    ({"policy": "always", "idle_min_s": 3}, "cannot be combined"),
    ({"time_window": "Mon"}, "unknown setting"),
    ({"cpu_load_max": "high"}, "must be a number"),
    ({"time_windows": "Mon 99"}, "out of range"),
    ({"cpu_interval_s": 2}, "needs cpu_load_max"),
])
def test_parse_policy_errors(config: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        parse_policy(config)
