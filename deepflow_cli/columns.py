"""The table columns of every record the CLI shows: a short set for lists, a full one for `get`."""

from __future__ import annotations

from controlplane.wire import (
    DeploymentInfo,
    EventInfo,
    GroupInfo,
    InstanceInfo,
    JobInfo,
    NodeInfo,
    RequestInfo,
    ScalingEventInfo,
    SemiPDConfig,
    TaskInfo,
)
from deepflow_cli.output import Column, clock, count, field, size, when


def groups_of(d: DeploymentInfo) -> list[GroupInfo]:
    """Its instance groups (a control plane without groups reports only the colocated one)."""
    if d.groups:
        return list(d.groups)
    return [GroupInfo(role="colocated", replicas=d.replicas, ready_replicas=d.ready_replicas)]


def ready(d: DeploymentInfo) -> str:
    """Ready/desired instances: `1/2` for a deployment of one colocated group (colocated,
    semi-pd), else per group (`prefill 1/1, decode 0/2`)."""
    groups = groups_of(d)
    if [g.role for g in groups] == ["colocated"]:
        return f"{d.ready_replicas}/{d.replicas}"
    return ", ".join(f"{g.role} {g.ready_replicas}/{g.replicas}" for g in groups)


def semi_pd(config: SemiPDConfig | None) -> str:
    """`TTFT 300 ms, TPOT 50 ms, split 50%, dynamic` (the split FlowServe's when not given)."""
    if config is None:
        return "-"
    split = "default split" if config.split is None else f"split {config.split}%"
    how = "static" if config.static else "dynamic"
    return f"TTFT {config.slo_ttft_ms:g} ms, TPOT {config.slo_tpot_ms:g} ms, {split}, {how}"


def _event_group(e: ScalingEventInfo) -> str:
    return e.role or "-"


def _scaling(d: DeploymentInfo) -> str:
    auto = d.autoscaling
    if auto is None:
        return "fixed"
    return f"auto {auto.min_replicas}-{auto.max_replicas} @{auto.target_concurrency:g}"


def _replicas_change(e: ScalingEventInfo) -> str:
    return f"{e.from_replicas} -> {e.to_replicas}"


def _load(e: ScalingEventInfo) -> str:
    load = e.inputs.get("load")
    return "-" if load is None else str(load)


def _transition(e: EventInfo) -> str:
    return f"{e.from_state or '-'} -> {e.to_state}"


def _entity(e: EventInfo) -> str:
    return f"{e.entity_kind} {e.entity_id}"


def _memory(n: NodeInfo) -> str:
    return size(n.resources.memory_bytes)


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _stage(name: str, header: str) -> Column:
    """One of the node's four scale-up stages (docs/scaling.md), from the instance's report."""

    def read(i: InstanceInfo) -> str:
        return seconds(getattr(i.startup, name) if i.startup is not None else None)

    return Column(header, read)


def _to_routed(i: InstanceInfo) -> str:
    """All five stages: from the launch request to the registry routing to it."""
    if i.startup is None or i.registration_s is None:
        return "-"
    s = i.startup
    return seconds(
        s.pod_ready_s + s.runtime_preload_s + s.weight_load_s + s.post_load_s + i.registration_s
    )


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
    field("mode"),
    Column("ready", ready),
    Column("scaling", _scaling),
    field("created_at", "created", when),
    Column("semi-pd", lambda d: semi_pd(d.semi_pd)),
]
DEPLOYMENT_LIST = DEPLOYMENT[:6]

SCALING_EVENT = [
    field("at", fmt=when),
    field("kind"),
    Column("group", _event_group),
    Column("replicas", _replicas_change),
    Column("load", _load),
    field("reason"),
]

INSTANCE = [
    field("id"),
    field("deployment"),
    field("model"),
    field("state"),
    field("role"),
    Column("semi-pd", lambda i: semi_pd(i.semi_pd)),
    field("node_id", "node"),
    field("url"),
    field("pid"),
    field("reason"),
    field("created_at", "created", when),
    field("updated_at", "updated", when),
    field("launch_path", "path"),
    Column("passed over", lambda i: "; ".join(i.fallbacks) or "-"),
    Column("weights from", lambda i: (i.startup and i.startup.weights_source) or "-"),
    _stage("pod_ready_s", "pod ready"),
    _stage("runtime_preload_s", "runtime pre-load"),
    _stage("weight_load_s", "weight load"),
    _stage("post_load_s", "post-load"),
    field("registration_s", "registration", seconds),
    Column("request to routed", _to_routed),
]
INSTANCE_LIST = [INSTANCE[i] for i in (0, 1, 3, 4, 12, 6, 7, 9)]

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
