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
