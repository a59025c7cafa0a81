from __future__ import annotations

import pytest

from controlplane.states import (
    TRANSITIONS,
    IllegalTransition,
    InstanceState,
    JobState,
    NodeState,
    RequestState,
    TaskState,
    check_transition,
    is_terminal,
)

ALL = [RequestState, JobState, TaskState, InstanceState, NodeState]


@pytest.mark.parametrize("enum", ALL)
def test_every_state_has_a_row(enum: type) -> None:
    assert set(TRANSITIONS[enum]) == set(enum)


@pytest.mark.parametrize("enum", [RequestState, JobState, TaskState, InstanceState])
def test_terminal_states_are_final(enum: type) -> None:
    for state in enum.terminal():
        assert TRANSITIONS[enum][state] == frozenset()
        assert is_terminal(state)


def test_allowed_and_illegal_moves() -> None:
    assert check_transition(TaskState.PENDING, TaskState.DISPATCHED) is TaskState.DISPATCHED
    assert check_transition(RequestState.RUNNING, RequestState.CANCELLED) is RequestState.CANCELLED
    with pytest.raises(IllegalTransition, match="succeeded -> running"):
        check_transition(RequestState.SUCCEEDED, RequestState.RUNNING)
    with pytest.raises(IllegalTransition):
        check_transition(InstanceState.STOPPED, InstanceState.READY)
    with pytest.raises(IllegalTransition):
        check_transition(TaskState.PENDING, TaskState.RUNNING)


def test_every_non_terminal_record_can_fail_or_cancel() -> None:
    for enum in (RequestState, JobState, TaskState):
        for state in set(enum) - enum.terminal():
            check_transition(state, enum("failed"))
            check_transition(state, enum("cancelled"))
