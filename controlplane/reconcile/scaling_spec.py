"""How a deployment's mode, group sizes and autoscaling follow from `deploy`, `scale` and
`deployments update`.

The rule (docs/scaling.md, "Autoscaling"): autoscaling is on when `max_replicas` is set.
`min_replicas` then defaults to 0, the other knobs to the peers' defaults, and each group's count
is the one it starts from (default: 1 within the bounds, as Knative's initial scale). Without
`max_replicas` every group keeps exactly its count (default 1). On an autoscaled deployment a
count (what `deepflow scale` sets) moves that group within the bounds; a count outside them is
refused, and `autoscaling: false` turns autoscaling off.

The groups (docs/pd.md, "Deployment modes and groups"): the mode says which groups a deployment
has (`groups.roles_of`); a group it does not have is 0 and may only be given as 0. A mode may
change only to one that shares a group with it (through auto); a group the new mode adds starts
at 1 (within the bounds) unless given, and a group it drops goes to 0.

Mode semi-pd also carries its instances' settings (reconcile/semi_pd.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from controlplane import wire
from controlplane.errors import InvalidRequest
from controlplane.reconcile import semi_pd
from controlplane.reconcile.autoscale import AutoscaleConfig
from controlplane.reconcile.groups import (
    COLOCATED,
    COUNT_FIELD,
    DECODE,
    PREFILL,
    ROLES,
    SEMI_PD,
    roles_of,
    safe_mode_change,
)

KNOBS = (
    "min_replicas",
    "target_concurrency",
    "upscale_delay_s",
    "downscale_delay_s",
    "scale_to_zero_after_s",
)


@dataclass(slots=True, frozen=True)
class ScalingSpec:
    replicas: int  # the colocated group
    autoscale: AutoscaleConfig | None = None  # the same bounds and knobs for every group
    mode: str = "colocated"
    prefill_replicas: int = 0
    decode_replicas: int = 0
    semi_pd: wire.SemiPDConfig | None = None  # mode semi-pd's instance settings

    def group(self, role: str) -> int:
        return int(getattr(self, COUNT_FIELD[role]))

    def groups(self) -> dict[str, int]:
        """Every group of the mode and its count."""
        return {role: self.group(role) for role in roles_of(self.mode)}


def for_create(body: wire.DeploymentCreate) -> ScalingSpec:
    if body.max_replicas is None:
        _refuse_knobs_without_max(body)
        config = None
    else:
        config = _config(AutoscaleConfig(max_replicas=body.max_replicas), body)
    counts: dict[str, int] = {
        role: _count(body, role, body.mode, config, None, body.name) for role in ROLES
    }
    return _spec(counts, config, body.mode, semi_pd.for_create(body))


def for_update(name: str, current: ScalingSpec, body: wire.DeploymentUpdate) -> ScalingSpec:
    mode = current.mode if body.mode is None else body.mode
    if not safe_mode_change(current.mode, mode):
        raise InvalidRequest(
            f"deployment {name!r} cannot go from {current.mode} to {mode} at once: the two "
            f"modes share no instance group, so nothing would serve while the new one starts; "
            f"change the mode to auto first, then to {mode} once its groups are ready",
            param="mode",
            code="unsafe_mode_change",
        )
    config = _updated_config(current.autoscale, body)
    counts: dict[str, int] = {
        role: _count(body, role, mode, config, current, name) for role in ROLES
    }
    return _spec(counts, config, mode, semi_pd.for_update(name, current.semi_pd, mode, body))


def _spec(
    counts: dict[str, int],
    config: AutoscaleConfig | None,
    mode: str,
    semi_pd_config: wire.SemiPDConfig | None,
) -> ScalingSpec:
    return ScalingSpec(
        counts[COLOCATED], config, mode, counts[PREFILL], counts[DECODE], semi_pd_config
    )


def _count(
    body: wire.DeploymentCreate | wire.DeploymentUpdate,
    role: str,
    mode: str,
    config: AutoscaleConfig | None,
    current: ScalingSpec | None,
    name: str,
) -> int:
    """One group's count: given, kept (a group the deployment already had) or the default."""
    field = COUNT_FIELD[role]
    given: int | None = getattr(body, field)
    if role not in roles_of(mode):
        if given:
            hint = (
                "each semi-PD instance runs its own prefill and decode workers; size it with "
                "replicas"
                if mode == SEMI_PD
                else "mode auto runs colocated, prefill and decode groups"
            )
            raise InvalidRequest(
                f"a {mode} deployment has no {role} group, so {field} must be left out or 0 "
                f"({hint})",
                param=field,
                code="group_not_in_mode",
            )
        return 0
    if given is not None:
        return given if config is None else _within(given, config, name, role)
    if current is not None and role in roles_of(current.mode):
        kept = current.group(role)
        return kept if config is None else config.clamp(kept)
    return 1 if config is None else config.clamp(1)


def _updated_config(
    base: AutoscaleConfig | None, body: wire.DeploymentUpdate
) -> AutoscaleConfig | None:
    if body.autoscaling is False:
        if body.max_replicas is not None:
            raise InvalidRequest(
                "autoscaling: false and max_replicas contradict each other", param="autoscaling"
            )
        _refuse_knobs_without_max(body)
        return None
    if base is None:
        if body.max_replicas is None:
            _refuse_knobs_without_max(body)
            if body.autoscaling:
                raise InvalidRequest(
                    "turning autoscaling on needs max_replicas", param="max_replicas"
                )
            return None
        base = AutoscaleConfig(max_replicas=body.max_replicas)
    max_replicas = base.max_replicas if body.max_replicas is None else body.max_replicas
    return _config(base, body, max_replicas=max_replicas)


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


def _within(replicas: int, config: AutoscaleConfig, name: str, role: str) -> int:
    if config.min_replicas <= replicas <= config.max_replicas:
        return replicas
    bounds = f"between {config.min_replicas} and {config.max_replicas} replicas"
    count = str(replicas) if role == COLOCATED else f"{replicas} ({role} group)"
    raise InvalidRequest(
        f"deployment {name!r} autoscales {bounds}; "
        f"{count} is outside them: change min_replicas/max_replicas, or turn autoscaling off",
        param=COUNT_FIELD[role],
        code="replicas_out_of_bounds",
    )


def _refuse_knobs_without_max(body: wire.DeploymentCreate | wire.DeploymentUpdate) -> None:
    given = [k for k in KNOBS if getattr(body, k) is not None]
    if given:
        raise InvalidRequest(
            f"{', '.join(given)} need max_replicas: autoscaling is on only when it is set",
            param=given[0],
        )
