"""A semi-pd deployment's instance settings, from `deploy` and `deployments update`.

docs/pd.md, "semi-PD deployments": mode `semi-pd` runs one colocated group whose instances are
FlowServe's semi-PD engine (`--semi-pd`: a prefill worker and a decode worker over one copy of
the weights and one KV pool, each on its own share of the device). Such a deployment needs both
P90 SLOs, `slo_ttft_ms` and `slo_tpot_ms`, which its instances' SLO controller moves the split
to meet; `semi_pd_split` (the prefill worker's starting percent) and `semi_pd_static` (keep the
split) are optional. In any other mode these fields are refused: nothing would use them.

An update keeps each setting it does not give while the mode stays semi-pd; a deployment that
leaves semi-pd drops them, and one that comes to it must give both SLOs. Instances started with
other settings than the deployment's are replaced (reconcile/planner.py).
"""

from __future__ import annotations

from typing import Any

from controlplane import wire
from controlplane.errors import InvalidRequest
from controlplane.reconcile.groups import SEMI_PD

SLO_FIELDS = ("slo_ttft_ms", "slo_tpot_ms")
FIELDS = (*SLO_FIELDS, "semi_pd_split", "semi_pd_static")


def for_create(body: wire.DeploymentCreate) -> wire.SemiPDConfig | None:
    return _settings(body, body.mode, None, body.name)


def for_update(
    name: str, current: wire.SemiPDConfig | None, mode: str, body: wire.DeploymentUpdate
) -> wire.SemiPDConfig | None:
    """`mode` is the deployment's mode after the update; `current` its settings before it."""
    return _settings(body, mode, current, name)


def _settings(
    body: wire.DeploymentCreate | wire.DeploymentUpdate,
    mode: str,
    current: wire.SemiPDConfig | None,
    name: str,
) -> wire.SemiPDConfig | None:
    given: dict[str, Any] = {f: getattr(body, f) for f in FIELDS if getattr(body, f) is not None}
    if mode != SEMI_PD:
        if given:
            fields = ", ".join(given)
            raise InvalidRequest(
                f"{fields} configure semi-PD instances, which only mode semi-pd runs; deployment "
                f"{name!r} would be {mode}: give mode semi-pd with them, or leave them out",
                param=next(iter(given)),
                code="semi_pd_not_in_mode",
            )
        return None
    kept: dict[str, Any] = {}
    if current is not None:
        kept = {
            "slo_ttft_ms": current.slo_ttft_ms,
            "slo_tpot_ms": current.slo_tpot_ms,
            "semi_pd_split": current.split,
            "semi_pd_static": current.static,
        }
    settings = {**kept, **given}
    missing = [f for f in SLO_FIELDS if f not in settings]
    if missing:
        raise InvalidRequest(
            f"a semi-pd deployment needs both SLOs, slo_ttft_ms and slo_tpot_ms (P90 targets "
            f"in milliseconds its instances move compute between prefill and decode to meet); "
            f"{' and '.join(missing)} missing",
            param=missing[0],
            code="semi_pd_slo_required",
        )
    return wire.SemiPDConfig(
        slo_ttft_ms=settings["slo_ttft_ms"],
        slo_tpot_ms=settings["slo_tpot_ms"],
        split=settings.get("semi_pd_split"),
        static=bool(settings.get("semi_pd_static", False)),
    )
