"""Training task states, their transition table, and pure functions that read the trainer.

`parse_line` turns one line of the trainer's stdout (see `dataplane.training` for the protocol)
into a message; `judge_exit` decides how a trainer that exited ends. Neither touches a process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from controlplane.wire import TrainingCheckpoint, TrainingProgress, TrainingResult
from dataplane.agent.errors import IllegalTransition
from dataplane.agent.states import describe_exit


class TrainingState(StrEnum):
    """The life of one trainer process. The values are the wire's `TrainingState`."""

    STARTING = "starting"  # spawned; no step done yet (it imports torch and loads the model)
    RUNNING = "running"  # its first progress line came
    SUCCEEDED = "succeeded"  # it wrote a result line, then exited 0
    FAILED = "failed"  # an error line, a non-zero exit, a death by signal, or no result
    STOPPED = "stopped"  # stopped on request (DELETE or agent shutdown)

    @classmethod
    def terminal(cls) -> frozenset[TrainingState]:
        return frozenset({cls.SUCCEEDED, cls.FAILED, cls.STOPPED})

    @classmethod
    def live(cls) -> frozenset[TrainingState]:
        return frozenset({cls.STARTING, cls.RUNNING})

    @property
    def is_terminal(self) -> bool:
        return self in TrainingState.terminal()


_ENDS = frozenset({TrainingState.SUCCEEDED, TrainingState.FAILED, TrainingState.STOPPED})

TRANSITIONS: dict[TrainingState, frozenset[TrainingState]] = {
    # A resume from the last step's checkpoint does no step: straight to its result.
    TrainingState.STARTING: _ENDS | {TrainingState.RUNNING},
    TrainingState.RUNNING: _ENDS,
    TrainingState.SUCCEEDED: frozenset(),
    TrainingState.FAILED: frozenset(),
    TrainingState.STOPPED: frozenset(),
}


def check_transition(from_state: TrainingState, to_state: TrainingState) -> None:
    """Raise `IllegalTransition` unless the table allows `from_state -> to_state`."""
    if to_state not in TRANSITIONS[from_state]:
        raise IllegalTransition(from_state.value, to_state.value, entity="training")


# -- the trainer's stdout ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainerError:
    """An `error` line: the trainer's own account of why it is about to exit 1."""

    message: str


TrainerLine = TrainingProgress | TrainingCheckpoint | TrainingResult | TrainerError

_MODELS: dict[str, type[TrainingProgress | TrainingCheckpoint | TrainingResult]] = {
    "progress": TrainingProgress,
    "checkpoint": TrainingCheckpoint,
    "result": TrainingResult,
}


def parse_line(raw: bytes | str) -> TrainerLine | None:
    """One stdout line as a protocol message; None for anything else (a library's stray print)."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    try:
        body: Any = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    kind = body.pop("type", None)
    if kind == "error":
        return TrainerError(str(body.get("message") or "the trainer reported an error"))
    model = _MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return None
    try:
        return model.model_validate(body)
    except ValidationError:
        return None


# -- how a run ends ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exit:
    """What the supervisor knows once the trainer's stdout closed and the process was reaped."""

    exit_code: int
    stop_requested: bool
    has_result: bool
    error: str | None  # the message of its `error` line
    log_tail: str  # the last lines of its stderr


@dataclass(frozen=True, slots=True)
class Ending:
    to_state: TrainingState
    reason: str


def judge_exit(seen: Exit) -> Ending:
    """The terminal state of a trainer that exited.

    A run that finished (result line, exit 0) succeeded even if a stop raced it; any other exit
    after a stop request is `stopped`; the rest failed.
    """
    if seen.exit_code == 0 and seen.has_result:
        return Ending(TrainingState.SUCCEEDED, "training finished")
    if seen.stop_requested:
        return Ending(TrainingState.STOPPED, "stopped on request")
    if seen.exit_code == 0:
        reason = "exited with code 0 without a result line"
    else:
        reason = describe_exit(seen.exit_code)
    if seen.error is not None:
        reason = f"{reason}: {seen.error}"
    if seen.log_tail:
        reason = f"{reason}; stderr tail:\n{seen.log_tail}"
    return Ending(TrainingState.FAILED, reason)
