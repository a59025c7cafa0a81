"""The management API (/api/v1) used by the CLI."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from controlplane.wire.base import Open, Strict

# ---------------------------------------------------------------------------------------------
# Management API (/api/v1)
# ---------------------------------------------------------------------------------------------

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$"


class ModelCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN)
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


class DeploymentCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    model: str = Field(min_length=1)
    replicas: int = Field(default=1, ge=0, le=256)


class DeploymentUpdate(Strict):
    replicas: int | None = Field(default=None, ge=0, le=256)


class InstanceInfo(Open):
    id: str
    deployment: str
    model: str
    node_id: str | None = None
    state: str
    url: str | None = None
    pid: int | None = None
    role: str = "colocated"
    reason: str | None = None
    created_at: float
    updated_at: float


class DeploymentInfo(Open):
    name: str
    model: str
    replicas: int
    ready_replicas: int
    created_at: float
    instances: list[InstanceInfo] = Field(default_factory=list)


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
    events: list[EventInfo] = Field(default_factory=list)


class JobInfo(Open):
    id: str
    request_id: str
    kind: str
    state: str
    created_at: float
    finished_at: float | None = None
    error: str | None = None
    tasks: list[TaskInfo] = Field(default_factory=list)
    events: list[EventInfo] = Field(default_factory=list)


class RequestInfo(Open):
    id: str
    kind: str
    deployment: str | None = None
    state: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
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
