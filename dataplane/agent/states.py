"""Instance states, their transition table, and the watcher's pure decision function."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import StrEnum

from dataplane.agent.errors import IllegalTransition


class InstanceState(StrEnum):
    """The life of one FlowServe process. The values are the wire's `InstanceReportState`."""

    STARTING = "starting"  # spawned; its /health has not answered "ok" yet
    READY = "ready"  # /health answered "ok": it serves at its URL
    STOPPED = "stopped"  # stopped on request (DELETE or agent shutdown)
    FAILED = "failed"  # exited on its own, or never became healthy in time

    @classmethod
    def terminal(cls) -> frozenset[InstanceState]:
        return frozenset({cls.STOPPED, cls.FAILED})

    @classmethod
    def live(cls) -> frozenset[InstanceState]:
        return frozenset({cls.STARTING, cls.READY})

    @property
    def is_terminal(self) -> bool:
        return self in InstanceState.terminal()


TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.STARTING: frozenset(
        {InstanceState.READY, InstanceState.FAILED, InstanceState.STOPPED}
    ),
    InstanceState.READY: frozenset({InstanceState.STOPPED, InstanceState.FAILED}),
    InstanceState.STOPPED: frozenset(),
    InstanceState.FAILED: frozenset(),
}


def check_transition(from_state: InstanceState, to_state: InstanceState) -> None:
    """Raise `IllegalTransition` unless the table allows `from_state -> to_state`."""
    if to_state not in TRANSITIONS[from_state]:
        raise IllegalTransition(from_state.value, to_state.value)


@dataclass(frozen=True, slots=True)
class Observation:
    """What the watcher saw of one instance on one tick."""

    state: InstanceState
    exit_code: int | None  # None while the process runs
    healthy: bool  # its /health answered 200 with status "ok"
    now: float
    deadline: float  # monotonic time by which it must be healthy
    start_timeout_s: float


@dataclass(frozen=True, slots=True)
class Verdict:
    to_state: InstanceState
    reason: str
    kill: bool  # the process still runs and must be killed


def judge(seen: Observation) -> Verdict | None:
    """Decide the next state of a live instance from one observation; None: nothing changes."""
    if seen.state.is_terminal:
        return None
    if seen.exit_code is not None:
        return Verdict(InstanceState.FAILED, describe_exit(seen.exit_code), kill=False)
    if seen.state is InstanceState.STARTING:
        if seen.healthy:
            return Verdict(InstanceState.READY, "health check passed", kill=False)
        if seen.now >= seen.deadline:
            reason = f"not healthy within its start timeout of {seen.start_timeout_s:g} s"
            return Verdict(InstanceState.FAILED, reason, kill=True)
    return None


def describe_exit(exit_code: int) -> str:
    """`Popen.returncode` in words: negative codes are the signal that killed the process."""
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"killed by {name}"
    return f"exited with code {exit_code}"
