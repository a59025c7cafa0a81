"""Distributed scheduling for a chat request (DeepServe's Algorithm 1), as a pure function.

::

    schedule(request, groups):
        mode = PD-aware choice: heatmap cell of (prompt tokens, predicted decode tokens)
        group = colocated instances, or the prefill group then the decode group
        instance = locality-aware (longest prefix match) if the group is balanced,
                   else load-aware (least in-flight)

Within a group the rule is the SGLang router's cache-aware policy: the group is imbalanced when
``max - min > balance_abs_threshold`` and ``max > balance_rel_threshold * min`` over in-flight
counts; a balanced group sends the request to its longest prefix match when that covers at least
``cache_threshold`` of the prompt, and to its least loaded instance otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from controlplane.routing.decode_predictor import DecodeLengthPredictor, PromptTokenEstimator
from controlplane.routing.pd_heatmap import Mode, PDHeatmap, choose_mode
from controlplane.routing.policy import InstanceLoad, pick_instance


@dataclass(slots=True, frozen=True)
class RouterThresholds:
    cache_threshold: float = 0.3  # share of the prompt an instance must hold to win on locality
    balance_abs_threshold: int = 64  # in-flight gap past which a group may be imbalanced
    balance_rel_threshold: float = 1.5  # and the max/min ratio past which it is
    # Between the colocated group and the pair's decode group (an auto deployment): the mean
    # in-flight per instance of the group the heatmap chose may exceed the other's by this much
    # and by this ratio before the request goes to the other group instead.
    group_balance_abs_threshold: float = 2.0
    group_balance_rel_threshold: float = 1.5

    def __post_init__(self) -> None:
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0: {self.balance_abs_threshold}")
        if self.balance_rel_threshold < 1:
            raise ValueError(f"balance_rel_threshold must be >= 1: {self.balance_rel_threshold}")
        if self.group_balance_abs_threshold < 0 or self.group_balance_rel_threshold < 1:
            raise ValueError("group balance thresholds must be >= 0 (abs) and >= 1 (rel)")


def is_balanced(loads: Sequence[InstanceLoad], thresholds: RouterThresholds) -> bool:
    """False only when both the absolute gap and the ratio of in-flight counts exceed limits."""
    if len(loads) < 2:
        return True
    hi = max(c.inflight for c in loads)
    lo = min(c.inflight for c in loads)
    imbalanced = (
        hi - lo > thresholds.balance_abs_threshold and hi > lo * thresholds.balance_rel_threshold
    )
    return not imbalanced


PickReason = Literal[
    "prefix_match",  # balanced group, the longest match covers >= cache_threshold of the prompt
    "low_match",  # balanced group, no match good enough: least loaded
    "imbalanced",  # imbalanced group: least loaded
    "least_loaded",  # load-only choice (the decode side of a pair)
    "no_candidates",  # every instance of the group is excluded or there are none
]


@dataclass(slots=True, frozen=True)
class Pick:
    instance: InstanceLoad | None
    reason: PickReason
    matched_chars: int = 0  # the chosen instance's prefix match
    balanced: bool = True

    def to_record(self, prompt_chars: int) -> dict[str, Any]:
        return {
            "instance_id": None if self.instance is None else self.instance.id,
            "inflight": None if self.instance is None else self.instance.inflight,
            "reason": self.reason,
            "matched_chars": self.matched_chars,
            "match_ratio": _ratio(self.matched_chars, prompt_chars),
            "balanced": self.balanced,
        }


def _ratio(matched_chars: int, prompt_chars: int) -> float:
    return matched_chars / prompt_chars if prompt_chars > 0 else 0.0


def pick_in_group(
    candidates: Sequence[InstanceLoad],
    matches: Mapping[str, int],
    prompt_chars: int,
    thresholds: RouterThresholds,
    exclude: frozenset[str] = frozenset(),
) -> Pick:
    """Locality-aware when the group is balanced, load-aware when it is not.

    ``matches`` maps instance ids to matched prompt characters (absent = 0). Ties on match go to
    the less loaded instance, then the lower id; ties on load go to the lower id.
    """
    usable = [c for c in candidates if c.id not in exclude]
    if not usable:
        return Pick(None, "no_candidates")
    balanced = is_balanced(usable, thresholds)
    if balanced:
        best = min(usable, key=lambda c: (-matches.get(c.id, 0), c.inflight, c.id))
        matched = matches.get(best.id, 0)
        if matched > 0 and _ratio(matched, prompt_chars) >= thresholds.cache_threshold:
            return Pick(best, "prefix_match", matched, balanced)
    least = pick_instance(usable)
    assert least is not None
    reason: PickReason = "low_match" if balanced else "imbalanced"
    return Pick(least, reason, matches.get(least.id, 0), balanced)


@dataclass(slots=True, frozen=True)
class SchedRequest:
    """What the scheduler needs to know of a chat request."""

    prompt_chars: int
    prompt_tokens: int | None = None  # when known; otherwise estimated from prompt_chars
    max_tokens: int | None = None
    n: int = 1
    echo: bool = False


@dataclass(slots=True, frozen=True)
class Groups:
    """A deployment's ready instances by role."""

    colocated: Sequence[InstanceLoad] = ()
    prefill: Sequence[InstanceLoad] = ()
    decode: Sequence[InstanceLoad] = ()


@dataclass(slots=True, frozen=True)
class SchedPolicy:
    """A deployment's learned models and knobs; the defaults route on load and locality only."""

    heatmap: PDHeatmap | None = None
    predictor: DecodeLengthPredictor = field(default_factory=DecodeLengthPredictor)
    estimator: PromptTokenEstimator = field(default_factory=PromptTokenEstimator)
    thresholds: RouterThresholds = field(default_factory=RouterThresholds)
    default_mode: Mode = "colocated"


@dataclass(slots=True, frozen=True)
class Decision:
    """The chosen mode and instance(s), plus ``record``: every input and reason, JSON-safe."""

    mode: Mode
    instance: InstanceLoad | None = None  # mode colocated
    prefill: InstanceLoad | None = None  # mode disaggregated
    decode: InstanceLoad | None = None  # mode disaggregated
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def routed(self) -> bool:
        if self.mode == "colocated":
            return self.instance is not None
        return self.prefill is not None and self.decode is not None

    @property
    def instance_ids(self) -> tuple[str, ...]:
        chosen = (self.instance,) if self.mode == "colocated" else (self.prefill, self.decode)
        return tuple(i.id for i in chosen if i is not None)


def schedule(
    request: SchedRequest,
    groups: Groups,
    matches: Mapping[str, int],
    policy: SchedPolicy | None = None,
    exclude: frozenset[str] = frozenset(),
) -> Decision:
    """Pick the mode, then the instance (colocated) or the prefill and decode instances (pair).

    The prefill instance is chosen by prefix match (it computes the prompt's KV), the decode
    instance by load alone. Requests with ``n > 1`` or ``echo`` go colocated whenever a colocated
    instance is usable. ``Decision.routed`` is False when no usable group exists. Without a
    ``policy`` the defaults of ``SchedPolicy`` apply.
    """
    policy = policy or SchedPolicy()
    estimated = request.prompt_tokens is None
    prompt_tokens = (
        policy.estimator.estimate(request.prompt_chars)
        if request.prompt_tokens is None
        else request.prompt_tokens
    )
    predicted = policy.predictor.predict(prompt_tokens, request.max_tokens)

    def usable(group: Sequence[InstanceLoad]) -> bool:
        return any(c.id not in exclude for c in group)

    colocated_ready = usable(groups.colocated)
    disaggregated_ready = usable(groups.prefill) and usable(groups.decode)
    choice = choose_mode(
        policy.heatmap,
        prompt_tokens,
        predicted,
        colocated_ready=colocated_ready,
        disaggregated_ready=disaggregated_ready,
        default=policy.default_mode,
    )
    mode, mode_reason = choice.mode, str(choice.reason)
    colocated_load = _mean_inflight(groups.colocated, exclude)
    decode_load = _mean_inflight(groups.decode, exclude)
    if colocated_ready and (request.n > 1 or request.echo):
        mode, mode_reason = "colocated", "n_gt_1" if request.n > 1 else "echo"
    elif colocated_ready and disaggregated_ready:
        # The heatmap ranks the modes at equal load; a group far busier than the other loses.
        chosen, other = (
            (colocated_load, decode_load) if mode == "colocated" else (decode_load, colocated_load)
        )
        if _overloaded(chosen, other, policy.thresholds):
            mode = "disaggregated" if mode == "colocated" else "colocated"
            mode_reason = "group_imbalanced"

    record: dict[str, Any] = {
        "prompt_chars": request.prompt_chars,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_estimated": estimated,
        "max_tokens": request.max_tokens,
        "n": request.n,
        "echo": request.echo,
        "predicted_decode_tokens": predicted,
        "mode": mode,
        "mode_reason": mode_reason,
        "heatmap_cell": None if choice.cell is None else list(choice.cell),
        "heatmap_value": choice.value,
        "colocated_ready": colocated_ready,
        "disaggregated_ready": disaggregated_ready,
        "colocated_mean_inflight": colocated_load,
        "decode_mean_inflight": decode_load,
        "excluded": sorted(exclude),
    }
    thresholds = policy.thresholds
    if mode == "colocated":
        pick = pick_in_group(groups.colocated, matches, request.prompt_chars, thresholds, exclude)
        record["picks"] = {"instance": pick.to_record(request.prompt_chars)}
        return Decision(mode, instance=pick.instance, record=record)

    prefill = pick_in_group(groups.prefill, matches, request.prompt_chars, thresholds, exclude)
    least = pick_instance(groups.decode, exclude)
    decode = Pick(least, "least_loaded" if least is not None else "no_candidates")
    record["picks"] = {
        "prefill": prefill.to_record(request.prompt_chars),
        "decode": decode.to_record(request.prompt_chars),
    }
    return Decision(mode, prefill=prefill.instance, decode=decode.instance, record=record)


def _mean_inflight(group: Sequence[InstanceLoad], exclude: frozenset[str]) -> float | None:
    loads = [c.inflight for c in group if c.id not in exclude]
    return sum(loads) / len(loads) if loads else None


def _overloaded(chosen: float | None, other: float | None, thresholds: RouterThresholds) -> bool:
    """The chosen group's mean in-flight exceeds the other's past both group thresholds."""
    if chosen is None or other is None:
        return False
    return (
        chosen - other > thresholds.group_balance_abs_threshold
        and chosen > other * thresholds.group_balance_rel_threshold
    )
