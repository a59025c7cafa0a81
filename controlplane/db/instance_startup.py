"""How each instance started (docs/scaling.md), on its record: the launch path and the node's
four stages from the agent's reports, and registration, timed here.

    instances.launch_path      fork | ipc | warm_pod | cold
    instances.startup          {"fallbacks": [...], "stages": InstanceStartup | null,
                                "ready_at": wall clock on the node when it was ready | null}
    instances.registration_s   ready on the node -> the registry routes to it
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane import wire
from controlplane.db import tables as t
from controlplane.states import InstanceState


def record_launch(row: t.Instance, report: wire.InstanceReport) -> None:
    """Keep what the report says of the instance's start; a report that says less (an older
    agent, a heartbeat before ready) does not erase what is known."""
    if report.launch_path is not None and row.launch_path != report.launch_path:
        row.launch_path = report.launch_path
    known = dict(row.startup or {})
    seen: dict[str, Any] = {}
    if report.fallbacks:
        seen["fallbacks"] = list(report.fallbacks)
    if report.startup is not None:
        seen["stages"] = report.startup.model_dump(mode="json")
    if report.ready_at is not None:
        seen["ready_at"] = report.ready_at
    merged = {**known, **seen}
    if merged != known:
        row.startup = merged


def record_registration(session: Session, instance_ids: Collection[str], now: float) -> None:
    """The registry routes to these instances from `now` on: time the registration of those
    ready and not timed yet. Without the node's ready mark, from the ready report's arrival."""
    if not instance_ids:
        return
    rows = session.scalars(
        select(t.Instance).where(
            t.Instance.id.in_(list(instance_ids)),
            t.Instance.registration_s.is_(None),
            t.Instance.state == InstanceState.READY.value,
        )
    )
    for row in rows:
        ready_at = (row.startup or {}).get("ready_at")
        since = float(ready_at) if isinstance(ready_at, int | float) else row.updated_at
        row.registration_s = round(max(0.0, now - since), 4)


def startup_info(row: t.Instance) -> dict[str, Any]:
    """The InstanceInfo fields of how it started."""
    data = row.startup or {}
    stages = data.get("stages")
    return {
        "launch_path": row.launch_path,
        "fallbacks": list(data.get("fallbacks", [])),
        "startup": wire.InstanceStartup.model_validate(stages) if stages else None,
        "registration_s": row.registration_s,
    }
