"""The node agent protocol (agent <-> control plane)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from controlplane.wire.base import Open, Strict
from controlplane.wire.instance import InstanceRole, InstanceStartup, SemiPDConfig
from controlplane.wire.manage import NodeResources
from controlplane.wire.training import TrainingReport

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
    # How the agent started it (docs/scaling.md), known from the first report on:
    launch_path: Literal["fork", "ipc", "warm_pod", "cold"] | None = None
    fallbacks: list[str] = Field(default_factory=list)  # why faster paths were passed over
    # Once ready: the stages its /health reported, and when it was ready (wall clock of the node)
    startup: InstanceStartup | None = None
    ready_at: float | None = None


class NodeHeartbeat(Strict):
    resources: NodeResources
    instances: list[InstanceReport] = Field(default_factory=list)
    training: list[TrainingReport] = Field(default_factory=list)  # every task the agent holds


class InstanceStart(Strict):
    instance_id: str = Field(min_length=1)
    model: str
    model_path: str
    engine_args: dict[str, Any] = Field(default_factory=dict)
    role: InstanceRole = "colocated"  # its group in the deployment: FlowServe's --role
    semi_pd: SemiPDConfig | None = None  # a semi-pd deployment's instance: FlowServe's --semi-pd


class PreloadStart(Strict):
    """`POST /preload`: put a model's weights in the node's DRAM cache; with `zygote`, also keep
    a zygote of it so instances of it fork. Idempotent: repeating it is cheap."""

    model_path: str = Field(min_length=1)
    zygote: bool = False


PreloadState = Literal["preloading", "ready", "failed"]
ZygoteState = Literal["off", "starting", "ready", "failed"]


class PreloadReport(Open):
    """One model the control plane asked the node to preload."""

    model_path: str
    state: PreloadState  # of its DRAM cache entry
    zygote: ZygoteState = "off"
    zygote_pid: int | None = None
    error: str | None = None
    requested_at: float
    updated_at: float


class CachedModel(Open):
    """An entry of the node's DRAM cache."""

    name: str
    model_path: str
    dtype: str
    nbytes: int


class NodePreloads(Open):
    """`GET /preload`: what the node asked for, and what its DRAM cache holds."""

    preloads: list[PreloadReport] = Field(default_factory=list)
    cached: list[CachedModel] = Field(default_factory=list)
    cache_dir: str
    warm_pods_ready: int = 0
