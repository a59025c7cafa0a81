from __future__ import annotations

import pytest

from dataplane.agent.errors import IllegalTransition
from dataplane.agent.states import (
    TRANSITIONS,
    InstanceState,
    Observation,
    check_transition,
    describe_exit,
    judge,
)

S = InstanceState

LEGAL = [
    (S.STARTING, S.READY),
    (S.STARTING, S.FAILED),
    (S.STARTING, S.STOPPED),
    (S.READY, S.STOPPED),
    (S.READY, S.FAILED),
]


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(InstanceState)
    assert {s.value for s in InstanceState} == {"starting", "ready", "failed", "stopped"}


@pytest.mark.parametrize(("from_state", "to_state"), LEGAL)
def test_legal_moves(from_state: InstanceState, to_state: InstanceState) -> None:
    check_transition(from_state, to_state)


@pytest.mark.parametrize(
    ("from_state", "to_state"),
    [(a, b) for a in InstanceState for b in InstanceState if (a, b) not in LEGAL],
)
def test_illegal_moves(from_state: InstanceState, to_state: InstanceState) -> None:
    with pytest.raises(IllegalTransition, match=f"{from_state.value} -> {to_state.value}"):
        check_transition(from_state, to_state)


def seen(state: InstanceState, **kw: object) -> Observation:
    base: dict[str, object] = {
        "exit_code": None,
        "healthy": False,
        "now": 10.0,
        "deadline": 20.0,
        "start_timeout_s": 5.0,
    }
    base.update(kw)
    return Observation(state=state, **base)  # type: ignore[arg-type]


def test_judge_starting() -> None:
    assert judge(seen(S.STARTING)) is None
    ready = judge(seen(S.STARTING, healthy=True))
    assert ready is not None and ready.to_state is S.READY and not ready.kill
    late = judge(seen(S.STARTING, now=20.0))
    assert late is not None and late.to_state is S.FAILED and late.kill
    assert "start timeout of 5 s" in late.reason


def test_judge_exit_wins_over_health() -> None:
    verdict = judge(seen(S.STARTING, exit_code=3, healthy=True))
    assert verdict is not None
    assert (verdict.to_state, verdict.kill, verdict.reason) == (
        S.FAILED,
        False,
        "exited with code 3",
    )


def test_judge_ready_and_terminal() -> None:
    assert judge(seen(S.READY, now=99.0)) is None  # the start deadline no longer applies
    verdict = judge(seen(S.READY, exit_code=-9))
    assert verdict is not None and verdict.to_state is S.FAILED
    assert verdict.reason == "killed by SIGKILL"
    assert judge(seen(S.FAILED, exit_code=1)) is None
    assert judge(seen(S.STOPPED, healthy=True)) is None


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(-15) == "killed by SIGTERM"
