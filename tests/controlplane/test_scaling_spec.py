"""How deploy, scale and update set a deployment's replicas and autoscaling."""

from __future__ import annotations

import pytest

from controlplane import wire
from controlplane.errors import InvalidRequest
from controlplane.reconcile.autoscale import AutoscaleConfig
from controlplane.reconcile.scaling_spec import ScalingSpec, config_fields, for_create, for_update


def create(**fields: object) -> ScalingSpec:
    return for_create(wire.DeploymentCreate(name="d", model="m", **fields))  # type: ignore[arg-type]


def update(current: ScalingSpec, **fields: object) -> ScalingSpec:
    return for_update("d", current, wire.DeploymentUpdate(**fields))  # type: ignore[arg-type]


AUTO = ScalingSpec(1, AutoscaleConfig(min_replicas=0, max_replicas=4))


def test_replicas_alone_is_fixed() -> None:
    assert create() == ScalingSpec(1)
    assert create(replicas=3) == ScalingSpec(3)
    assert config_fields(create(replicas=0))["max_replicas"] is None


def test_max_replicas_turns_autoscaling_on_with_defaults() -> None:
    spec = create(max_replicas=4)
    assert spec == ScalingSpec(1, AutoscaleConfig(min_replicas=0, max_replicas=4))
    assert create(max_replicas=4, replicas=0).replicas == 0
    assert create(max_replicas=4, min_replicas=2).replicas == 2
    tuned = create(max_replicas=4, target_concurrency=8, scale_to_zero_after_s=5)
    assert tuned.autoscale is not None
    assert tuned.autoscale.target_concurrency == 8 and tuned.autoscale.scale_to_zero_after_s == 5
    assert config_fields(tuned)["upscale_delay_s"] == 30


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"min_replicas": 1}, "min_replicas"),
        ({"target_concurrency": 4}, "target_concurrency"),
        ({"max_replicas": 2, "min_replicas": 3}, "min_replicas"),
        ({"max_replicas": 2, "replicas": 3}, "replicas"),
    ],
)
def test_bad_creates_name_the_field(fields: dict[str, int], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        create(**fields)
    assert err.value.param == param


def test_scale_of_an_autoscaled_deployment_stays_within_bounds() -> None:
    assert update(AUTO, replicas=3) == ScalingSpec(3, AUTO.autoscale)
    with pytest.raises(InvalidRequest) as err:
        update(AUTO, replicas=5)
    assert err.value.code == "replicas_out_of_bounds"
    assert "autoscales between 0 and 4 replicas" in err.value.message


def test_update_changes_bounds_and_turns_autoscaling_on_and_off() -> None:
    narrowed = update(ScalingSpec(4, AUTO.autoscale), max_replicas=2, target_concurrency=3)
    assert narrowed.replicas == 2 and narrowed.autoscale is not None
    assert narrowed.autoscale.max_replicas == 2 and narrowed.autoscale.target_concurrency == 3
    on = update(ScalingSpec(3), max_replicas=8, min_replicas=1)
    assert on == ScalingSpec(3, AutoscaleConfig(min_replicas=1, max_replicas=8))
    assert update(AUTO, autoscaling=False) == ScalingSpec(1)
    assert update(AUTO, autoscaling=False, replicas=2) == ScalingSpec(2)
    assert update(ScalingSpec(2), replicas=5) == ScalingSpec(5)
    with pytest.raises(InvalidRequest):
        update(ScalingSpec(2), min_replicas=1)
    with pytest.raises(InvalidRequest):
        update(ScalingSpec(2), autoscaling=True)


# -- modes and instance groups (docs/pd.md) ------------------------------------------------------


def test_each_mode_has_its_groups_with_their_defaults() -> None:
    assert create().groups() == {"colocated": 1}
    disaggregated = create(mode="disaggregated")
    assert disaggregated == ScalingSpec(0, None, "disaggregated", 1, 1)
    assert disaggregated.groups() == {"prefill": 1, "decode": 1}
    assert create(mode="disaggregated", prefill_replicas=2, decode_replicas=3, replicas=0) == (
        ScalingSpec(0, None, "disaggregated", 2, 3)
    )
    assert create(mode="auto") == ScalingSpec(1, None, "auto", 1, 1)
    assert create(mode="auto", replicas=0, decode_replicas=2).groups() == {
        "colocated": 0,
        "prefill": 1,
        "decode": 2,
    }


def test_autoscaled_groups_start_within_the_bounds() -> None:
    spec = create(mode="disaggregated", max_replicas=4, min_replicas=2)
    assert (spec.replicas, spec.prefill_replicas, spec.decode_replicas) == (0, 2, 2)
    with pytest.raises(InvalidRequest) as err:
        create(mode="disaggregated", max_replicas=4, decode_replicas=5)
    assert err.value.param == "decode_replicas" and err.value.code == "replicas_out_of_bounds"
    assert "5 (decode group) is outside them" in err.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prefill_replicas": 1}, "prefill_replicas"),
        ({"mode": "colocated", "decode_replicas": 2}, "decode_replicas"),
        ({"mode": "disaggregated", "replicas": 1}, "replicas"),
    ],
)
def test_a_group_outside_the_mode_is_refused(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        create(**fields)
    assert err.value.param == param and err.value.code == "group_not_in_mode"
    assert "no " in err.value.message and "group" in err.value.message


def test_a_group_outside_the_mode_may_be_given_as_zero() -> None:
    assert create(prefill_replicas=0, decode_replicas=0) == ScalingSpec(1)
    assert create(mode="disaggregated", replicas=0).replicas == 0


PD = ScalingSpec(0, None, "disaggregated", 2, 1)


def test_update_resizes_one_group_and_keeps_the_others() -> None:
    assert update(PD, decode_replicas=3) == ScalingSpec(0, None, "disaggregated", 2, 3)
    with pytest.raises(InvalidRequest) as err:
        update(PD, replicas=2)
    assert err.value.param == "replicas"
    auto_pd = ScalingSpec(0, AutoscaleConfig(max_replicas=4), "disaggregated", 2, 1)
    assert update(auto_pd, max_replicas=1).groups() == {"prefill": 1, "decode": 1}
    with pytest.raises(InvalidRequest) as err:
        update(auto_pd, prefill_replicas=5)
    assert err.value.code == "replicas_out_of_bounds"


def test_mode_changes_go_through_auto() -> None:
    auto = update(ScalingSpec(2), mode="auto")
    assert auto == ScalingSpec(2, None, "auto", 1, 1)  # new groups start at 1; colocated kept
    assert update(auto, mode="disaggregated") == ScalingSpec(0, None, "disaggregated", 1, 1)
    assert update(PD, mode="auto", replicas=3) == ScalingSpec(3, None, "auto", 2, 1)
    assert update(ScalingSpec(3, None, "auto", 2, 1), mode="colocated") == ScalingSpec(3)
    for current, mode in ((ScalingSpec(2), "disaggregated"), (PD, "colocated")):
        with pytest.raises(InvalidRequest) as err:
            update(current, mode=mode)
        assert err.value.code == "unsafe_mode_change" and "auto first" in err.value.message
    with pytest.raises(InvalidRequest):
        update(ScalingSpec(3, None, "auto", 2, 1), mode="colocated", prefill_replicas=1)
