"""How a deployment's replica settings follow from `deploy`, `scale` and `deployments update`.

The rule (docs/scaling.md, "Autoscaling"): autoscaling is on when `max_replicas` is set.
`min_replicas` then defaults to 0, the other knobs to the peers' defaults, and `replicas` is the
starting count (default: 1 within the bounds, as Knative's initial scale). Without
`max_replicas` the deployment keeps exactly `replicas` (default 1). On an autoscaled deployment,
`replicas` (what `deepflow scale` sets) moves the desired count within the bounds; a count
outside them is refused, and `autoscaling: false` turns autoscaling off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from controlplane import wire
from controlplane.errors import InvalidRequest
from controlplane.reconcile.autoscale import AutoscaleConfig

KNOBS = (
    "min_replicas",
    "target_concurrency",
    "upscale_delay_s",
    "downscale_delay_s",
    "scale_to_zero_after_s",
)


@dataclass(slots=True, frozen=True)
class ScalingSpec:
    replicas: int
    autoscale: AutoscaleConfig | None = None


def for_create(body: wire.DeploymentCreate) -> ScalingSpec:
    if body.max_replicas is None:
        _refuse_knobs_without_max(body)
        return ScalingSpec(1 if body.replicas is None else body.replicas)
    config = _config(AutoscaleConfig(max_replicas=body.max_replicas), body)
    start = config.clamp(1) if body.replicas is None else _within(body.replicas, config, body.name)
    return ScalingSpec(start, config)


def for_update(name: str, current: ScalingSpec, body: wire.DeploymentUpdate) -> ScalingSpec:
    if body.autoscaling is False:
        if body.max_replicas is not None:
            raise InvalidRequest(
                "autoscaling: false and max_replicas contradict each other", param="autoscaling"
            )
        _refuse_knobs_without_max(body)
        return ScalingSpec(current.replicas if body.replicas is None else body.replicas)
    base = current.autoscale
    if base is None:
        if body.max_replicas is None:
            _refuse_knobs_without_max(body)
            if body.autoscaling:
                raise InvalidRequest(
                    "turning autoscaling on needs max_replicas", param="max_replicas"
                )
            return ScalingSpec(current.replicas if body.replicas is None else body.replicas)
        base = AutoscaleConfig(max_replicas=body.max_replicas)
    max_replicas = base.max_replicas if body.max_replicas is None else body.max_replicas
    config = _config(base, body, max_replicas=max_replicas)
    if body.replicas is None:
        return ScalingSpec(config.clamp(current.replicas), config)
    return ScalingSpec(_within(body.replicas, config, name), config)


def config_fields(spec: ScalingSpec) -> dict[str, Any]:
    """The deployments row's autoscaling columns for a spec (all None when it is off)."""
    names = ("max_replicas", *KNOBS)
    if spec.autoscale is None:
        return dict.fromkeys(names)
    return {name: getattr(spec.autoscale, name) for name in names}


def _config(
    base: AutoscaleConfig,
    body: wire.DeploymentCreate | wire.DeploymentUpdate,
    **overrides: Any,
) -> AutoscaleConfig:
    given = {k: getattr(body, k) for k in KNOBS if getattr(body, k) is not None}
    try:
        return dataclasses.replace(base, **given, **overrides)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="min_replicas") from exc


def _within(replicas: int, config: AutoscaleConfig, name: str) -> int:
    if config.min_replicas <= replicas <= config.max_replicas:
        return replicas
    bounds = f"between {config.min_replicas} and {config.max_replicas} replicas"
    raise InvalidRequest(
        f"deployment {name!r} autoscales {bounds}; "
        f"{replicas} is outside them: change min_replicas/max_replicas, or turn autoscaling off",
        param="replicas",
        code="replicas_out_of_bounds",
    )


def _refuse_knobs_without_max(body: wire.DeploymentCreate | wire.DeploymentUpdate) -> None:
    given = [k for k in KNOBS if getattr(body, k) is not None]
    if given:
        raise InvalidRequest(
            f"{', '.join(given)} need max_replicas: autoscaling is on only when it is set",
            param=given[0],
        )
