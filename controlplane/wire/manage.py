"""The management API (/api/v1) used by the CLI."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from controlplane.wire.base import Open, Strict
from controlplane.wire.instance import InstanceStartup, SemiPDConfig

# ---------------------------------------------------------------------------------------------
# Management API (/api/v1)
# ---------------------------------------------------------------------------------------------

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$"
# Model names also take fine-tuned ones, `ft:<base>:<suffix>:<job id>` (the suffix may be empty
# and may hold capitals).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._:-]{0,254}[A-Za-z0-9])?$"


class ModelCreate(Strict):
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    path: str = Field(min_length=1)
    source: str = "import"


class ModelInfo(Open):
    name: str
    path: str
    source: str
    architecture: str | None = None
    num_parameters: int | None = None
    size_bytes: int | None = None
    created_at: float


class AutoscalingFields(Strict):
    """Autoscaling is on when max_replicas is set (docs/scaling.md, "Autoscaling"); None keeps
    the current value or the default."""

    min_replicas: int | None = Field(default=None, ge=0, le=256)
    max_replicas: int | None = Field(default=None, ge=1, le=256)
    target_concurrency: float | None = Field(default=None, gt=0)  # running + waiting per replica
    upscale_delay_s: float | None = Field(default=None, ge=0)
    downscale_delay_s: float | None = Field(default=None, ge=0)
    scale_to_zero_after_s: float | None = Field(default=None, ge=0)  # keep-alive of the last one


# How a deployment serves (docs/pd.md, "Deployment modes and groups"): one group of colocated
# instances; a prefill group and a decode group (PD disaggregation); all three groups; or one
# group of semi-PD instances (prefill and decode workers in each, on shares of its device).
DeploymentMode = Literal["colocated", "disaggregated", "auto", "semi-pd"]


class GroupFields(AutoscalingFields):
    """The size of each instance group; a group its mode does not have must be left out or 0.
    Fixed deployments: the instances (default 1 in each group of the mode); autoscaled ones: the
    count each group starts from, within the bounds (which apply to every group)."""

    replicas: int | None = Field(default=None, ge=0, le=256)  # the colocated group
    prefill_replicas: int | None = Field(default=None, ge=0, le=256)
    decode_replicas: int | None = Field(default=None, ge=0, le=256)


class SemiPDFields(GroupFields):
    """A semi-pd deployment's instances (docs/pd.md, "semi-PD deployments"): both SLOs are
    required in mode semi-pd and refused in the others; None keeps the current value (update)
    or FlowServe's default (the split, 50; dynamic)."""

    slo_ttft_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # P90 target
    slo_tpot_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # P90 target
    semi_pd_split: int | None = Field(default=None, gt=0, lt=100)  # prefill's starting percent
    semi_pd_static: bool | None = None  # keep the split (the SLOs are only observed)


class DeploymentCreate(SemiPDFields):
    name: str = Field(pattern=NAME_PATTERN)
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    mode: DeploymentMode = "colocated"


class DeploymentUpdate(SemiPDFields):
    # A new mode must share a group with the current one (through auto), so something serves
    # throughout; the groups it adds start at 1 unless given.
    mode: DeploymentMode | None = None
    autoscaling: bool | None = None  # false turns autoscaling off


class AutoscalingInfo(Open):
    min_replicas: int
    max_replicas: int
    target_concurrency: float
    upscale_delay_s: float
    downscale_delay_s: float
    scale_to_zero_after_s: float


class ScalingEventInfo(Open):
    """A change of one group's replicas (kind autoscale or manual) or a model preload, with its
    inputs; `role` names the group (None: not about one group, such as a preload)."""

    id: int
    deployment: str
    kind: str
    role: str | None = None
    from_replicas: int
    to_replicas: int
    reason: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    at: float


class InstanceInfo(Open):
    id: str
    deployment: str
    model: str
    node_id: str | None = None
    state: str
    url: str | None = None
    pid: int | None = None
    role: str = "colocated"
    semi_pd: SemiPDConfig | None = None  # what it was started with (None: not semi-PD)
    reason: str | None = None
    created_at: float
    updated_at: float
    # How it started (docs/scaling.md): the launch path, why faster ones were passed over, the
    # node's four stages, and registration (ready on the node -> routed to), timed here.
    launch_path: str | None = None
    fallbacks: list[str] = Field(default_factory=list)
    startup: InstanceStartup | None = None
    registration_s: float | None = None


class GroupInfo(Open):
    """One instance group of a deployment: its role, desired and ready instances."""

    role: str
    replicas: int
    ready_replicas: int


class DeploymentInfo(Open):
    name: str
    model: str
    replicas: int  # the colocated group's, as `replicas` sets it
    ready_replicas: int
    created_at: float
    mode: str = "colocated"
    groups: list[GroupInfo] = Field(default_factory=list)  # every group of its mode
    semi_pd: SemiPDConfig | None = None  # mode semi-pd: how its instances run
    instances: list[InstanceInfo] = Field(default_factory=list)
    autoscaling: AutoscalingInfo | None = None  # None: fixed replicas


class NodeResources(Open):
    cpus: int
    memory_bytes: int
    gpus: int = 0
    device: str = "cpu"


class NodeInfo(Open):
    id: str
    name: str
    url: str
    state: str
    resources: NodeResources
    last_heartbeat_at: float | None = None
    created_at: float


class EventInfo(Open):
    entity_kind: str
    entity_id: str
    from_state: str | None
    to_state: str
    reason: str
    at: float


class TaskInfo(Open):
    id: str
    job_id: str
    kind: str
    state: str
    instance_id: str | None = None
    node_id: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    # A PD pair's K/V hand-off (prefill: export; decode: fetch and import), docs/pd.md.
    kv_transport: str | None = None
    kv_bytes: int | None = None
    kv_transfer_s: float | None = None
    events: list[EventInfo] = Field(default_factory=list)


class JobInfo(Open):
    id: str
    request_id: str
    kind: str
    state: str
    created_at: float
    finished_at: float | None = None
    error: str | None = None
    # The routing decision on a PD deployment; {"mode": "semi-pd", "instance"} on a semi-PD one
    schedule: dict[str, Any] | None = None
    tasks: list[TaskInfo] = Field(default_factory=list)
    events: list[EventInfo] = Field(default_factory=list)


class RequestInfo(Open):
    id: str
    kind: str
    deployment: str | None = None
    state: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_chars: int | None = None
    created_at: float
    finished_at: float | None = None
    error: str | None = None
    jobs: list[JobInfo] = Field(default_factory=list)
    events: list[EventInfo] = Field(default_factory=list)


class PlatformStatus(Open):
    version: str
    url: str
    database: str
    home: str
    nodes: list[NodeInfo]
    deployments: list[DeploymentInfo]


class ListOf(Open):
    object: Literal["list"] = "list"
    data: list[Any]
