"""The node agent protocol (agent <-> control plane)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from controlplane.wire.base import Open, Strict
from controlplane.wire.manage import NodeResources

# ---------------------------------------------------------------------------------------------
# Node agent protocol
# ---------------------------------------------------------------------------------------------

InstanceReportState = Literal["starting", "ready", "failed", "stopped"]


class NodeRegister(Strict):
    name: str = Field(min_length=1)
    url: str = Field(min_length=1)
    resources: NodeResources


class NodeRegistered(Open):
    node_id: str
    heartbeat_interval_s: float


class InstanceReport(Open):
    instance_id: str
    state: InstanceReportState
    url: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    reason: str | None = None


class NodeHeartbeat(Strict):
    resources: NodeResources
    instances: list[InstanceReport] = Field(default_factory=list)


class InstanceStart(Strict):
    instance_id: str = Field(min_length=1)
    model: str
    model_path: str
    engine_args: dict[str, Any] = Field(default_factory=dict)
