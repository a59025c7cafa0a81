"""The table columns of every record the CLI shows: a short set for lists, a full one for `get`."""

from __future__ import annotations

from controlplane.wire import DeploymentInfo, EventInfo, JobInfo, NodeInfo, RequestInfo, TaskInfo
from deepflow_cli.output import Column, clock, count, field, size, when


def _ready(d: DeploymentInfo) -> str:
    return f"{d.ready_replicas}/{d.replicas}"


def _transition(e: EventInfo) -> str:
    return f"{e.from_state or '-'} -> {e.to_state}"


def _entity(e: EventInfo) -> str:
    return f"{e.entity_kind} {e.entity_id}"


def _memory(n: NodeInfo) -> str:
    return size(n.resources.memory_bytes)


MODEL = [
    field("name"),
    field("architecture"),
    field("num_parameters", "parameters", count),
    field("size_bytes", "size", size),
    field("source"),
    field("path"),
    field("created_at", "created", when),
]
MODEL_LIST = MODEL[:5]

DEPLOYMENT = [
    field("name"),
    field("model"),
    Column("ready", _ready),
    field("created_at", "created", when),
]

INSTANCE = [
    field("id"),
    field("deployment"),
    field("model"),
    field("state"),
    field("role"),
    field("node_id", "node"),
    field("url"),
    field("pid"),
    field("reason"),
    field("created_at", "created", when),
    field("updated_at", "updated", when),
]
INSTANCE_LIST = [INSTANCE[i] for i in (0, 1, 3, 5, 6, 8)]

NODE = [
    field("id"),
    field("name"),
    field("state"),
    field("url"),
    Column("device", lambda n: n.resources.device),
    Column("cpus", lambda n: n.resources.cpus),
    Column("gpus", lambda n: n.resources.gpus),
    Column("memory", _memory),
    field("last_heartbeat_at", "last heartbeat", when),
    field("created_at", "created", when),
]
NODE_LIST = NODE[:8]

REQUEST = [
    field("id"),
    field("kind"),
    field("deployment"),
    field("state"),
    field("prompt_tokens", "prompt tokens"),
    field("completion_tokens", "completion tokens"),
    field("created_at", "created", when),
    field("finished_at", "finished", when),
    field("error"),
]
REQUEST_LIST = [REQUEST[i] for i in (0, 1, 2, 3, 4, 5, 6, 8)]

JOB = [
    field("id"),
    field("request_id", "request"),
    field("kind"),
    field("state"),
    field("created_at", "created", when),
    field("finished_at", "finished", when),
    field("error"),
]
JOB_LIST = JOB

TASK = [
    field("id"),
    field("job_id", "job"),
    field("kind"),
    field("state"),
    field("instance_id", "instance"),
    field("node_id", "node"),
    field("created_at", "created", when),
    field("started_at", "started", when),
    field("finished_at", "finished", when),
    field("error"),
]
TASK_LIST = [TASK[i] for i in (0, 1, 2, 3, 4, 6, 9)]

EVENT = [
    field("at", fmt=clock),
    Column("entity", _entity),
    Column("from -> to", _transition),
    field("reason"),
]


def all_events(record: RequestInfo | JobInfo | TaskInfo) -> list[EventInfo]:
    """The record's events and those of the jobs and tasks inside it, oldest first."""
    events = list(record.events)
    if isinstance(record, RequestInfo):
        for job in record.jobs:
            events += all_events(job)
    elif isinstance(record, JobInfo):
        for task in record.tasks:
            events += task.events
    return sorted(events, key=lambda e: e.at)
