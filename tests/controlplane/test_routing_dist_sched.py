from __future__ import annotations

import json
import math

import pytest

from controlplane.routing.decode_predictor import DecodeLengthPredictor, FinishedRequest
from controlplane.routing.dist_sched import (
    Decision,
    Groups,
    RouterThresholds,
    SchedPolicy,
    SchedRequest,
    is_balanced,
    pick_in_group,
    schedule,
)
from controlplane.routing.pd_heatmap import PDHeatmap
from controlplane.routing.policy import InstanceLoad, pick_instance
from controlplane.routing.prefix_index import PrefixIndex

T = RouterThresholds()


def inst(iid: str, inflight: int = 0) -> InstanceLoad:
    return InstanceLoad(iid, "n1", f"http://{iid}", inflight)


# thresholds and balance


def test_defaults_are_sglang_router_defaults() -> None:
    assert (T.cache_threshold, T.balance_abs_threshold, T.balance_rel_threshold) == (0.3, 64, 1.5)


@pytest.mark.parametrize(
    "kwargs",
    [{"cache_threshold": 1.1}, {"cache_threshold": -0.1}, {"balance_abs_threshold": -1},
     {"balance_rel_threshold": 0.9}],
)  # fmt: skip
def test_bad_thresholds(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RouterThresholds(**kwargs)  # type: ignore[arg-type]


def test_balance_needs_both_gaps_exceeded() -> None:
    assert is_balanced([], T)
    assert is_balanced([inst("a", 1000)], T)
    assert is_balanced([inst("a", 0), inst("b", 64)], T)  # abs gap exactly 64: balanced
    assert not is_balanced([inst("a", 0), inst("b", 65)], T)
    assert is_balanced([inst("a", 200), inst("b", 300)], T)  # ratio exactly 1.5: balanced
    assert not is_balanced([inst("a", 200), inst("b", 301)], T)
    assert is_balanced([inst("a", 10), inst("b", 60)], T)  # ratio 6 but gap 50


# pick_in_group


def test_empty_group_and_all_excluded() -> None:
    assert pick_in_group([], {}, 100, T).reason == "no_candidates"
    p = pick_in_group([inst("a")], {"a": 100}, 100, T, exclude=frozenset({"a"}))
    assert (p.instance, p.reason) == (None, "no_candidates")


def test_balanced_prefix_match_wins_over_load() -> None:
    group = [inst("a", 0), inst("b", 10)]
    p = pick_in_group(group, {"b": 30}, 100, T)
    assert (p.instance, p.reason, p.matched_chars) == (group[1], "prefix_match", 30)


def test_match_ratio_boundary() -> None:
    group = [inst("a", 0), inst("b", 10)]
    assert pick_in_group(group, {"b": 30}, 100, T).reason == "prefix_match"  # ratio = threshold
    p = pick_in_group(group, {"b": 29}, 100, T)
    assert (p.instance, p.reason) == (group[0], "low_match")


def test_longest_match_then_least_loaded_then_id() -> None:
    group = [inst("c", 5), inst("b", 5), inst("a", 9)]
    assert pick_in_group(group, {"a": 80, "b": 80, "c": 60}, 100, T).instance == group[1]
    assert pick_in_group(group, {"a": 80, "c": 80}, 100, T).instance == group[0]
    assert pick_in_group(group, {"b": 80, "c": 80}, 100, T).instance == group[1]


def test_least_loaded_ties_go_to_lowest_id() -> None:
    group = [inst("b", 1), inst("a", 1), inst("c", 2)]
    p = pick_in_group(group, {}, 100, T)
    assert (p.instance, p.reason) == (group[1], "low_match")


def test_imbalanced_group_ignores_matches() -> None:
    group = [inst("a", 0), inst("b", 100)]
    p = pick_in_group(group, {"b": 100}, 100, T)
    assert (p.instance, p.reason, p.balanced) == (group[0], "imbalanced", False)


def test_exclusion_changes_balance() -> None:
    group = [inst("a", 0), inst("b", 100), inst("c", 90)]
    p = pick_in_group(group, {"b": 100}, 100, T, exclude=frozenset({"a"}))
    assert (p.instance, p.reason) == (group[1], "prefix_match")


def test_zero_prompt_chars_and_zero_threshold() -> None:
    group = [inst("a", 0), inst("b", 1)]
    assert pick_in_group(group, {"b": 10}, 0, T).reason == "low_match"
    loose = RouterThresholds(cache_threshold=0.0)
    assert pick_in_group(group, {}, 100, loose).instance == group[0]  # no match is no match
    assert pick_in_group(group, {"b": 1}, 100, loose).instance == group[1]


def test_pick_instance_unchanged() -> None:
    group = [inst("b", 1), inst("a", 1)]
    assert pick_instance(group) == group[1]
    assert pick_instance(group, frozenset({"a"})) == group[0]
    assert pick_instance([]) is None


# schedule

COLO = [inst("c1", 2), inst("c2", 1)]
PREFILL = [inst("p1", 0), inst("p2", 3)]
DECODE = [inst("d1", 4), inst("d2", 1)]
ALL = Groups(COLO, PREFILL, DECODE)

# long prompts with short decodes favour the pair, everything else colocated
HEATMAP = PDHeatmap(
    (0, 1000, math.inf),
    (0, 0.5, math.inf),
    ((-0.3, -0.5), (0.6, -0.2)),
    ((4, 4), (4, 4)),
)
PREDICTOR = DecodeLengthPredictor.fit(
    [FinishedRequest(2000, 100)] * 10 + [FinishedRequest(100, 500)] * 10
)
POLICY = SchedPolicy(heatmap=HEATMAP, predictor=PREDICTOR)


def test_no_heatmap_goes_colocated_by_load() -> None:
    d = schedule(SchedRequest(prompt_chars=400), ALL, {})
    assert (d.mode, d.instance, d.routed) == ("colocated", COLO[1], True)
    assert d.instance_ids == ("c2",)
    assert d.record["mode_reason"] == "no_heatmap"
    assert d.record["prompt_tokens"] == 100 and d.record["prompt_tokens_estimated"]
    assert d.record["predicted_decode_tokens"] == 256


def test_long_prompt_short_decode_goes_to_a_pair() -> None:
    d = schedule(SchedRequest(prompt_chars=8000, prompt_tokens=2000), ALL, {"p2": 6000}, POLICY)
    assert d.mode == "disaggregated"
    assert (d.prefill, d.decode, d.instance) == (PREFILL[1], DECODE[1], None)
    assert d.instance_ids == ("p2", "d2")
    assert d.record["predicted_decode_tokens"] == 64
    assert d.record["heatmap_cell"] == [1, 0]
    assert d.record["picks"]["prefill"]["reason"] == "prefix_match"
    assert d.record["picks"]["prefill"]["match_ratio"] == pytest.approx(0.75)
    assert d.record["picks"]["decode"]["reason"] == "least_loaded"
    assert not d.record["prompt_tokens_estimated"]


def test_short_prompt_goes_colocated_by_locality() -> None:
    d = schedule(SchedRequest(prompt_chars=400, prompt_tokens=100), ALL, {"c1": 400}, POLICY)
    assert (d.mode, d.instance) == ("colocated", COLO[0])
    assert d.record["mode_reason"] == "heatmap"
    assert d.record["picks"]["instance"]["reason"] == "prefix_match"


def test_max_tokens_feeds_the_prediction() -> None:
    req = SchedRequest(prompt_chars=400, prompt_tokens=100, max_tokens=10)
    d = schedule(req, ALL, {}, POLICY)
    assert d.record["predicted_decode_tokens"] == 10


@pytest.mark.parametrize(
    "req", [SchedRequest(8000, 2000, n=2), SchedRequest(8000, 2000, echo=True)]
)
def test_n_and_echo_force_colocated(req: SchedRequest) -> None:
    d = schedule(req, ALL, {}, POLICY)
    assert (d.mode, d.instance) == ("colocated", COLO[1])
    assert d.record["mode_reason"] == ("n_gt_1" if req.n > 1 else "echo")


def test_n_without_colocated_group_uses_the_pair() -> None:
    d = schedule(SchedRequest(8000, 2000, n=2), Groups((), PREFILL, DECODE), {}, POLICY)
    assert d.mode == "disaggregated" and d.routed


def test_pair_without_ready_decode_falls_back_to_colocated() -> None:
    d = schedule(SchedRequest(8000, 2000), Groups(COLO, PREFILL, ()), {}, POLICY)
    assert (d.mode, d.record["mode_reason"]) == ("colocated", "only_colocated_ready")
    excluded = frozenset({"d1", "d2"})
    d = schedule(SchedRequest(8000, 2000), ALL, {}, POLICY, exclude=excluded)
    assert (d.mode, d.instance) == ("colocated", COLO[1])
    assert d.record["excluded"] == ["d1", "d2"]


def test_only_pair_group_serves_colocated_shapes() -> None:
    d = schedule(SchedRequest(400, 100), Groups((), PREFILL, DECODE), {}, POLICY)
    assert (d.mode, d.record["mode_reason"]) == ("disaggregated", "only_disaggregated_ready")
    assert (d.prefill, d.decode) == (PREFILL[0], DECODE[1])


def test_nothing_usable() -> None:
    d = schedule(SchedRequest(400), Groups(), {})
    assert (d.mode, d.routed, d.instance_ids) == ("colocated", False, ())
    assert d.record["mode_reason"] == "none_ready"
    assert d.record["picks"]["instance"]["reason"] == "no_candidates"
    d = schedule(SchedRequest(400), Groups(COLO), {}, exclude=frozenset({"c1", "c2"}))
    assert not d.routed


def test_default_mode_disaggregated() -> None:
    policy = SchedPolicy(default_mode="disaggregated")
    d = schedule(SchedRequest(400), ALL, {}, policy)
    assert (d.mode, d.prefill, d.decode) == ("disaggregated", PREFILL[0], DECODE[1])


def test_imbalanced_prefill_group_is_load_aware() -> None:
    prefill = [inst("p1", 0), inst("p2", 200)]
    d = schedule(SchedRequest(8000, 2000), Groups(COLO, prefill, DECODE), {"p2": 8000}, POLICY)
    assert d.prefill == prefill[0]
    assert d.record["picks"]["prefill"]["reason"] == "imbalanced"


def test_record_is_json_safe() -> None:
    d = schedule(SchedRequest(8000, 2000, max_tokens=50), ALL, {"p1": 64}, POLICY)
    assert json.loads(json.dumps(d.record, allow_nan=False)) == d.record


def test_decision_routed_by_mode() -> None:
    assert not Decision("disaggregated", prefill=inst("p")).routed
    assert Decision("disaggregated", prefill=inst("p"), decode=inst("d")).routed


def test_with_a_real_prefix_index() -> None:
    idx = PrefixIndex(chunk_chars=16)
    system = "You are a careful reviewer of pull requests. " * 4
    first = schedule(SchedRequest(len(system) + 10), ALL, idx.match(system + "review #1"))
    assert first.instance == COLO[1]
    idx.insert(first.instance_ids[0], system + "review #1")
    busy = Groups([inst("c1", 0), inst("c2", 5)], PREFILL, DECODE)
    second = schedule(SchedRequest(len(system) + 10), busy, idx.match(system + "review #2"))
    assert second.instance_ids == ("c2",)  # locality beats the idle c1 while balanced
    assert second.record["picks"]["instance"]["reason"] == "prefix_match"


def test_a_far_busier_group_loses_the_request_to_the_other() -> None:
    """The heatmap says colocated; with the colocated group 4 deep per instance and the pair's
    decode side idle, the request goes to the pair, and back when the pair is the busy one."""
    req = SchedRequest(prompt_chars=400, prompt_tokens=100)
    busy_colocated = Groups([inst("c1", 5), inst("c2", 4)], PREFILL, [inst("d1", 0), inst("d2", 1)])
    d = schedule(req, busy_colocated, {}, POLICY)
    assert (d.mode, d.record["mode_reason"]) == ("disaggregated", "group_imbalanced")
    assert d.record["colocated_mean_inflight"] == 4.5 and d.record["decode_mean_inflight"] == 0.5
    # Within the thresholds (gap 2, not more) the heatmap's choice stands.
    near = Groups([inst("c1", 3), inst("c2", 3)], PREFILL, [inst("d1", 1), inst("d2", 1)])
    assert schedule(req, near, {}, POLICY).mode == "colocated"
    long_req = SchedRequest(prompt_chars=8000, prompt_tokens=2000)
    busy_pair = Groups(COLO, PREFILL, [inst("d1", 9), inst("d2", 7)])
    d = schedule(long_req, busy_pair, {}, POLICY)
    assert (d.mode, d.record["mode_reason"]) == ("colocated", "group_imbalanced")
