"""SQL of fine-tuning jobs. Functions take a session and return rows or wire models.

A fine-tuning job is a `fine_tunes` row plus the records that run it: one `fine_tune` request
with four jobs (validate, train, evaluate, register), each with a task (the train job gets one
more task per restart). Every state change of any of them goes through `store.change_state`, so
each writes its event row; `fine_tune_events` holds the job's OpenAI events besides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from controlplane import wire
from controlplane.db import store
from controlplane.db import tables as t
from controlplane.db.paging import after as after_cursor
from controlplane.db.paging import page
from controlplane.errors import InvalidRequest, NotFound
from controlplane.jobs.fine_tune_plan import NodeLoad, TrainingView, checkpoint_model_name
from controlplane.jobs.fine_tune_plan import fine_tuned_model_name as planned_name
from controlplane.states import (
    FineTuneState,
    InstanceState,
    JobKind,
    JobState,
    NodeState,
    RequestState,
    TaskKind,
    TaskState,
)

IN_FLIGHT = tuple(sorted(s.value for s in FineTuneState.in_flight()))
LIVE_TASK_STATES = (TaskState.PENDING.value, TaskState.DISPATCHED.value, TaskState.RUNNING.value)
# The request parameter an error code of a failed job points at.
ERROR_PARAMS = {
    "invalid_training_file": "training_file",
    "invalid_validation_file": "validation_file",
}


# ---------------------------------------------------------------------------------------------
# Fine-tuning jobs
# ---------------------------------------------------------------------------------------------


def insert_fine_tune(
    session: Session,
    fine_tune: t.FineTune,
    request: t.Request,
    jobs: Sequence[t.Job],
    tasks: Sequence[t.Task],
    now: float,
) -> None:
    records: list[tuple[str, t.Request | t.Job | t.Task | t.FineTune]] = [
        ("request", request),
        *[("job", j) for j in jobs],
        *[("task", k) for k in tasks],
        ("fine_tune", fine_tune),
    ]
    created = [
        store.StateChange(kind, row.id, None, row.state, "created", now) for kind, row in records
    ]
    store.insert_created(session, [row for _, row in records], created)
    add_event(session, fine_tune.id, f"Created fine-tuning job: {fine_tune.id}", now)


def get_fine_tune(session: Session, fine_tune_id: str) -> t.FineTune:
    row = session.get(t.FineTune, fine_tune_id)
    if row is None:
        raise NotFound(
            f"No such fine-tuning job: {fine_tune_id}", param="fine_tuning_job_id", code="not_found"
        )
    return row


def job_object(row: t.FineTune) -> wire.FineTuningJob:
    error = None
    if row.state == FineTuneState.FAILED and row.error is not None:
        code = row.error_code or "server_error"
        error = wire.FineTuningError(code=code, message=row.error, param=ERROR_PARAMS.get(code))
    hp = wire.ResolvedHyperparameters.model_validate(row.hyperparameters)
    return wire.FineTuningJob(
        id=row.id,
        created_at=int(row.created_at),
        error=error,
        fine_tuned_model=row.fine_tuned_model,
        finished_at=int(row.finished_at) if row.finished_at is not None else None,
        hyperparameters=hp,
        model=row.model,
        seed=row.seed,
        status=row.state,  # type: ignore[arg-type]
        trained_tokens=row.trained_tokens,
        training_file=row.training_file,
        validation_file=row.validation_file,
        metadata=row.meta,
        method={"type": "supervised", "supervised": {"hyperparameters": hp.model_dump()}},
        user_provided_suffix=row.suffix,
        request_id=row.request_id,
    )


def list_fine_tunes(session: Session, *, after: str | None, limit: int) -> wire.Page:
    query = (
        select(t.FineTune)
        .order_by(t.FineTune.created_at.desc(), t.FineTune.id.desc())
        .limit(limit + 1)
    )
    if after is not None:
        cursor = session.get(t.FineTune, after)
        if cursor is None:
            raise InvalidRequest(f"No such fine-tuning job: {after}", param="after")
        query = query.where(after_cursor(t.FineTune, cursor, descending=True))
    jobs = [job_object(r) for r in session.scalars(query)]
    return page(jobs, limit, lambda j: j.id)


def in_flight_ids(session: Session) -> list[str]:
    return list(session.scalars(select(t.FineTune.id).where(t.FineTune.state.in_(IN_FLIGHT))))


# ---------------------------------------------------------------------------------------------
# Events and checkpoints
# ---------------------------------------------------------------------------------------------

EVENT_PREFIX = "ftevent-"


def add_event(
    session: Session,
    fine_tune_id: str,
    message: str,
    now: float,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    session.add(
        t.FineTuneEvent(
            fine_tune_id=fine_tune_id,
            level=level,
            type=type,
            message=message,
            data=data,
            created_at=now,
        )
    )


def _event_object(row: t.FineTuneEvent) -> wire.FineTuningEvent:
    return wire.FineTuningEvent(
        id=f"{EVENT_PREFIX}{row.id}",
        created_at=int(row.created_at),
        level=row.level,  # type: ignore[arg-type]
        message=row.message,
        data=row.data,
        type=row.type,  # type: ignore[arg-type]
    )


def list_events(session: Session, fine_tune_id: str, *, after: str | None, limit: int) -> wire.Page:
    """Newest first, as OpenAI lists them; `after` is the last event id of the previous page."""
    get_fine_tune(session, fine_tune_id)
    query = (
        select(t.FineTuneEvent)
        .where(t.FineTuneEvent.fine_tune_id == fine_tune_id)
        .order_by(t.FineTuneEvent.id.desc())
        .limit(limit + 1)
    )
    if after is not None:
        number = after.removeprefix(EVENT_PREFIX)
        if not number.isdigit():
            raise InvalidRequest(f"No such event: {after}", param="after")
        query = query.where(t.FineTuneEvent.id < int(number))
    events = [_event_object(r) for r in session.scalars(query)]
    return page(events, limit, lambda e: e.id)


def add_checkpoint(
    session: Session, row: t.FineTune, checkpoint: wire.TrainingCheckpoint, now: float
) -> bool:
    """Record a checkpoint once (reports repeat); it becomes the one a restart resumes from."""
    known = session.scalars(
        select(t.FineTuneCheckpoint).where(
            t.FineTuneCheckpoint.fine_tune_id == row.id,
            t.FineTuneCheckpoint.step == checkpoint.step,
        )
    ).first()
    row.last_checkpoint = checkpoint.path
    if known is not None:
        known.path = checkpoint.path  # a rerun of the step after a restart rewrote the folder
        return False
    metrics = {"step": float(checkpoint.step)}
    if "loss" in checkpoint.metrics:
        metrics["train_loss"] = checkpoint.metrics["loss"]
    metrics.update({k: v for k, v in checkpoint.metrics.items() if k != "loss"})
    session.add(
        t.FineTuneCheckpoint(
            id=f"ftckpt-{row.id.removeprefix('ftjob-')}-{checkpoint.step}",
            fine_tune_id=row.id,
            step=checkpoint.step,
            path=checkpoint.path,
            metrics=metrics,
            created_at=now,
        )
    )
    return True


def list_checkpoints(
    session: Session, fine_tune_id: str, *, after: str | None, limit: int
) -> wire.Page:
    row = get_fine_tune(session, fine_tune_id)
    name = row.fine_tuned_model or planned_name(row.model, row.suffix, row.id)
    query = (
        select(t.FineTuneCheckpoint)
        .where(t.FineTuneCheckpoint.fine_tune_id == fine_tune_id)
        .order_by(t.FineTuneCheckpoint.step.desc())
        .limit(limit + 1)
    )
    if after is not None:
        cursor = session.get(t.FineTuneCheckpoint, after)
        if cursor is None or cursor.fine_tune_id != fine_tune_id:
            raise InvalidRequest(f"No such checkpoint: {after}", param="after")
        query = query.where(t.FineTuneCheckpoint.step < cursor.step)
    checkpoints = [
        wire.FineTuningCheckpoint(
            id=c.id,
            created_at=int(c.created_at),
            fine_tuned_model_checkpoint=checkpoint_model_name(name, c.step),
            fine_tuning_job_id=fine_tune_id,
            metrics=c.metrics,
            step_number=c.step,
        )
        for c in session.scalars(query)
    ]
    return page(checkpoints, limit, lambda c: c.id)


def checkpoint_step(session: Session, fine_tune_id: str, path: str | None) -> int | None:
    if path is None:
        return None
    return session.scalars(
        select(t.FineTuneCheckpoint.step).where(
            t.FineTuneCheckpoint.fine_tune_id == fine_tune_id, t.FineTuneCheckpoint.path == path
        )
    ).first()


# ---------------------------------------------------------------------------------------------
# The records behind a fine-tuning job
# ---------------------------------------------------------------------------------------------


def job_of(session: Session, request_id: str, kind: JobKind) -> t.Job:
    job = session.scalars(
        select(t.Job).where(t.Job.request_id == request_id, t.Job.kind == kind.value)
    ).first()
    assert job is not None, f"request {request_id} has no {kind.value} job"
    return job


def task_of(session: Session, job_id: str) -> t.Task:
    """The job's current task: the one still in flight, else the latest (a train job gets a new
    task per restart, and at most one of them is ever in flight)."""
    tasks = session.scalars(
        select(t.Task).where(t.Task.job_id == job_id).order_by(t.Task.created_at.desc())
    ).all()
    assert tasks, f"job {job_id} has no task"
    return next((k for k in tasks if k.state in LIVE_TASK_STATES), tasks[0])


def fine_tune_of_task(session: Session, task_id: str) -> tuple[t.Task, t.Job, t.FineTune] | None:
    task = session.get(t.Task, task_id)
    if task is None:
        return None
    job = session.get(t.Job, task.job_id)
    assert job is not None
    fine_tune = session.scalars(
        select(t.FineTune).where(t.FineTune.request_id == job.request_id)
    ).first()
    return None if fine_tune is None else (task, job, fine_tune)


def new_task(session: Session, job: t.Job, task_id: str, kind: TaskKind, now: float) -> t.Task:
    task = t.Task(
        id=task_id, job_id=job.id, kind=kind.value, state=TaskState.PENDING.value, created_at=now
    )
    created = store.StateChange("task", task_id, None, task.state, "restart", now)
    store.insert_created(session, [task], [created])
    return task


def move_fine_tune(
    session: Session,
    row: t.FineTune,
    target: FineTuneState,
    message: str,
    now: float,
    *,
    level: str = "info",
    **fields: Any,
) -> None:
    """Change the job's status (an event row) and tell the user why (an OpenAI event)."""
    if store.change_state(session, "fine_tune", row.id, target, message, now, **fields):
        add_event(session, row.id, message, now, level=level)
        session.refresh(row)


def start_step(session: Session, row: t.FineTune, kind: JobKind, why: str, now: float) -> t.Task:
    """A step the control plane runs itself: its job and task start, the request runs."""
    job = job_of(session, row.request_id, kind)
    task = task_of(session, job.id)
    store.change_state(session, "request", row.request_id, RequestState.RUNNING, why, now)
    store.change_state(session, "job", job.id, JobState.RUNNING, why, now)
    store.change_state(session, "task", task.id, TaskState.DISPATCHED, why, now, started_at=now)
    return task


def finish_step(session: Session, task: t.Task, why: str, now: float) -> None:
    store.change_state(session, "task", task.id, TaskState.SUCCEEDED, why, now, finished_at=now)
    store.change_state(session, "job", task.job_id, JobState.SUCCEEDED, why, now, finished_at=now)


def settle(
    session: Session,
    row: t.FineTune,
    outcome: FineTuneState,
    why: str,
    now: float,
    *,
    error_code: str | None = None,
) -> list[tuple[str, str]]:
    """End the job and every record behind it still in flight (failed or cancelled).

    Returns (node url, task id) of each training that was running, for the caller to stop."""
    assert outcome in (FineTuneState.FAILED, FineTuneState.CANCELLED)
    error = why if outcome == FineTuneState.FAILED else None
    ended = {"finished_at": now, "error": error}
    to_stop = []
    jobs = session.scalars(select(t.Job).where(t.Job.request_id == row.request_id)).all()
    for job in jobs:
        tasks = session.scalars(
            select(t.Task).where(t.Task.job_id == job.id, t.Task.state.in_(LIVE_TASK_STATES))
        ).all()
        for task in tasks:
            if task.kind == TaskKind.TRAIN and task.node_id and task.state != TaskState.PENDING:
                node = session.get(t.Node, task.node_id)
                if node is not None:
                    to_stop.append((node.url, task.id))
            store.change_state(session, "task", task.id, outcome.value, why, now, **ended)
        if JobState(job.state) not in JobState.terminal():
            store.change_state(session, "job", job.id, outcome.value, why, now, **ended)
    store.change_state(session, "request", row.request_id, outcome.value, why, now, **ended)
    level = "error" if outcome == FineTuneState.FAILED else "info"
    fields: dict[str, Any] = {"finished_at": now}
    if outcome == FineTuneState.FAILED:
        fields.update(error=why, error_code=error_code or "server_error")
    move_fine_tune(session, row, outcome, why, now, level=level, **fields)
    return to_stop


def fail_in_flight(session: Session, now: float, reason: str) -> list[tuple[str, str]]:
    """At start-up: every job a previous control plane left unfinished fails (its in-process
    steps are gone). Returns the trainings to stop on their nodes."""
    to_stop = []
    for fine_tune_id in in_flight_ids(session):
        row = get_fine_tune(session, fine_tune_id)
        to_stop += settle(
            session, row, FineTuneState.FAILED, reason, now, error_code="control_plane_restarted"
        )
    return to_stop


# ---------------------------------------------------------------------------------------------
# Nodes and trainings in flight
# ---------------------------------------------------------------------------------------------

_TRAINING = (TaskState.DISPATCHED.value, TaskState.RUNNING.value)
_LIVE_INSTANCES = [s.value for s in store.LIVE_INSTANCE_STATES if s != InstanceState.PENDING]


def node_loads(session: Session) -> list[NodeLoad]:
    trainings = dict(
        session.execute(
            select(t.Task.node_id, func.count())
            .where(t.Task.kind == TaskKind.TRAIN.value, t.Task.state.in_(_TRAINING))
            .group_by(t.Task.node_id)
        ).all()
    )
    instances = dict(
        session.execute(
            select(t.Instance.node_id, func.count())
            .where(t.Instance.state.in_(_LIVE_INSTANCES))
            .group_by(t.Instance.node_id)
        ).all()
    )
    return [
        NodeLoad(
            id=n.id,
            name=n.name,
            url=n.url,
            state=NodeState(n.state),
            trainings=trainings.get(n.id, 0),
            instances=instances.get(n.id, 0),
        )
        for n in session.scalars(select(t.Node))
    ]


def trainings_in_flight(session: Session) -> tuple[list[TrainingView], dict[str, NodeState]]:
    tasks = session.scalars(
        select(t.Task).where(t.Task.kind == TaskKind.TRAIN.value, t.Task.state.in_(_TRAINING))
    ).all()
    nodes = {n.id: n for n in session.scalars(select(t.Node))}
    views = []
    for task in tasks:
        found = fine_tune_of_task(session, task.id)
        if found is not None:
            node = nodes.get(task.node_id or "")
            name = node.name if node is not None else None
            views.append(
                TrainingView(task.id, found[2].id, task.node_id, name, task.started_at or 0.0)
            )
    return views, {n.id: NodeState(n.state) for n in nodes.values()}


def node_url(session: Session, node_id: str | None) -> str | None:
    node = session.get(t.Node, node_id) if node_id else None
    return None if node is None else node.url


def fine_tuned_models(session: Session) -> list[t.Model]:
    query = select(t.Model).where(t.Model.name.startswith("ft:")).order_by(t.Model.created_at)
    return list(session.scalars(query))
