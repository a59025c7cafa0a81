"""SQL of scaling: a deployment's mode, group sizes, autoscaling and semi-PD settings, and its
scaling events (each change of one group's size, and preloads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane import wire
from controlplane.db import tables as t
from controlplane.reconcile import autoscale as a
from controlplane.reconcile.autoscale import AutoscaleConfig
from controlplane.reconcile.groups import COLOCATED, COUNT_FIELD, roles_of
from controlplane.reconcile.scaling_spec import ScalingSpec, config_fields
from controlplane.states import NodeState


def autoscale_config(row: t.Deployment) -> AutoscaleConfig | None:
    if row.max_replicas is None:
        return None
    return AutoscaleConfig(
        min_replicas=row.min_replicas or 0,
        max_replicas=row.max_replicas,
        target_concurrency=_or(row.target_concurrency, a.DEFAULT_TARGET_CONCURRENCY),
        upscale_delay_s=_or(row.upscale_delay_s, a.DEFAULT_UPSCALE_DELAY_S),
        downscale_delay_s=_or(row.downscale_delay_s, a.DEFAULT_DOWNSCALE_DELAY_S),
        scale_to_zero_after_s=_or(row.scale_to_zero_after_s, a.DEFAULT_SCALE_TO_ZERO_AFTER_S),
    )


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def scaling_spec(row: t.Deployment) -> ScalingSpec:
    return ScalingSpec(
        row.replicas,
        autoscale_config(row),
        row.mode,
        row.prefill_replicas,
        row.decode_replicas,
        semi_pd_config(row),
    )


def semi_pd_config(row: t.Deployment) -> wire.SemiPDConfig | None:
    """Mode semi-pd's instance settings; None in the other modes."""
    if row.slo_ttft_ms is None or row.slo_tpot_ms is None:
        return None
    return wire.SemiPDConfig(
        slo_ttft_ms=row.slo_ttft_ms,
        slo_tpot_ms=row.slo_tpot_ms,
        split=row.semi_pd_split,
        static=row.semi_pd_static,
    )


def instance_semi_pd(row: t.Instance) -> wire.SemiPDConfig | None:
    """The semi-PD settings the instance was started with."""
    return None if row.semi_pd is None else wire.SemiPDConfig.model_validate(row.semi_pd)


def group_counts(row: t.Deployment) -> dict[str, int]:
    """Every group of the deployment's mode and its desired count."""
    return {role: getattr(row, COUNT_FIELD[role]) for role in roles_of(row.mode)}


def autoscaling_info(row: t.Deployment) -> wire.AutoscalingInfo | None:
    config = autoscale_config(row)
    if config is None:
        return None
    return wire.AutoscalingInfo(
        min_replicas=config.min_replicas,
        max_replicas=config.max_replicas,
        target_concurrency=config.target_concurrency,
        upscale_delay_s=config.upscale_delay_s,
        downscale_delay_s=config.downscale_delay_s,
        scale_to_zero_after_s=config.scale_to_zero_after_s,
    )


def apply_spec(row: t.Deployment, spec: ScalingSpec) -> None:
    row.mode = spec.mode
    row.replicas = spec.replicas
    row.prefill_replicas = spec.prefill_replicas
    row.decode_replicas = spec.decode_replicas
    for name, value in config_fields(spec).items():
        setattr(row, name, value)
    semi_pd = spec.semi_pd
    row.slo_ttft_ms = None if semi_pd is None else semi_pd.slo_ttft_ms
    row.slo_tpot_ms = None if semi_pd is None else semi_pd.slo_tpot_ms
    row.semi_pd_split = None if semi_pd is None else semi_pd.split
    row.semi_pd_static = semi_pd is not None and semi_pd.static


def record(
    session: Session,
    deployment: str,
    kind: str,
    from_replicas: int,
    to_replicas: int,
    reason: str,
    inputs: dict[str, Any],
    now: float,
    role: str | None = None,
) -> None:
    """One scaling event; `role` names the group whose count changed (None: no one group)."""
    session.add(
        t.ScalingEvent(
            deployment=deployment,
            kind=kind,
            role=role,
            from_replicas=from_replicas,
            to_replicas=to_replicas,
            reason=reason,
            inputs=inputs,
            at=now,
        )
    )


def set_replicas(
    session: Session,
    deployment: str,
    *,
    expected: int,
    replicas: int,
    reason: str,
    inputs: dict[str, Any],
    now: float,
    role: str = COLOCATED,
) -> bool:
    """The autoscaler's write of one group's count: only if the deployment still has that group
    and nobody changed its count since the autoscaler read it."""
    row = session.get(t.Deployment, deployment, with_for_update=True)
    column = COUNT_FIELD[role]
    if row is None or role not in roles_of(row.mode) or getattr(row, column) != expected:
        return False
    setattr(row, column, replicas)
    row.updated_at = now
    record(session, deployment, "autoscale", expected, replicas, reason, inputs, now, role)
    return True


def list_events(session: Session, deployment: str, *, limit: int) -> list[wire.ScalingEventInfo]:
    query = (
        select(t.ScalingEvent)
        .where(t.ScalingEvent.deployment == deployment)
        .order_by(t.ScalingEvent.id.desc())
        .limit(limit)
    )
    return [
        wire.ScalingEventInfo(
            id=e.id,
            deployment=e.deployment,
            kind=e.kind,
            role=e.role,
            from_replicas=e.from_replicas,
            to_replicas=e.to_replicas,
            reason=e.reason,
            inputs=e.inputs,
            at=e.at,
        )
        for e in session.scalars(query)
    ]


@dataclass(slots=True, frozen=True)
class PreloadTargets:
    model_path: str
    replicas: int  # of all its groups
    autoscaled: bool
    node_urls: dict[str, str]  # the ready nodes, by id


def preload_targets(session: Session, deployment: str) -> PreloadTargets | None:
    row = session.get(t.Deployment, deployment)
    if row is None:
        return None
    model = session.get(t.Model, row.model)
    if model is None:
        return None
    nodes = session.scalars(select(t.Node).where(t.Node.state == NodeState.READY.value))
    return PreloadTargets(
        model.path,
        sum(group_counts(row).values()),
        row.max_replicas is not None,
        {n.id: n.url for n in nodes},
    )
