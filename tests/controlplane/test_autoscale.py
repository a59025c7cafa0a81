"""The autoscaling policy, table-driven: a run of ticks (time, load) and the replicas after each."""

from __future__ import annotations

import pytest

from controlplane.reconcile.autoscale import (
    AutoscaleConfig,
    AutoscaleContext,
    AutoscaleState,
    decide,
    inputs,
)

# Short delays keep the tables readable: up after 30 s, down after 100 s, zero after 60 s idle.
CFG = AutoscaleConfig(
    min_replicas=0,
    max_replicas=4,
    target_concurrency=2,
    upscale_delay_s=30,
    downscale_delay_s=100,
    scale_to_zero_after_s=60,
)

# A tick: (now, requests in flight on ready instances, requests waiting at the activator).
Tick = tuple[float, int, int]


def simulate(config: AutoscaleConfig, start: int, ticks: list[Tick]) -> list[int]:
    """Feed the ticks through `decide`, applying each decision; the replicas after each tick."""
    state, current, seen = AutoscaleState(), start, []
    for now, inflight, waiting in ticks:
        ready = 0 if waiting else current
        ctx = AutoscaleContext(config, current, ready, inflight, waiting, now, state)
        decision = decide(ctx)
        state, current = decision.state, decision.replicas
        seen.append(current)
    return seen


CASES = [
    # name, config, start replicas, ticks, replicas after each tick
    ("at target holds", CFG, 2, [(0, 4, 0), (500, 4, 0)], [2, 2]),
    (
        "up past target only after the upscale delay",
        CFG,
        2,
        [(0, 9, 0), (10, 9, 0), (29, 9, 0), (30, 9, 0)],
        [2, 2, 2, 4],  # ceil(9 / 2) = 5, bounded by max 4
    ),
    (
        "up to the lowest demand that lasted the whole delay",
        CFG,
        1,
        [(0, 7, 0), (10, 5, 0), (30, 7, 0)],
        [1, 1, 3],
    ),
    ("from zero at once", CFG, 0, [(0, 0, 1)], [1]),
    ("from zero at once to the waiting load", CFG, 0, [(0, 0, 7)], [4]),
    ("while none is ready, waiting requests scale at once", CFG, 1, [(0, 0, 5)], [3]),
    (
        "down only after the downscale delay",
        CFG,
        4,
        [(0, 2, 0), (50, 2, 0), (99, 2, 0), (100, 2, 0)],
        [4, 4, 4, 1],
    ),
    (
        "down to the highest demand seen during the delay",
        CFG,
        4,
        [(0, 2, 0), (40, 5, 0), (70, 1, 0), (100, 1, 0)],
        [4, 4, 4, 3],
    ),
    (
        "hysteresis: load that crosses the boundary resets the timers",
        CFG,
        2,
        [(t, 9 if (t // 20) % 2 else 1, 0) for t in range(0, 1000, 20)],
        [2] * 50,
    ),
    (
        "the last replica goes after the keep-alive",
        CFG,
        1,
        [(0, 1, 0), (10, 0, 0), (69, 0, 0), (70, 0, 0), (80, 0, 0)],
        [1, 1, 1, 0, 0],
    ),
    (
        "a request restarts the keep-alive",
        CFG,
        1,
        [(0, 0, 0), (50, 1, 0), (100, 0, 0), (159, 0, 0), (160, 0, 0)],
        [1, 1, 1, 1, 0],
    ),
    (
        "many idle replicas: down after the delay, then to zero",
        CFG,
        3,
        [(0, 0, 0), (60, 0, 0), (100, 0, 0), (101, 0, 0)],
        [3, 3, 1, 0],
    ),
    (
        "min_replicas keeps replicas through idleness",
        AutoscaleConfig(min_replicas=1, max_replicas=4, upscale_delay_s=0, downscale_delay_s=0),
        1,
        [(0, 0, 0), (1000, 0, 0)],
        [1, 1],
    ),
    ("above max is brought within bounds at once", CFG, 6, [(0, 20, 0)], [4]),
    (
        "below min is brought within bounds at once",
        AutoscaleConfig(min_replicas=2, max_replicas=4),
        0,
        [(0, 0, 0)],
        [2],
    ),
    ("at zero without requests stays at zero", CFG, 0, [(0, 0, 0), (1000, 0, 0)], [0, 0]),
    (
        "zero delays follow the load tick by tick",
        AutoscaleConfig(max_replicas=8, upscale_delay_s=0, downscale_delay_s=0),
        1,
        [(0, 8, 0), (1, 3, 0), (2, 16, 0)],
        [4, 2, 8],
    ),
]


@pytest.mark.parametrize(
    ("config", "start", "ticks", "expected"),
    [pytest.param(c, s, t, e, id=name) for name, c, s, t, e in CASES],
)
def test_policy(
    config: AutoscaleConfig, start: int, ticks: list[Tick], expected: list[int]
) -> None:
    assert simulate(config, start, ticks) == expected


def test_a_change_by_hand_restarts_the_timers() -> None:
    pending = decide(AutoscaleContext(CFG, 2, 2, 9, 0, 0.0)).state
    assert pending.up_since == 0.0
    # Someone scaled to 3 in the meantime: the upscale delay counts again from now.
    after = decide(AutoscaleContext(CFG, 3, 3, 9, 0, 40.0, pending))
    assert after.replicas == 3 and after.state.up_since == 40.0
    assert decide(AutoscaleContext(CFG, 3, 3, 9, 0, 70.0, after.state)).replicas == 4


def test_reasons_and_inputs_are_recorded() -> None:
    up = decide(AutoscaleContext(CFG, 0, 0, 0, 3, 5.0))
    assert up.replicas == 2 and up.reason == "scale from zero: 3 requests waiting"
    ctx = AutoscaleContext(CFG, 1, 1, 0, 0, 100.0, AutoscaleState(1, idle_since=10.0))
    down = decide(ctx)
    assert down.replicas == 0 and "keep-alive" in down.reason
    recorded = inputs(ctx)
    assert recorded["load"] == 0 and recorded["idle_since"] == 10.0
    assert recorded["max_replicas"] == 4 and recorded["scale_to_zero_after_s"] == 60


@pytest.mark.parametrize(
    ("current", "load", "preload"),
    [(2, 2, False), (2, 4, True), (4, 8, False), (1, 9, True), (0, 0, False)],
)
def test_preload_is_asked_for_when_a_scale_up_is_near(
    current: int, load: int, preload: bool
) -> None:
    ctx = AutoscaleContext(CFG, current, current, load, 0, 0.0, AutoscaleState(current))
    assert decide(ctx).preload is preload


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_replicas": 3, "max_replicas": 2},
        {"max_replicas": 0},
        {"target_concurrency": 0},
        {"upscale_delay_s": -1},
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AutoscaleConfig(**kwargs)  # type: ignore[arg-type]
