"""semi-PD's Algorithm 1 as pure code: the latency models' fits recover known parameters, the
phase that misses its SLO gains share (as far as its model says it must, within the bounds),
both missing or both meeting leaves the split, records carry their inputs, and a share maps to
whole compute units."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dataplane.flowserve.errors import ConfigError
from dataplane.flowserve.semipd.controller import (
    ControllerConfig,
    Reason,
    SLOController,
    Window,
    decide,
)
from dataplane.flowserve.semipd.latency import TPOTModel, TTFTModel, fit_tpot, fit_ttft
from dataplane.flowserve.semipd.split import split_units

SHARES = [20, 30, 40, 50, 60, 70, 80, 90]
# The paper's Figure 10 fits (Llama3-8B, ShareGPT), with a queueing term of our choosing.
PAPER_TTFT = TTFTModel(a=0.6809, lam=12.0, b=0.022, r2=1.0)
PAPER_TPOT = TPOTModel(a=0.6284, b=0.3818, r2=1.0)
CONFIG = ControllerConfig(slo_ttft_s=0.1, slo_tpot_s=0.4, step=10, max_steps=3)


def window(share: int, ttft: float | None, tpot: float | None) -> Window:
    return Window(0.0, 5.0, share, ttft, tpot, 0 if ttft is None else 20, 0 if tpot is None else 20)


# --- the latency models --------------------------------------------------------------------


def test_ttft_fit_recovers_known_parameters() -> None:
    fit = fit_ttft([(x, PAPER_TTFT(x)) for x in SHARES])
    assert fit is not None
    assert fit.a == pytest.approx(PAPER_TTFT.a, rel=1e-3)
    assert fit.lam == pytest.approx(PAPER_TTFT.lam, abs=1e-2)
    assert fit.b == pytest.approx(PAPER_TTFT.b, abs=1e-4)
    assert fit.r2 == pytest.approx(1.0)


def test_ttft_fit_is_robust_to_noise() -> None:
    rng = np.random.default_rng(7)
    points = [(x, PAPER_TTFT(x) * (1 + 0.03 * rng.standard_normal())) for x in SHARES * 3]
    fit = fit_ttft(points)
    assert fit is not None and fit.r2 > 0.99
    for x in SHARES:  # it predicts where it was fitted, within the noise
        assert fit(x) == pytest.approx(PAPER_TTFT(x), rel=0.05)


def test_tpot_fit_recovers_known_parameters() -> None:
    fit = fit_tpot([(100 - x, PAPER_TPOT(100 - x)) for x in SHARES])
    assert fit is not None
    assert fit.a == pytest.approx(PAPER_TPOT.a)
    assert fit.b == pytest.approx(PAPER_TPOT.b)


def test_fits_need_enough_distinct_shares_and_a_falling_curve() -> None:
    assert fit_ttft([(50, 1.0), (50, 1.1), (60, 0.9), (60, 0.8)]) is None  # two shares
    assert fit_tpot([(50, 0.2), (50, 0.3)]) is None  # one share
    assert fit_tpot([(20, 0.1), (80, 0.3)]) is None  # latency rising with share: no model
    assert fit_ttft([(20, 0.1), (50, 0.2), (80, 0.3)]) is None
    assert TTFTModel(1.0, 30.0, 0.0, 1.0)(30) == float("inf")  # the queue never drains


# --- Algorithm 1 ---------------------------------------------------------------------------


def test_ttft_miss_raises_the_prefill_share_one_step_without_a_model() -> None:
    decision = decide(window(50, ttft=0.5, tpot=0.3), 50, CONFIG)
    assert (decision.prefill_share, decision.reason) == (60, Reason.TTFT_MISS)


def test_tpot_miss_raises_the_decode_share() -> None:
    decision = decide(window(50, ttft=0.05, tpot=0.9), 50, CONFIG)
    assert (decision.prefill_share, decision.reason) == (40, Reason.TPOT_MISS)


def test_the_model_says_how_far_up_to_max_steps() -> None:
    # PAPER_TTFT(30) = 0.060, (40) = 0.046: a 0.05 s SLO is met at 40, three steps from 10.
    config = ControllerConfig(slo_ttft_s=0.05, slo_tpot_s=1.0, min_share=10, step=10)
    decision = decide(window(10, ttft=0.3, tpot=0.5), 10, config, PAPER_TTFT, PAPER_TPOT)
    assert decision.prefill_share == 40
    assert decision.estimated_ttft == pytest.approx(PAPER_TTFT(40))
    assert decision.estimated_tpot == pytest.approx(PAPER_TPOT(60))
    # One step is enough when the model says so.
    decision = decide(window(30, ttft=0.08, tpot=0.5), 30, config, PAPER_TTFT, PAPER_TPOT)
    assert decision.prefill_share == 40
    # And never more than max_steps.
    strict = ControllerConfig(slo_ttft_s=0.001, slo_tpot_s=1.0, min_share=10, max_steps=2)
    assert decide(window(10, 0.3, 0.5), 10, strict, PAPER_TTFT, PAPER_TPOT).prefill_share == 30


def test_a_miss_moves_even_when_the_model_disagrees() -> None:
    # The model says the current share meets the SLO; the observation says otherwise: one step.
    decision = decide(window(50, ttft=0.5, tpot=0.3), 50, CONFIG, PAPER_TTFT, PAPER_TPOT)
    assert decision.prefill_share == 60


def test_bounds_hold() -> None:
    config = ControllerConfig(slo_ttft_s=0.1, slo_tpot_s=0.1, min_share=20, max_share=70, step=30)
    up = decide(window(60, ttft=1.0, tpot=0.01), 60, config)
    assert (up.prefill_share, up.reason) == (70, Reason.TTFT_MISS)
    at_top = decide(window(70, ttft=1.0, tpot=0.01), 70, config)
    assert (at_top.prefill_share, at_top.reason) == (70, Reason.AT_BOUND)
    down = decide(window(30, ttft=0.01, tpot=1.0), 30, config)
    assert down.prefill_share == 20
    assert decide(window(20, ttft=0.01, tpot=1.0), 20, config).reason == Reason.AT_BOUND


def test_both_missing_or_both_meeting_leaves_the_split() -> None:
    assert decide(window(50, 0.5, 0.9), 50, CONFIG).reason == Reason.BOTH_MISS
    both_meet = decide(window(50, 0.05, 0.3), 50, CONFIG, PAPER_TTFT, PAPER_TPOT)
    assert (both_meet.prefill_share, both_meet.reason) == (50, Reason.BOTH_MEET)
    assert decide(window(50, None, None), 50, CONFIG).reason == Reason.NO_SAMPLES
    # A phase without enough samples is not judged: the other one decides.
    assert decide(window(50, None, 0.9), 50, CONFIG).reason == Reason.TPOT_MISS


def test_give_back_moves_a_step_to_the_phase_with_less_slack() -> None:
    config = ControllerConfig(slo_ttft_s=0.2, slo_tpot_s=0.5, give_back=True)
    # TTFT at 0.03 of 0.2 (85% slack), TPOT at 0.45 of 0.5 (10%): prefill gives a step.
    decision = decide(window(50, 0.03, 0.45), 50, config, PAPER_TTFT, PAPER_TPOT)
    assert (decision.prefill_share, decision.reason) == (40, Reason.GIVE_BACK)
    assert decision.estimated_ttft is not None and decision.estimated_ttft <= 0.8 * 0.2
    # Not when the donor's model says it would come too close to its SLO.
    tight = ControllerConfig(slo_ttft_s=0.04, slo_tpot_s=0.5, give_back=True)
    kept = decide(window(50, 0.03, 0.45), 50, tight, PAPER_TTFT, PAPER_TPOT)
    assert (kept.prefill_share, kept.reason) == (50, Reason.BOTH_MEET)
    # Nor without models, nor when give_back is off.
    assert decide(window(50, 0.03, 0.45), 50, config).prefill_share == 50
    off = ControllerConfig(slo_ttft_s=0.2, slo_tpot_s=0.5)
    assert decide(window(50, 0.03, 0.45), 50, off, PAPER_TTFT, PAPER_TPOT).prefill_share == 50


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ConfigError):
        ControllerConfig(slo_ttft_s=0, slo_tpot_s=0.1)
    with pytest.raises(ConfigError):
        ControllerConfig(slo_ttft_s=0.1, slo_tpot_s=0.1, min_share=60, max_share=40)
    with pytest.raises(ConfigError):
        SLOController(CONFIG, 95, now=0.0)  # outside the bounds


# --- the controller over windows -------------------------------------------------------------


def feed(controller: SLOController, ttft: float, tpot: float, n: int = 20) -> None:
    for _ in range(n):
        controller.observe_ttft(ttft)
    controller.observe_tpot([tpot] * n)


def test_windows_close_on_time_and_switches_are_recorded_with_their_inputs() -> None:
    config = ControllerConfig(slo_ttft_s=0.1, slo_tpot_s=0.4, window_s=5.0, min_samples=10)
    controller = SLOController(config, 50, now=0.0)
    feed(controller, ttft=0.3, tpot=0.2)
    assert controller.tick(4.9) is None  # the window is not over
    record = controller.tick(5.0)
    assert record is not None
    assert (record.old_share, record.new_share, record.reason) == (50, 60, Reason.TTFT_MISS)
    assert record.window.ttft_p90 == pytest.approx(0.3)
    assert record.window.tpot_p90 == pytest.approx(0.2)
    assert (record.window.num_ttft, record.window.num_tpot) == (20, 20)
    assert (record.slo_ttft_s, record.slo_tpot_s) == (0.1, 0.4)
    assert controller.prefill_share == 60 and controller.records == [record]
    as_json = json.loads(json.dumps(record.to_dict()))
    assert as_json["reason"] == "ttft_miss" and as_json["window"]["prefill_share"] == 50
    # Too few samples: nothing is judged, nothing moves.
    feed(controller, ttft=0.3, tpot=0.2, n=5)
    assert controller.tick(10.0) is None
    assert controller.last_decision is not None
    assert controller.last_decision.reason == Reason.NO_SAMPLES
    # ... and the newest measured P90s (what the gauges export) stay the last full window's.
    assert controller.last_window is not None and controller.last_window.ttft_p90 is None
    assert controller.last_ttft_p90 == pytest.approx(0.3)
    assert controller.last_tpot_p90 == pytest.approx(0.2)


def test_models_are_fitted_from_the_windows_and_drive_the_steps() -> None:
    config = ControllerConfig(slo_ttft_s=0.05, slo_tpot_s=5.0, window_s=1.0, step=10)
    controller = SLOController(config, 20, now=0.0)
    now = 0.0
    # Observations that follow the paper's model: TTFT misses until the share reaches 40.
    while controller.prefill_share < 40 and now < 20:
        now += 1.0
        share = controller.prefill_share
        feed(controller, ttft=PAPER_TTFT(share), tpot=PAPER_TPOT(100 - share))
        controller.tick(now)
    assert controller.prefill_share == 40
    assert [r.reason for r in controller.records] == [Reason.TTFT_MISS] * 2
    assert controller.records[-1].tpot_model is not None  # two distinct decode shares
    feed(controller, ttft=PAPER_TTFT(40), tpot=PAPER_TPOT(60))
    assert controller.tick(now + 1.0) is None  # met: it stays
    model = controller.ttft_model
    assert model is not None and model(40) == pytest.approx(PAPER_TTFT(40), rel=1e-3)


def test_a_static_controller_observes_and_never_switches() -> None:
    controller = SLOController(CONFIG, 50, now=0.0, static=True)
    feed(controller, ttft=1.0, tpot=0.1)
    assert controller.tick(10.0) is None
    assert controller.last_decision is not None
    assert controller.last_decision.reason == Reason.STATIC
    assert controller.last_window is not None and controller.last_window.ttft_p90 == 1.0


# --- shares to units ---------------------------------------------------------------------------


def test_split_units_on_a_host_and_on_hopper() -> None:
    assert split_units(4, 1, 50) == split_units(4, 1, 50)
    assert (split_units(4, 1, 50).prefill_units, split_units(4, 1, 50).decode_units) == (2, 2)
    assert (split_units(4, 1, 10).prefill_units, split_units(4, 1, 10).decode_units) == (1, 3)
    assert (split_units(4, 1, 90).prefill_units, split_units(4, 1, 90).decode_units) == (3, 1)
    h100 = split_units(132, 8, 50)
    assert (h100.prefill_units, h100.decode_units) == (64, 64)  # 4 SMs left over
    assert split_units(132, 8, 5).prefill_units == 8  # at least one group
    assert split_units(132, 8, 99).decode_units == 8
    for share in range(1, 100):
        split = split_units(132, 8, share)
        assert split.prefill_units % 8 == 0 and split.decode_units % 8 == 0
        assert split.prefill_units + split.decode_units <= 132
    one = split_units(1, 1, 50)  # too small to split: both get all of it
    assert (one.prefill_units, one.decode_units) == (1, 1)
    with pytest.raises(ConfigError):
        split_units(4, 1, 100)
