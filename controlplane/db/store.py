"""All SQL of the control plane. Functions take a session and return wire models or plain data."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from controlplane import wire
from controlplane.db import instance_startup, scaling_store
from controlplane.db import tables as t
from controlplane.errors import Conflict, NotFound
from controlplane.reconcile import groups, scaling_spec
from controlplane.reconcile.groups import COLOCATED
from controlplane.states import (
    FineTuneState,
    InstanceState,
    JobState,
    NodeState,
    RequestState,
    TaskState,
    check_transition,
)

EntityKind = str  # "request" | "job" | "task" | "instance" | "node" | "fine_tune"

# Tables that carry a state column, by the entity kind their events name.
_TABLES: dict[EntityKind, Any] = {
    "request": t.Request,
    "job": t.Job,
    "task": t.Task,
    "instance": t.Instance,
    "node": t.Node,
    "fine_tune": t.FineTune,
}
_ENUMS: dict[EntityKind, type] = {
    "request": RequestState,
    "job": JobState,
    "task": TaskState,
    "instance": InstanceState,
    "node": NodeState,
    "fine_tune": FineTuneState,
}


@dataclass(slots=True, frozen=True)
class StateChange:
    """One checked state change and the columns that change with it."""

    entity_kind: EntityKind
    entity_id: str
    from_state: str | None
    to_state: str
    reason: str
    at: float
    fields: dict[str, Any] = field(default_factory=dict)


def write_changes(session: Session, changes: Iterable[StateChange]) -> None:
    """The one writer of state: updates each row and appends its event row."""
    for change in changes:
        table = _TABLES[change.entity_kind]
        values = {**change.fields, "state": change.to_state}
        if hasattr(table, "updated_at"):
            values.setdefault("updated_at", change.at)
        session.execute(update(table).where(table.id == change.entity_id).values(**values))
        session.add(_event(change))


def _event(change: StateChange) -> t.Event:
    return t.Event(
        entity_kind=change.entity_kind,
        entity_id=change.entity_id,
        from_state=change.from_state,
        to_state=change.to_state,
        reason=change.reason,
        at=change.at,
    )


def change_state(
    session: Session,
    kind: EntityKind,
    entity_id: str,
    to_state: str,
    why: str,
    now: float,
    /,
    **fields: Any,
) -> StateChange | None:
    """Read the row's state, check the move against the table and write it. None if unchanged.

    `why` becomes the event's reason; `fields` are columns set with the change (an instance's
    own `reason` column among them)."""
    table = _TABLES[kind]
    row = session.get(table, entity_id)
    if row is None:
        raise NotFound(f"{kind} {entity_id} not found")
    enum = _ENUMS[kind]
    current = enum(row.state)
    target = enum(to_state)
    if current == target:
        return None
    check_transition(current, target)
    change = StateChange(kind, entity_id, current.value, target.value, why, now, fields)
    write_changes(session, [change])
    return change


def insert_created(session: Session, rows: Sequence[t.Base], events: Sequence[StateChange]) -> None:
    for row in rows:  # in the given order: parents before the rows that refer to them
        session.add(row)
        session.flush()
    session.add_all([_event(e) for e in events])


# ---------------------------------------------------------------------------------------------
# Models and deployments
# ---------------------------------------------------------------------------------------------


def model_info(row: t.Model) -> wire.ModelInfo:
    return wire.ModelInfo(
        name=row.name,
        path=row.path,
        source=row.source,
        architecture=row.architecture,
        num_parameters=row.num_parameters,
        size_bytes=row.size_bytes,
        created_at=row.created_at,
    )


def add_model(session: Session, row: t.Model) -> wire.ModelInfo:
    if session.get(t.Model, row.name) is not None:
        raise Conflict(f"model {row.name!r} is already registered", code="model_exists")
    session.add(row)
    return model_info(row)


def get_model(session: Session, name: str) -> t.Model:
    row = session.get(t.Model, name)
    if row is None:
        raise NotFound(f"model {name!r} not found", code="model_not_found")
    return row


def list_models(session: Session) -> list[wire.ModelInfo]:
    return [model_info(r) for r in session.scalars(select(t.Model).order_by(t.Model.name))]


def delete_model(session: Session, name: str) -> wire.ModelInfo:
    row = get_model(session, name)
    used = session.scalars(select(t.Deployment.name).where(t.Deployment.model == name)).first()
    if used is not None:
        raise Conflict(f"model {name!r} is used by deployment {used!r}", code="model_in_use")
    info = model_info(row)
    session.delete(row)
    return info


def instance_info(row: t.Instance) -> wire.InstanceInfo:
    return wire.InstanceInfo(
        id=row.id,
        deployment=row.deployment,
        model=row.model,
        node_id=row.node_id,
        state=row.state,
        url=row.url,
        pid=row.pid,
        role=row.role,
        semi_pd=scaling_store.instance_semi_pd(row),
        reason=row.reason,
        created_at=row.created_at,
        updated_at=row.updated_at,
        **instance_startup.startup_info(row),
    )


def deployment_info(session: Session, row: t.Deployment) -> wire.DeploymentInfo:
    live = list_instances(session, deployment=row.name, live_only=True)
    ready = Counter(i.role for i in live if i.state == InstanceState.READY)
    groups = [
        wire.GroupInfo(role=role, replicas=count, ready_replicas=ready[role])
        for role, count in scaling_store.group_counts(row).items()
    ]
    return wire.DeploymentInfo(
        name=row.name,
        model=row.model,
        mode=row.mode,
        replicas=row.replicas,
        ready_replicas=ready[COLOCATED],
        groups=groups,
        semi_pd=scaling_store.semi_pd_config(row),
        created_at=row.created_at,
        instances=live,
        autoscaling=scaling_store.autoscaling_info(row),
    )


def add_deployment(session: Session, spec: wire.DeploymentCreate, now: float) -> t.Deployment:
    get_model(session, spec.model)
    if session.get(t.Deployment, spec.name) is not None:
        raise Conflict(f"deployment {spec.name!r} already exists", code="deployment_exists")
    scaling = scaling_spec.for_create(spec)
    row = t.Deployment(
        name=spec.name,
        model=spec.model,
        mode=scaling.mode,
        replicas=scaling.replicas,
        prefill_replicas=scaling.prefill_replicas,
        decode_replicas=scaling.decode_replicas,
        config={},
        created_at=now,
        updated_at=now,
    )
    scaling_store.apply_spec(row, scaling)
    session.add(row)
    return row


def get_deployment(session: Session, name: str) -> t.Deployment:
    row = session.get(t.Deployment, name)
    if row is None:
        raise NotFound(f"deployment {name!r} not found", code="model_not_found")
    return row


def update_deployment(
    session: Session, name: str, body: wire.DeploymentUpdate, now: float
) -> t.Deployment:
    """`PATCH`: mode, group sizes, autoscaling and semi-PD settings. Each group whose count
    changes is a manual scaling event of that group; a change of settings alone is one event of
    no group."""
    row = get_deployment(session, name)
    before = scaling_store.scaling_spec(row)
    after = scaling_spec.for_update(name, before, body)
    if after == before:
        return row
    scaling_store.apply_spec(row, after)
    row.updated_at = now
    inputs = body.model_dump(exclude_none=True)
    reason = "scaled by hand" if after.mode == before.mode else f"{before.mode} -> {after.mode}"
    changed = [r for r in groups.ROLES if after.group(r) != before.group(r)]
    for role in changed:
        was, wanted = before.group(role), after.group(role)
        scaling_store.record(session, name, "manual", was, wanted, reason, inputs, now, role)
    if not changed:
        n = after.replicas
        if after.mode != before.mode:
            why = reason  # colocated <-> semi-pd: the same group, its instances replaced
        elif after.semi_pd != before.semi_pd:
            why = "semi-PD settings changed by hand"
        else:
            why = "updated by hand"
        scaling_store.record(session, name, "manual", n, n, why, inputs, now)
    return row


def list_deployments(session: Session) -> list[t.Deployment]:
    return list(session.scalars(select(t.Deployment).order_by(t.Deployment.name)))


# ---------------------------------------------------------------------------------------------
# Nodes and instances
# ---------------------------------------------------------------------------------------------

LIVE_INSTANCE_STATES = (
    InstanceState.PENDING,
    InstanceState.STARTING,
    InstanceState.READY,
    InstanceState.DRAINING,
)


def node_info(row: t.Node) -> wire.NodeInfo:
    return wire.NodeInfo(
        id=row.id,
        name=row.name,
        url=row.url,
        state=row.state,
        resources=wire.NodeResources.model_validate(row.resources),
        last_heartbeat_at=row.last_heartbeat_at,
        created_at=row.created_at,
    )


def find_node_by_name(session: Session, name: str) -> t.Node | None:
    return session.scalars(select(t.Node).where(t.Node.name == name)).first()


def get_node(session: Session, node_id: str) -> t.Node:
    row = session.get(t.Node, node_id)
    if row is None:
        raise NotFound(f"node {node_id} not found")
    return row


def list_nodes(session: Session) -> list[wire.NodeInfo]:
    return [node_info(r) for r in session.scalars(select(t.Node).order_by(t.Node.name))]


def get_instance(session: Session, instance_id: str) -> t.Instance:
    row = session.get(t.Instance, instance_id)
    if row is None:
        raise NotFound(f"instance {instance_id} not found")
    return row


def list_instances(
    session: Session, *, deployment: str | None = None, live_only: bool = False
) -> list[wire.InstanceInfo]:
    query = select(t.Instance).order_by(t.Instance.created_at)
    if deployment is not None:
        query = query.where(t.Instance.deployment == deployment)
    if live_only:
        query = query.where(t.Instance.state.in_([s.value for s in LIVE_INSTANCE_STATES]))
    return [instance_info(r) for r in session.scalars(query)]


# ---------------------------------------------------------------------------------------------
# Requests, jobs, tasks and events
# ---------------------------------------------------------------------------------------------


def events_of(session: Session, kind: str, entity_id: str) -> list[wire.EventInfo]:
    query = (
        select(t.Event)
        .where(t.Event.entity_kind == kind, t.Event.entity_id == entity_id)
        .order_by(t.Event.id)
    )
    return [
        wire.EventInfo(
            entity_kind=e.entity_kind,
            entity_id=e.entity_id,
            from_state=e.from_state,
            to_state=e.to_state,
            reason=e.reason,
            at=e.at,
        )
        for e in session.scalars(query)
    ]


def task_info(session: Session, row: t.Task, *, with_events: bool) -> wire.TaskInfo:
    return wire.TaskInfo(
        id=row.id,
        job_id=row.job_id,
        kind=row.kind,
        state=row.state,
        instance_id=row.instance_id,
        node_id=row.node_id,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        error=row.error,
        kv_transport=row.kv_transport,
        kv_bytes=row.kv_bytes,
        kv_transfer_s=row.kv_transfer_s,
        events=events_of(session, "task", row.id) if with_events else [],
    )


def job_info(session: Session, row: t.Job, *, with_children: bool) -> wire.JobInfo:
    tasks = []
    if with_children:
        query = select(t.Task).where(t.Task.job_id == row.id).order_by(t.Task.created_at)
        tasks = [task_info(session, r, with_events=True) for r in session.scalars(query)]
    return wire.JobInfo(
        id=row.id,
        request_id=row.request_id,
        kind=row.kind,
        state=row.state,
        created_at=row.created_at,
        finished_at=row.finished_at,
        error=row.error,
        schedule=row.schedule,
        tasks=tasks,
        events=events_of(session, "job", row.id) if with_children else [],
    )


def request_info(session: Session, row: t.Request, *, with_children: bool) -> wire.RequestInfo:
    jobs = []
    if with_children:
        query = select(t.Job).where(t.Job.request_id == row.id).order_by(t.Job.created_at)
        jobs = [job_info(session, r, with_children=True) for r in session.scalars(query)]
    return wire.RequestInfo(
        id=row.id,
        kind=row.kind,
        deployment=row.deployment,
        state=row.state,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        prompt_chars=row.prompt_chars,
        created_at=row.created_at,
        finished_at=row.finished_at,
        error=row.error,
        jobs=jobs,
        events=events_of(session, "request", row.id) if with_children else [],
    )


def get_request(session: Session, request_id: str) -> wire.RequestInfo:
    row = session.get(t.Request, request_id)
    if row is None:
        raise NotFound(f"request {request_id} not found")
    return request_info(session, row, with_children=True)


def get_job(session: Session, job_id: str) -> wire.JobInfo:
    row = session.get(t.Job, job_id)
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return job_info(session, row, with_children=True)


def get_task(session: Session, task_id: str) -> wire.TaskInfo:
    row = session.get(t.Task, task_id)
    if row is None:
        raise NotFound(f"task {task_id} not found")
    return task_info(session, row, with_events=True)


def list_requests(session: Session, *, limit: int, state: str | None) -> list[wire.RequestInfo]:
    query = select(t.Request).order_by(t.Request.created_at.desc()).limit(limit)
    if state is not None:
        query = query.where(t.Request.state == state)
    return [request_info(session, r, with_children=False) for r in session.scalars(query)]


def list_jobs(
    session: Session, *, limit: int, state: str | None, request_id: str | None
) -> list[wire.JobInfo]:
    query = select(t.Job).order_by(t.Job.created_at.desc()).limit(limit)
    if state is not None:
        query = query.where(t.Job.state == state)
    if request_id is not None:
        query = query.where(t.Job.request_id == request_id)
    return [job_info(session, r, with_children=False) for r in session.scalars(query)]


def list_tasks(
    session: Session, *, limit: int, state: str | None, job_id: str | None
) -> list[wire.TaskInfo]:
    query = select(t.Task).order_by(t.Task.created_at.desc()).limit(limit)
    if state is not None:
        query = query.where(t.Task.state == state)
    if job_id is not None:
        query = query.where(t.Task.job_id == job_id)
    return [task_info(session, r, with_events=False) for r in session.scalars(query)]


_NON_TERMINAL: dict[EntityKind, tuple[str, ...]] = {
    "request": (RequestState.QUEUED, RequestState.RUNNING),
    "job": (JobState.PENDING, JobState.RUNNING),
    "task": (TaskState.PENDING, TaskState.DISPATCHED, TaskState.RUNNING),
    "instance": (InstanceState.PENDING,),
}


def fail_orphans(session: Session, now: float, reason: str) -> int:
    """Move every record a previous control plane left in flight to FAILED. Returns the count.

    Instances past PENDING are left alone: their nodes report on them at the next heartbeat."""
    count = 0
    for kind, states in _NON_TERMINAL.items():
        table = _TABLES[kind]
        rows = session.scalars(select(table).where(table.state.in_(states))).all()
        changes = []
        for row in rows:
            fields: dict[str, Any] = {}
            if kind != "instance":
                fields = {"finished_at": now, "error": reason}
            else:
                fields = {"reason": reason}
            changes.append(StateChange(kind, row.id, row.state, "failed", reason, now, fields))
        write_changes(session, changes)
        count += len(changes)
    return count


def delete_deployment_row(session: Session, name: str) -> None:
    session.execute(delete(t.Deployment).where(t.Deployment.name == name))
    session.execute(delete(t.ScalingEvent).where(t.ScalingEvent.deployment == name))
