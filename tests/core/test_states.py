"""The job state graph (DESIGN §3), checked exhaustively over every pair of statuses."""

from __future__ import annotations

import itertools

import pytest

from xwhep.core.model import FINAL_WORK_STATUSES, WorkStatus
from xwhep.core.states import TRANSITIONS, IllegalTransition, Move, after_loss, can_move, is_final, transition

S = WorkStatus
ALL_PAIRS = list(itertools.product(WorkStatus, WorkStatus))


def test_graph_covers_every_status() -> None:
    # A status missing from the table would make transition() raise KeyError instead of IllegalTransition.
    assert set(TRANSITIONS) == set(WorkStatus)
    for targets in TRANSITIONS.values():
        assert targets <= set(WorkStatus)


@pytest.mark.parametrize(("source", "target"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_every_pair(source: WorkStatus, target: WorkStatus) -> None:
    allowed = target in TRANSITIONS[source]
    assert can_move(source, target) is allowed
    if allowed:
        move = transition(source, target, "why")
        assert move == Move(source, target, "why")
    else:
        with pytest.raises(IllegalTransition) as info:
            transition(source, target)
        assert info.value.current is source
        assert info.value.target is target


@pytest.mark.parametrize(
    ("source", "target"),
    [(S.PENDING, S.RUNNING), (S.RUNNING, S.COMPLETED), (S.COMPLETED, S.PENDING), (S.RUNNING, S.UNAVAILABLE)],
)
def test_transition_accepts_plain_strings(source: WorkStatus, target: WorkStatus) -> None:
    # The DB and the API hand statuses over as text.
    assert can_move(source, target) == (target in TRANSITIONS[source])
    if can_move(source, target):
        assert transition(str(source.value), str(target.value)).target is target
    else:
        with pytest.raises(IllegalTransition):
            transition(str(source.value), str(target.value))


def test_unknown_status_text_is_refused() -> None:
    with pytest.raises(ValueError):
        transition("PENDING", "SLEEPING")


def test_the_designed_paths_exist() -> None:
    happy = [S.UNAVAILABLE, S.PENDING, S.RUNNING, S.DATAREQUEST, S.REPLICATING, S.COMPLETED]
    for a, b in itertools.pairwise(happy):
        assert can_move(a, b), (a, b)
    for back in (S.ABORTED, S.LOST):
        assert can_move(S.RUNNING, back)
        assert can_move(back, S.PENDING)
        assert can_move(back, S.ERROR)
    assert can_move(S.RUNNING, S.FAILED)
    assert can_move(S.RUNNING, S.COMPLETED)


def test_illegal_message_names_both_statuses_and_the_allowed_ones() -> None:
    with pytest.raises(IllegalTransition) as info:
        transition(S.PENDING, S.COMPLETED)
    msg = str(info.value)
    assert "PENDING" in msg
    assert "COMPLETED" in msg
    for allowed in TRANSITIONS[S.PENDING]:
        assert allowed.value in msg
    # Only the allowed targets are listed after "only:"; a forbidden one must not appear there.
    assert "COMPLETED" not in msg.split("only:")[1]


def test_illegal_message_from_a_final_status_says_so() -> None:
    with pytest.raises(IllegalTransition) as info:
        transition(S.COMPLETED, S.PENDING)
    msg = str(info.value)
    assert "COMPLETED" in msg
    assert "PENDING" in msg
    assert "final" in msg


def test_illegal_transition_is_a_value_error() -> None:
    assert issubclass(IllegalTransition, ValueError)


@pytest.mark.parametrize("status", list(WorkStatus))
def test_final_statuses_have_no_exits(status: WorkStatus) -> None:
    assert is_final(status) == (status in FINAL_WORK_STATUSES)
    assert is_final(status.value) == is_final(status)
    if is_final(status):
        assert TRANSITIONS[status] == frozenset()
        for target in WorkStatus:
            assert not can_move(status, target)
    else:
        assert TRANSITIONS[status], f"{status} is not final yet has no way out"


def test_final_statuses_are_the_designed_ones() -> None:
    assert frozenset({S.COMPLETED, S.ERROR, S.FAILED}) == FINAL_WORK_STATUSES


def _reachable(start: WorkStatus) -> set[WorkStatus]:
    seen = {start}
    todo = [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("status", [s for s in WorkStatus if s not in FINAL_WORK_STATUSES])
def test_every_non_final_status_can_end(status: WorkStatus) -> None:
    assert _reachable(status) & FINAL_WORK_STATUSES


@pytest.mark.parametrize("status", [s for s in WorkStatus if s not in FINAL_WORK_STATUSES])
def test_every_non_final_status_can_be_cancelled(status: WorkStatus) -> None:
    # ERROR is the way out for a cancel or a broken input from anywhere that is not final.
    assert S.ERROR in _reachable(status)


def test_every_status_is_reachable_from_submission() -> None:
    assert _reachable(S.UNAVAILABLE) == set(WorkStatus)


def test_no_self_loops() -> None:
    for status, targets in TRANSITIONS.items():
        assert status not in targets


class TestAfterLoss:
    def test_first_loss_goes_back_to_pending(self) -> None:
        status, retries, reason = after_loss(0, 3)
        assert (status, retries) == (S.PENDING, 1)
        assert "1" in reason
        assert "3" in reason

    def test_counts_up_to_the_limit(self) -> None:
        retries = 0
        seen = []
        for _ in range(3):
            status, retries, _reason = after_loss(retries, 3)
            seen.append(status)
        assert seen == [S.PENDING] * 3
        assert retries == 3

    def test_past_max_retries_is_error_with_reason(self) -> None:
        status, retries, reason = after_loss(3, 3)
        assert status is S.ERROR
        assert retries == 4
        assert "max retries" in reason
        assert "3" in reason

    def test_zero_retries_allowed_means_first_loss_is_final(self) -> None:
        status, retries, _ = after_loss(0, 0)
        assert (status, retries) == (S.ERROR, 1)

    @pytest.mark.parametrize("max_retries", [0, 1, 2, 5])
    def test_exactly_max_retries_reschedules(self, max_retries: int) -> None:
        statuses = []
        retries = 0
        while True:
            status, retries, _ = after_loss(retries, max_retries)
            statuses.append(status)
            if status is S.ERROR:
                break
        assert statuses == [S.PENDING] * max_retries + [S.ERROR]

    @pytest.mark.parametrize("source", [S.LOST, S.ABORTED])
    def test_outcome_is_a_legal_move_from_loss(self, source: WorkStatus) -> None:
        for retries in range(4):
            status, _, reason = after_loss(retries, 2)
            assert transition(source, status, reason).target is status
