"""SLO-aware dynamic partitioning: semi-PD's Algorithm 1 as a pure decision and a small shell.

Per window, the observed P90 TTFT and P90 TPOT are compared with the SLOs:

    both miss      leave the split (raising one phase would starve the other further)
    TTFT misses    raise the prefill share by `step`, and again while the TTFT model says the
                   new share still misses, up to `max_steps` steps
    TPOT misses    likewise for the decode share (the prefill share falls)
    both meet      leave the split; with `give_back`, move one step from the phase with the
                   larger slack to the other when the donor's model says it keeps
                   `give_back_margin` of its SLO as slack afterwards

always within [min_share, max_share] of prefill share. The observation decides whether to move,
the models (latency.py, fitted over the last `history` windows' (share, P90) points) only how
far: without a model a miss moves one step. The paper gives no values for the window, step or
bounds; the defaults here are ours (ControllerConfig). Shares are percents of the device's
compute units; the decode share is 100 - prefill share (partitions do not overlap).

`decide` is pure. `SLOController` collects the workers' samples (thread-safe), closes a window
every `window_s` seconds (`tick(now)`), fits, decides, and keeps a `SwitchRecord` of every
switch with everything it was decided from.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from dataplane.flowserve.errors import ConfigError
from dataplane.flowserve.semipd.latency import TPOTModel, TTFTModel, fit_tpot, fit_ttft

# The prefill share's default bounds, percent.
MIN_SHARE = 10
MAX_SHARE = 90


class Reason(StrEnum):
    """Why a window left or changed the split."""

    # The split changes:
    TTFT_MISS = "ttft_miss"  # P90 TTFT over its SLO: the prefill share rises
    TPOT_MISS = "tpot_miss"  # P90 TPOT over its SLO: the decode share rises
    GIVE_BACK = "give_back"  # both met: a step goes to the phase with less slack
    # The split stays:
    BOTH_MEET = "both_meet"
    BOTH_MISS = "both_miss"
    AT_BOUND = "at_bound"  # the phase that misses already has all the bounds allow
    NO_SAMPLES = "no_samples"  # too few requests in the window to judge either phase
    STATIC = "static"  # --semi-pd-static: observed, never switched


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    slo_ttft_s: float
    slo_tpot_s: float
    percentile: float = 90.0
    window_s: float = 5.0  # one decision per window
    min_samples: int = 8  # a phase with fewer samples in a window is not judged in it
    step: int = 10  # percent of the device's compute moved per step
    max_steps: int = 3  # steps per window at most
    min_share: int = MIN_SHARE  # bounds of the prefill share, percent
    max_share: int = MAX_SHARE
    give_back: bool = False  # Algorithm 1 leaves the split alone when both SLOs are met
    give_back_margin: float = 0.2
    history: int = 8  # windows whose (share, P90) points the latency models are fitted to

    def __post_init__(self) -> None:
        if self.slo_ttft_s <= 0 or self.slo_tpot_s <= 0:
            raise ConfigError("the TTFT and TPOT SLOs must be positive")
        if not 0 < self.percentile <= 100:
            raise ConfigError("the SLO percentile is in (0, 100]")
        if self.window_s <= 0 or self.min_samples < 1 or self.history < 1:
            raise ConfigError("window_s, min_samples and history must be positive")
        if not 1 <= self.min_share <= self.max_share <= 99:
            raise ConfigError("the prefill share's bounds must satisfy 1 <= min <= max <= 99")
        if self.step < 1 or self.max_steps < 1:
            raise ConfigError("step and max_steps must be at least 1")
        if not 0 <= self.give_back_margin < 1:
            raise ConfigError("give_back_margin is in [0, 1)")


@dataclass(frozen=True, slots=True)
class Window:
    """What one window observed, at the prefill share in force during it."""

    started: float
    ended: float
    prefill_share: int
    ttft_p90: float | None  # seconds; None with fewer than min_samples samples
    tpot_p90: float | None
    num_ttft: int
    num_tpot: int


@dataclass(frozen=True, slots=True)
class Decision:
    prefill_share: int  # the split to run from now on
    reason: Reason
    estimated_ttft: float | None = None  # the models' latency at the new split
    estimated_tpot: float | None = None


@dataclass(frozen=True, slots=True)
class SwitchRecord:
    """One switch and everything it was decided from."""

    at: float
    window: Window
    old_share: int
    new_share: int
    reason: Reason
    slo_ttft_s: float
    slo_tpot_s: float
    ttft_model: TTFTModel | None
    tpot_model: TPOTModel | None
    estimated_ttft: float | None
    estimated_tpot: float | None

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = _jsonable(asdict(self))
        return record


def decide(
    window: Window,
    prefill_share: int,
    config: ControllerConfig,
    ttft_model: TTFTModel | None = None,
    tpot_model: TPOTModel | None = None,
) -> Decision:
    """Algorithm 1 for one window: the split to run next and why."""
    ttft, tpot = window.ttft_p90, window.tpot_p90
    if ttft is None and tpot is None:
        return Decision(prefill_share, Reason.NO_SAMPLES)
    ttft_miss = ttft is not None and ttft > config.slo_ttft_s
    tpot_miss = tpot is not None and tpot > config.slo_tpot_s
    if ttft_miss and tpot_miss:
        return Decision(prefill_share, Reason.BOTH_MISS)

    def estimate(share: int) -> Decision:
        return Decision(
            share,
            reason,
            ttft_model(share) if ttft_model else None,
            tpot_model(100 - share) if tpot_model else None,
        )

    if ttft_miss or tpot_miss:
        reason = Reason.TTFT_MISS if ttft_miss else Reason.TPOT_MISS
        if ttft_miss:
            meets = _meets(ttft_model, lambda s: s, config.slo_ttft_s)
            new = _move(prefill_share, +1, config, meets)
        else:
            meets = _meets(tpot_model, lambda s: 100 - s, config.slo_tpot_s)
            new = _move(prefill_share, -1, config, meets)
        if new == prefill_share:
            reason = Reason.AT_BOUND
        return estimate(new)
    reason = Reason.BOTH_MEET
    if not config.give_back or ttft is None or tpot is None or not (ttft_model and tpot_model):
        return estimate(prefill_share)
    # Both meet: the phase with more slack gives a step, if its model says it can afford it.
    keep = 1.0 - config.give_back_margin
    if 1.0 - ttft / config.slo_ttft_s > 1.0 - tpot / config.slo_tpot_s:
        new = _clamp(prefill_share - config.step, config)
        affordable = ttft_model(new) <= keep * config.slo_ttft_s
    else:
        new = _clamp(prefill_share + config.step, config)
        affordable = tpot_model(100 - new) <= keep * config.slo_tpot_s
    if affordable and new != prefill_share:
        reason = Reason.GIVE_BACK
        return estimate(new)
    return estimate(prefill_share)


def _meets(
    model: Callable[[float], float] | None, share_of: Callable[[int], int], slo: float
) -> Callable[[int], bool]:
    """Whether the phase meets its SLO at a prefill share, by its model; without one, any
    share does (one step per window)."""
    if model is None:
        return lambda _share: True
    return lambda share: model(share_of(share)) <= slo


def _move(
    share: int, direction: int, config: ControllerConfig, meets: Callable[[int], bool]
) -> int:
    """At least one step (the observation missed), more while the model says it still misses."""
    new = share
    for _ in range(config.max_steps):
        candidate = _clamp(new + direction * config.step, config)
        if candidate == new:
            break
        new = candidate
        if meets(new):
            break
    return new


def _clamp(share: int, config: ControllerConfig) -> int:
    return min(max(share, config.min_share), config.max_share)


@dataclass(slots=True)
class _Samples:
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)


class SLOController:
    """Algorithm 1 in an instance: the workers report each first token's TTFT and each later
    token's interval (`observe_*`, any thread); the engine calls `tick(now)`, which closes a
    window every `window_s` seconds and returns the decision when the split changes."""

    def __init__(
        self, config: ControllerConfig, prefill_share: int, *, now: float, static: bool = False
    ) -> None:
        if not config.min_share <= prefill_share <= config.max_share:
            raise ConfigError(
                f"the prefill share {prefill_share} is outside [{config.min_share}, "
                f"{config.max_share}]"
            )
        self.config = config
        self.static = static
        self.prefill_share = prefill_share
        self._lock = threading.Lock()
        self._samples = _Samples()
        self._started = now
        self._ttft_points: deque[tuple[float, float]] = deque(maxlen=config.history)
        self._tpot_points: deque[tuple[float, float]] = deque(maxlen=config.history)
        self.ttft_model: TTFTModel | None = None
        self.tpot_model: TPOTModel | None = None
        self.last_window: Window | None = None
        self.last_decision: Decision | None = None
        # The newest P90s a window measured (a window with too few samples keeps them).
        self.last_ttft_p90: float | None = None
        self.last_tpot_p90: float | None = None
        self.records: list[SwitchRecord] = []

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self._samples.ttft.append(seconds)

    def observe_tpot(self, seconds: Sequence[float]) -> None:
        """One or more inter-token intervals (a decode step's, say)."""
        with self._lock:
            self._samples.tpot.extend(seconds)

    def tick(self, now: float) -> SwitchRecord | None:
        """Close the window if it is due; the record when the split changes."""
        if now - self._started < self.config.window_s:
            return None
        with self._lock:
            samples, self._samples = self._samples, _Samples()
        window = self._close(samples, now)
        if window.ttft_p90 is not None:
            self.last_ttft_p90 = window.ttft_p90
            self._ttft_points.append((window.prefill_share, window.ttft_p90))
            self.ttft_model = fit_ttft(self._ttft_points)
        if window.tpot_p90 is not None:
            self.last_tpot_p90 = window.tpot_p90
            self._tpot_points.append((100 - window.prefill_share, window.tpot_p90))
            self.tpot_model = fit_tpot(self._tpot_points)
        decision = decide(window, self.prefill_share, self.config, self.ttft_model, self.tpot_model)
        if self.static:
            decision = Decision(self.prefill_share, Reason.STATIC)
        self.last_window, self.last_decision = window, decision
        if decision.prefill_share == self.prefill_share:
            return None
        record = SwitchRecord(
            now,
            window,
            self.prefill_share,
            decision.prefill_share,
            decision.reason,
            self.config.slo_ttft_s,
            self.config.slo_tpot_s,
            self.ttft_model,
            self.tpot_model,
            decision.estimated_ttft,
            decision.estimated_tpot,
        )
        self.records.append(record)
        self.prefill_share = decision.prefill_share
        return record

    def _close(self, samples: _Samples, now: float) -> Window:
        config = self.config
        window = Window(
            self._started,
            now,
            self.prefill_share,
            _percentile(samples.ttft, config.percentile, config.min_samples),
            _percentile(samples.tpot, config.percentile, config.min_samples),
            len(samples.ttft),
            len(samples.tpot),
        )
        self._started = now
        return window


def _percentile(values: list[float], percentile: float, min_samples: int) -> float | None:
    if len(values) < min_samples:
        return None
    return float(np.percentile(np.asarray(values), percentile))


def _jsonable(value: Any) -> Any:
    """asdict's output with enums as their values and infinities as None (JSON has none)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
