"""The job state graph (DESIGN §3): the one place that decides which work status may follow which.

Everything that changes a work's status asks :func:`transition` first and writes the event it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from xwhep.core.model import FINAL_WORK_STATUSES, WorkStatus

S = WorkStatus

#: Legal moves, with the reason each exists.
TRANSITIONS: dict[WorkStatus, frozenset[WorkStatus]] = {
    S.UNAVAILABLE: frozenset({S.PENDING, S.ERROR}),  # inputs arrived / an input failed
    S.PENDING: frozenset({S.RUNNING, S.ERROR}),  # claimed by a host / cancelled
    S.RUNNING: frozenset({
        S.DATAREQUEST,  # finished, result upload outstanding
        S.REPLICATING,  # finished with result, replicas outstanding
        S.COMPLETED,  # finished (with or without a result)
        S.ERROR,  # the worker could not run it
        S.FAILED,  # wall-clock limit exceeded
        S.ABORTED,  # worker deactivated, or told to stop
        S.LOST,  # alive timeout
    }),
    S.DATAREQUEST: frozenset({S.COMPLETED, S.REPLICATING, S.ERROR, S.LOST}),
    S.REPLICATING: frozenset({S.COMPLETED, S.ERROR}),
    S.ABORTED: frozenset({S.PENDING, S.ERROR}),
    S.LOST: frozenset({S.PENDING, S.ERROR}),
    S.COMPLETED: frozenset(),
    S.ERROR: frozenset(),
    S.FAILED: frozenset(),
}


class IllegalTransition(ValueError):
    """A status change the graph does not allow."""

    def __init__(self, current: WorkStatus, target: WorkStatus) -> None:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing (final status)"
        super().__init__(f"illegal transition {current} -> {target}; from {current} only: {allowed}")
        self.current = current
        self.target = target


@dataclass(frozen=True)
class Move:
    """One checked status change, ready to be written with its event."""

    source: WorkStatus
    target: WorkStatus
    reason: str = ""


def can_move(current: WorkStatus, target: WorkStatus) -> bool:
    """True when the graph allows ``current → target``."""
    return target in TRANSITIONS[current]


def transition(current: WorkStatus | str, target: WorkStatus | str, reason: str = "") -> Move:
    """Check one move; raise :class:`IllegalTransition` when the graph forbids it."""
    cur, tgt = WorkStatus(current), WorkStatus(target)
    if tgt not in TRANSITIONS[cur]:
        raise IllegalTransition(cur, tgt)
    return Move(cur, tgt, reason)


def is_final(status: WorkStatus | str) -> bool:
    """A final status never changes again (COMPLETED, ERROR, FAILED)."""
    return WorkStatus(status) in FINAL_WORK_STATUSES


def after_loss(retries: int, max_retries: int) -> tuple[WorkStatus, int, str]:
    """Where a LOST or failed-to-run attempt goes next: back to PENDING with retry+1, or ERROR past the limit.

    Returns (next status, new retry count, reason).
    """
    new_retries = retries + 1
    if new_retries > max_retries:
        return S.ERROR, new_retries, f"max retries exceeded ({max_retries})"
    return S.PENDING, new_retries, f"retry {new_retries} of {max_retries}"
