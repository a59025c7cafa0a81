"""Mode semi-pd in the decisions: its settings on deploy and update (reconcile/semi_pd.py through
scaling_spec), the wire's bounds, and the planner replacing instances whose settings changed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from controlplane import wire
from controlplane.errors import InvalidRequest
from controlplane.reconcile.autoscale import AutoscaleConfig
from controlplane.reconcile.groups import pd_scheduled, roles_of, safe_mode_change
from controlplane.reconcile.planner import (
    DeploymentView,
    DrainInstance,
    InstanceView,
    NodeView,
    StartInstance,
    StopInstance,
    plan,
)
from controlplane.reconcile.scaling_spec import ScalingSpec, for_create, for_update
from controlplane.states import InstanceState, NodeState

SLOS = {"slo_ttft_ms": 300.0, "slo_tpot_ms": 50.0}
CONFIG = wire.SemiPDConfig(slo_ttft_ms=300, slo_tpot_ms=50)


def create(**fields: object) -> ScalingSpec:
    return for_create(wire.DeploymentCreate(name="d", model="m", **fields))  # type: ignore[arg-type]


def update(current: ScalingSpec, **fields: object) -> ScalingSpec:
    return for_update("d", current, wire.DeploymentUpdate(**fields))  # type: ignore[arg-type]


SEMI = ScalingSpec(2, None, "semi-pd", semi_pd=CONFIG)


def test_semi_pd_is_one_colocated_group_routed_as_colocated() -> None:
    assert roles_of("semi-pd") == ("colocated",)
    assert not pd_scheduled("semi-pd") and not pd_scheduled("colocated")
    assert pd_scheduled("auto") and pd_scheduled("disaggregated")
    assert safe_mode_change("colocated", "semi-pd") and safe_mode_change("semi-pd", "auto")
    assert not safe_mode_change("semi-pd", "disaggregated")


def test_create_stores_the_slos_and_the_optional_split() -> None:
    spec = create(mode="semi-pd", **SLOS)
    assert spec == ScalingSpec(1, None, "semi-pd", semi_pd=CONFIG)
    assert spec.groups() == {"colocated": 1}
    tuned = create(mode="semi-pd", replicas=3, semi_pd_split=30, semi_pd_static=True, **SLOS)
    assert tuned.replicas == 3
    assert tuned.semi_pd == wire.SemiPDConfig(
        slo_ttft_ms=300, slo_tpot_ms=50, split=30, static=True
    )
    autoscaled = create(mode="semi-pd", max_replicas=4, **SLOS)
    assert autoscaled.autoscale == AutoscaleConfig(max_replicas=4)
    assert create().semi_pd is None


@pytest.mark.parametrize("missing", ["slo_ttft_ms", "slo_tpot_ms"])
def test_semi_pd_needs_both_slos(missing: str) -> None:
    given = {k: v for k, v in SLOS.items() if k != missing}
    with pytest.raises(InvalidRequest) as err:
        create(mode="semi-pd", **given)
    assert err.value.param == missing and err.value.code == "semi_pd_slo_required"
    assert "needs both SLOs" in err.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"slo_ttft_ms": 100}, "slo_ttft_ms"),
        ({"mode": "auto", "semi_pd_split": 40}, "semi_pd_split"),
        ({"mode": "disaggregated", "semi_pd_static": True, "slo_tpot_ms": 5}, "slo_tpot_ms"),
    ],
)
def test_semi_pd_settings_outside_the_mode_are_refused(
    fields: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequest) as err:
        create(**fields)
    assert err.value.param == param and err.value.code == "semi_pd_not_in_mode"
    assert "mode semi-pd" in err.value.message


@pytest.mark.parametrize("field", ["prefill_replicas", "decode_replicas"])
def test_semi_pd_has_no_prefill_or_decode_group(field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        create(mode="semi-pd", **{field: 1}, **SLOS)
    assert err.value.param == field and err.value.code == "group_not_in_mode"
    assert "semi-PD instance runs its own prefill and decode" in err.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"slo_ttft_ms": 0},
        {"slo_tpot_ms": -5},
        {"slo_ttft_ms": float("inf")},
        {"slo_tpot_ms": float("nan")},
        {"semi_pd_split": 0},
        {"semi_pd_split": 100},
    ],
)
def test_the_wire_takes_positive_finite_slos_and_a_split_in_1_99(fields: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        wire.DeploymentCreate(name="d", model="m", mode="semi-pd", **fields)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        wire.DeploymentUpdate(**fields)  # type: ignore[arg-type]


def test_update_keeps_what_it_does_not_give() -> None:
    faster = update(SEMI, slo_ttft_ms=200)
    assert faster.semi_pd == wire.SemiPDConfig(slo_ttft_ms=200, slo_tpot_ms=50)
    assert faster.replicas == 2
    static = update(faster, semi_pd_split=70, semi_pd_static=True)
    assert static.semi_pd == wire.SemiPDConfig(
        slo_ttft_ms=200, slo_tpot_ms=50, split=70, static=True
    )
    assert update(static, semi_pd_static=False).semi_pd == faster.semi_pd.model_copy(  # type: ignore[union-attr]
        update={"split": 70}
    )
    assert update(SEMI, replicas=4) == ScalingSpec(4, None, "semi-pd", semi_pd=CONFIG)


def test_mode_changes_to_and_from_semi_pd() -> None:
    assert update(ScalingSpec(2), mode="semi-pd", **SLOS) == SEMI
    with pytest.raises(InvalidRequest) as err:
        update(ScalingSpec(2), mode="semi-pd", slo_ttft_ms=300)
    assert err.value.code == "semi_pd_slo_required" and err.value.param == "slo_tpot_ms"
    with pytest.raises(InvalidRequest) as err:
        update(ScalingSpec(2), slo_ttft_ms=300)  # still colocated
    assert err.value.code == "semi_pd_not_in_mode"
    assert update(SEMI, mode="colocated") == ScalingSpec(2)  # the settings go with the mode
    assert update(SEMI, mode="auto") == ScalingSpec(2, None, "auto", 1, 1)
    with pytest.raises(InvalidRequest) as err:
        update(SEMI, mode="auto", slo_ttft_ms=10)
    assert err.value.code == "semi_pd_not_in_mode"
    with pytest.raises(InvalidRequest) as err:
        update(SEMI, mode="disaggregated")
    assert err.value.code == "unsafe_mode_change"


# -- the planner: instances of other settings are replaced ----------------------------------------

NOW = 100.0
NODES = [NodeView("n1", "http://n1", NodeState.READY, NOW)]
OTHER = wire.SemiPDConfig(slo_ttft_ms=900, slo_tpot_ms=90)


def inst(
    iid: str, state: InstanceState, semi_pd: wire.SemiPDConfig | None, inflight: int = 0
) -> InstanceView:
    return InstanceView(iid, "d", "n1", state, inflight, 1.0, 1.0, "colocated", semi_pd)


def semi(replicas: int, config: wire.SemiPDConfig | None = CONFIG) -> DeploymentView:
    return DeploymentView("d", "m", replicas, mode="semi-pd", semi_pd=config)


def run(dep: DeploymentView, instances: list[InstanceView]) -> list[object]:
    return list(plan([dep], instances, NODES, now=NOW, node_timeout_s=10.0))


def test_semi_pd_instances_start_with_the_settings() -> None:
    assert run(semi(2), []) == [
        StartInstance("d", "m", "n1", "colocated", CONFIG),
        StartInstance("d", "m", "n1", "colocated", CONFIG),
    ]
    assert run(semi(1), [inst("s1", InstanceState.READY, CONFIG)]) == []


def test_outdated_instances_serve_until_their_replacements_are_ready() -> None:
    why = "replaced: semi-PD settings changed"
    # colocated -> semi-pd: the plain instances are outdated; replacements start, none drains.
    plain = [inst("c1", InstanceState.READY, None), inst("c2", InstanceState.READY, None)]
    assert run(semi(2), plain) == [
        StartInstance("d", "m", "n1", "colocated", CONFIG),
        StartInstance("d", "m", "n1", "colocated", CONFIG),
    ]
    # One replacement ready: one outdated instance (the least busy) drains, never below 2 ready.
    plain[0] = inst("c1", InstanceState.READY, None, inflight=3)
    halfway = [
        *plain,
        inst("s1", InstanceState.READY, CONFIG),
        inst("s2", InstanceState.STARTING, CONFIG),
    ]
    assert run(semi(2), halfway) == [DrainInstance("c2", why)]
    done = [
        *plain,
        inst("s1", InstanceState.READY, CONFIG),
        inst("s2", InstanceState.READY, CONFIG),
    ]
    assert run(semi(2), done) == [DrainInstance("c2", why), DrainInstance("c1", why)]
    # An outdated instance that is not ready yet drains at once.
    starting = [inst("o1", InstanceState.STARTING, OTHER)]
    assert run(semi(1), starting) == [
        StartInstance("d", "m", "n1", "colocated", CONFIG),
        DrainInstance("o1", why),
    ]
    drained = [inst("o1", InstanceState.DRAINING, OTHER), inst("s1", InstanceState.READY, CONFIG)]
    assert run(semi(1), drained) == [StopInstance("o1", "drained")]


def test_leaving_semi_pd_replaces_the_semi_pd_instances() -> None:
    colocated = DeploymentView("d", "m", 1)
    running = [inst("s1", InstanceState.READY, CONFIG)]
    assert run(colocated, running) == [StartInstance("d", "m", "n1", "colocated")]
    running.append(inst("c1", InstanceState.READY, None))
    assert run(colocated, running) == [DrainInstance("s1", "replaced: semi-PD settings changed")]
    # Scaled to zero meanwhile: nothing is started and everything drains.
    assert run(semi(0), [inst("c1", InstanceState.READY, None)]) == [
        DrainInstance("c1", "replaced: semi-PD settings changed")
    ]
