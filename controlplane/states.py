"""State enums and their transition tables.

Requests, jobs, tasks, instances, nodes and fine-tuning jobs each move through an explicit table.
Every change goes through `check_transition`, and the store writes an event row for it (see
`db/recorder.py`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar


class IllegalTransition(ValueError):
    """A state change the transition table does not allow."""


class RequestState(StrEnum):
    QUEUED = "queued"  # accepted, records written, waiting for an instance
    RUNNING = "running"  # at least one of its jobs is running
    SUCCEEDED = "succeeded"  # the reply was delivered in full
    FAILED = "failed"  # an error ended it (instance died, invalid at dispatch, platform restart)
    CANCELLED = "cancelled"  # the client went away or asked to stop

    @classmethod
    def terminal(cls) -> frozenset[RequestState]:
        return frozenset({cls.SUCCEEDED, cls.FAILED, cls.CANCELLED})


class JobState(StrEnum):
    PENDING = "pending"  # created with its request, tasks not yet placed
    RUNNING = "running"  # a task is running
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def terminal(cls) -> frozenset[JobState]:
        return frozenset({cls.SUCCEEDED, cls.FAILED, cls.CANCELLED})


class TaskState(StrEnum):
    PENDING = "pending"  # waiting for an instance
    DISPATCHED = "dispatched"  # sent to an instance, no output yet
    RUNNING = "running"  # the instance is producing output
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def terminal(cls) -> frozenset[TaskState]:
        return frozenset({cls.SUCCEEDED, cls.FAILED, cls.CANCELLED})


class InstanceState(StrEnum):
    PENDING = "pending"  # chosen by the reconciler, not yet accepted by a node
    STARTING = "starting"  # the node agent is starting the process
    READY = "ready"  # answering health checks, takes tasks
    DRAINING = "draining"  # takes no new tasks, finishing its streams
    STOPPED = "stopped"  # stopped on purpose
    FAILED = "failed"  # died, failed to start or its node was lost

    @classmethod
    def terminal(cls) -> frozenset[InstanceState]:
        return frozenset({cls.STOPPED, cls.FAILED})


class NodeState(StrEnum):
    READY = "ready"  # registered and heartbeating
    UNREACHABLE = "unreachable"  # missed heartbeats; its instances are not used
    DOWN = "down"  # gone for good (deregistered, or unreachable too long)

    @classmethod
    def terminal(cls) -> frozenset[NodeState]:
        return frozenset({cls.DOWN})


class FineTuneState(StrEnum):
    """An OpenAI fine-tuning job's `status`; the request, jobs and tasks behind it move too."""

    VALIDATING_FILES = "validating_files"  # created; the validate job reads its files
    QUEUED = "queued"  # files are valid; waiting for a node to take the training
    RUNNING = "running"  # training (and then evaluation and registration) under way
    SUCCEEDED = "succeeded"  # the fine-tuned model is registered
    FAILED = "failed"  # invalid files, training failed past its restarts, or a restart
    CANCELLED = "cancelled"  # the user cancelled it

    @classmethod
    def terminal(cls) -> frozenset[FineTuneState]:
        return frozenset({cls.SUCCEEDED, cls.FAILED, cls.CANCELLED})

    @classmethod
    def in_flight(cls) -> frozenset[FineTuneState]:
        return frozenset({cls.VALIDATING_FILES, cls.QUEUED, cls.RUNNING})


class JobKind(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    FINE_TUNE_VALIDATE = "fine_tune_validate"
    FINE_TUNE_TRAIN = "fine_tune_train"
    FINE_TUNE_EVALUATE = "fine_tune_evaluate"
    FINE_TUNE_REGISTER = "fine_tune_register"


class TaskKind(StrEnum):
    COLOCATED = "colocated"  # prefill and decode on one instance
    PREFILL = "prefill"  # first of a disaggregated pair
    DECODE = "decode"  # second of a disaggregated pair
    TRAIN = "train"
    STEP = "step"  # a control-plane step of a multi-job request (validate, register)


class RequestKind(StrEnum):
    CHAT_COMPLETION = "chat.completion"
    COMPLETION = "text_completion"
    FINE_TUNE = "fine_tune"


_R, _J, _T, _I, _N = RequestState, JobState, TaskState, InstanceState, NodeState
_F = FineTuneState

TRANSITIONS: dict[type, dict[str, frozenset[str]]] = {
    RequestState: {
        _R.QUEUED: frozenset({_R.RUNNING, _R.FAILED, _R.CANCELLED}),
        _R.RUNNING: frozenset({_R.SUCCEEDED, _R.FAILED, _R.CANCELLED}),
        _R.SUCCEEDED: frozenset(),
        _R.FAILED: frozenset(),
        _R.CANCELLED: frozenset(),
    },
    JobState: {
        _J.PENDING: frozenset({_J.RUNNING, _J.FAILED, _J.CANCELLED}),
        _J.RUNNING: frozenset({_J.SUCCEEDED, _J.FAILED, _J.CANCELLED}),
        _J.SUCCEEDED: frozenset(),
        _J.FAILED: frozenset(),
        _J.CANCELLED: frozenset(),
    },
    TaskState: {
        _T.PENDING: frozenset({_T.DISPATCHED, _T.FAILED, _T.CANCELLED}),
        _T.DISPATCHED: frozenset({_T.RUNNING, _T.SUCCEEDED, _T.FAILED, _T.CANCELLED}),
        _T.RUNNING: frozenset({_T.SUCCEEDED, _T.FAILED, _T.CANCELLED}),
        _T.SUCCEEDED: frozenset(),
        _T.FAILED: frozenset(),
        _T.CANCELLED: frozenset(),
    },
    InstanceState: {
        _I.PENDING: frozenset({_I.STARTING, _I.FAILED, _I.STOPPED}),
        # A starting instance scaled away drains (nothing to finish: it is stopped next tick).
        _I.STARTING: frozenset({_I.READY, _I.DRAINING, _I.FAILED, _I.STOPPED}),
        _I.READY: frozenset({_I.DRAINING, _I.FAILED, _I.STOPPED}),
        _I.DRAINING: frozenset({_I.STOPPED, _I.FAILED}),
        _I.STOPPED: frozenset(),
        _I.FAILED: frozenset(),
    },
    NodeState: {
        _N.READY: frozenset({_N.UNREACHABLE, _N.DOWN}),
        _N.UNREACHABLE: frozenset({_N.READY, _N.DOWN}),
        _N.DOWN: frozenset({_N.READY}),  # a node that registers again comes back
    },
    FineTuneState: {
        _F.VALIDATING_FILES: frozenset({_F.QUEUED, _F.FAILED, _F.CANCELLED}),
        _F.QUEUED: frozenset({_F.RUNNING, _F.FAILED, _F.CANCELLED}),
        _F.RUNNING: frozenset({_F.SUCCEEDED, _F.FAILED, _F.CANCELLED}),
        _F.SUCCEEDED: frozenset(),
        _F.FAILED: frozenset(),
        _F.CANCELLED: frozenset(),
    },
}

S = TypeVar("S", RequestState, JobState, TaskState, InstanceState, NodeState, FineTuneState)


def check_transition(current: S, target: S) -> S:
    """Return `target` if the table allows `current -> target`, else raise IllegalTransition."""
    table = TRANSITIONS[type(current)]
    if target not in table[current]:
        raise IllegalTransition(f"{type(current).__name__}: {current.value} -> {target.value}")
    return target


def is_terminal(
    state: RequestState | JobState | TaskState | InstanceState | NodeState | FineTuneState,
) -> bool:
    return state in type(state).terminal()
