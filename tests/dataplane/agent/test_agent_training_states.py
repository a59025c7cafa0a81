"""Training task states and the pure functions that read the trainer: no processes."""

from __future__ import annotations

import json

import pytest

from controlplane.wire import TrainingCheckpoint, TrainingProgress, TrainingResult
from dataplane.agent.errors import IllegalTransition
from dataplane.agent.training_states import (
    TRANSITIONS,
    Exit,
    TrainerError,
    TrainingState,
    check_transition,
    judge_exit,
    parse_line,
)

PROGRESS = {
    "type": "progress",
    "step": 1,
    "total_steps": 2,
    "epoch": 0.5,
    "loss": 6.1,
    "learning_rate": 0.01,
    "tokens": 76,
    "elapsed_s": 2.7,
}


def test_states_match_the_wire_and_the_table_is_complete() -> None:
    assert set(TRANSITIONS) == set(TrainingState)
    assert {s.value for s in TrainingState} == {
        "starting",
        "running",
        "succeeded",
        "failed",
        "stopped",
    }
    for state in TrainingState.terminal():
        assert TRANSITIONS[state] == frozenset()
    check_transition(TrainingState.STARTING, TrainingState.SUCCEEDED)  # resume at the last step
    with pytest.raises(IllegalTransition, match="illegal training transition"):
        check_transition(TrainingState.RUNNING, TrainingState.STARTING)
    with pytest.raises(IllegalTransition):
        check_transition(TrainingState.STOPPED, TrainingState.FAILED)


def test_parse_line_reads_every_kind() -> None:
    progress = parse_line(json.dumps(PROGRESS).encode() + b"\n")
    assert isinstance(progress, TrainingProgress) and progress.step == 1
    checkpoint = parse_line(json.dumps({"type": "checkpoint", "step": 2, "path": "/c"}))
    assert isinstance(checkpoint, TrainingCheckpoint) and checkpoint.path == "/c"
    result = parse_line(
        json.dumps(
            {
                "type": "result",
                "merged_model_path": "/m",
                "adapter_path": "/a",
                "trained_tokens": 9,
                "train_loss": 1.0,
                "steps": 2,
            }
        )
    )
    assert isinstance(result, TrainingResult) and result.valid_loss is None
    assert parse_line('{"type": "error", "message": "ValueError: bad"}') == TrainerError(
        "ValueError: bad"
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"Writing model shards: 100%",
        b"[1, 2]",
        b'{"type": "nope"}',
        b'{"step": 1}',
        b'{"type": "progress", "step": "x"}',
        b"\xff\xfe",
    ],
)
def test_parse_line_ignores_what_is_not_the_protocol(raw: bytes) -> None:
    assert parse_line(raw) is None


def _exit(
    code: int, *, stop: bool = False, result: bool = False, error: str | None = None, tail: str = ""
) -> Exit:
    return Exit(exit_code=code, stop_requested=stop, has_result=result, error=error, log_tail=tail)


def test_judge_exit() -> None:
    assert judge_exit(_exit(0, result=True)).to_state is TrainingState.SUCCEEDED
    # A run that finished while a stop was on its way still succeeded.
    assert judge_exit(_exit(0, stop=True, result=True)).to_state is TrainingState.SUCCEEDED
    assert judge_exit(_exit(143, stop=True)).to_state is TrainingState.STOPPED
    assert judge_exit(_exit(-9, stop=True)).to_state is TrainingState.STOPPED

    killed = judge_exit(_exit(-9, tail="Traceback ...\nMemoryError"))
    assert killed.to_state is TrainingState.FAILED
    assert killed.reason.startswith("killed by SIGKILL") and "MemoryError" in killed.reason
    error = judge_exit(_exit(1, error="ValueError: base_model_path /x is not a folder"))
    assert error.reason == "exited with code 1: ValueError: base_model_path /x is not a folder"
    silent = judge_exit(_exit(0))
    assert silent.to_state is TrainingState.FAILED and "without a result" in silent.reason
