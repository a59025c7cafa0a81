"""The store work of the fine-tune executor's steps: each function is one transaction.

They take a session, check that the job is still where the step expects it (a cancel may have
come first), move the records and return what the executor acts on next.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from controlplane import wire
from controlplane.db import file_store, store
from controlplane.db import fine_tune_store as fts
from controlplane.db import tables as t
from controlplane.errors import InvalidRequest, NotFound
from controlplane.jobs import fine_tune_plan as plan
from controlplane.jobs.chat_run import new_id
from controlplane.states import (
    FineTuneState,
    JobKind,
    JobState,
    RequestKind,
    RequestState,
    TaskKind,
    TaskState,
)

if TYPE_CHECKING:
    from dataplane.modelstore import FolderInfo

JOB_KINDS = (
    (JobKind.FINE_TUNE_VALIDATE, TaskKind.STEP),
    (JobKind.FINE_TUNE_TRAIN, TaskKind.TRAIN),
    (JobKind.FINE_TUNE_EVALUATE, TaskKind.STEP),
    (JobKind.FINE_TUNE_REGISTER, TaskKind.STEP),
)
MAX_REASON = 1000  # characters of a failure reason kept in events and errors


@dataclass(slots=True, frozen=True)
class Dispatch:
    """A train task placed on a node, to be sent there."""

    task_id: str
    node: plan.NodeLoad
    start: wire.TrainingStart
    restart: bool


@dataclass(slots=True, frozen=True)
class AttemptFailed:
    why: str


@dataclass(slots=True, frozen=True)
class TrainingDone:
    pass


@dataclass(slots=True, frozen=True)
class Unwanted:
    """A report for a task that is over for the control plane: the agent should drop it."""

    node_url: str | None


ReportOutcome = AttemptFailed | TrainingDone | Unwanted | None


def base_model(s: Session, name: str) -> t.Model:
    """`model` names a registered model, or a deployment whose model is used."""
    model = s.get(t.Model, name)
    if model is None:
        deployment = s.get(t.Deployment, name)
        model = s.get(t.Model, deployment.model) if deployment is not None else None
    if model is None:
        raise NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found")
    return model


def fine_tune_file(s: Session, file_id: str, param: str) -> t.File:
    row = s.get(t.File, file_id)
    if row is None:
        raise InvalidRequest(
            f"invalid {param}: no such file {file_id}", param=param, code="file_not_found"
        )
    if row.purpose != "fine-tune":
        raise InvalidRequest(
            f"invalid {param}: file {file_id} has purpose {row.purpose!r}, not 'fine-tune'",
            param=param,
            code="invalid_file_purpose",
        )
    return row


def create(
    s: Session, spec: wire.FineTuningJobCreate, fine_tune_id: str, output_dir: Path, now: float
) -> wire.FineTuningJob:
    base = base_model(s, spec.model)
    train = fine_tune_file(s, spec.training_file, "training_file")
    if spec.validation_file is not None:
        fine_tune_file(s, spec.validation_file, "validation_file")
    hp = plan.resolve_hyperparameters(spec.chosen_hyperparameters(), train.num_examples or 1)
    name = plan.fine_tuned_model_name(base.name, spec.suffix, fine_tune_id)
    if len(name) > plan.MAX_MODEL_NAME:
        raise InvalidRequest(
            f"the fine-tuned model's name {name!r} would be longer than {plan.MAX_MODEL_NAME}",
            param="suffix",
        )
    request = t.Request(
        id=new_id("ft"),
        kind=RequestKind.FINE_TUNE.value,
        state=RequestState.QUEUED.value,
        created_at=now,
    )
    jobs, tasks = [], []
    for job_kind, task_kind in JOB_KINDS:
        job = t.Job(
            id=new_id("job"),
            request_id=request.id,
            kind=job_kind.value,
            state=JobState.PENDING.value,
            created_at=now,
        )
        jobs.append(job)
        tasks.append(
            t.Task(
                id=new_id("task"),
                job_id=job.id,
                kind=task_kind.value,
                state=TaskState.PENDING.value,
                created_at=now,
            )
        )
    row = t.FineTune(
        id=fine_tune_id,
        request_id=request.id,
        state=FineTuneState.VALIDATING_FILES.value,
        model=base.name,
        training_file=spec.training_file,
        validation_file=spec.validation_file,
        hyperparameters=hp.model_dump(),
        lora=(spec.lora or wire.LoraConfig()).model_dump(),
        suffix=spec.suffix or None,
        seed=spec.seed if spec.seed is not None else secrets.randbelow(2**31),
        meta=spec.metadata,
        output_dir=str(output_dir),
        restarts=0,
        last_step=0,
        created_at=now,
        updated_at=now,
    )
    fts.insert_fine_tune(s, row, request, jobs, tasks, now)
    return fts.job_object(row)


def place(
    s: Session, fine_tune_id: str, avoid: frozenset[str], now: float
) -> Dispatch | str | None:
    """The pending train task on the least busy ready node ("wait" when none is ready)."""
    row = fts.get_fine_tune(s, fine_tune_id)
    if row.state not in (FineTuneState.QUEUED, FineTuneState.RUNNING):
        return None
    job = fts.job_of(s, row.request_id, JobKind.FINE_TUNE_TRAIN)
    task = fts.task_of(s, job.id)
    if task.state != TaskState.PENDING:
        return None
    node = plan.pick_node(fts.node_loads(s), avoid)
    if node is None:
        return "wait"
    store.change_state(
        s,
        "task",
        task.id,
        TaskState.DISPATCHED,
        f"sent to node {node.name}",
        now,
        node_id=node.id,
        started_at=now,
    )
    store.change_state(s, "job", job.id, JobState.RUNNING, "training placed", now)
    train = file_store.get_file(s, row.training_file)
    valid = file_store.get_file(s, row.validation_file) if row.validation_file else None
    hp = wire.ResolvedHyperparameters.model_validate(row.hyperparameters)
    start = wire.TrainingStart(
        task_id=task.id,
        job_id=row.id,
        base_model_path=base_model(s, row.model).path,
        training_file=train.path,
        validation_file=valid.path if valid is not None else None,
        output_dir=row.output_dir,
        hyperparameters=plan.training_hyperparameters(
            hp,
            num_examples=train.num_examples or 1,
            seed=row.seed,
            lora=wire.LoraConfig.model_validate(row.lora),
        ),
        resume_from=row.last_checkpoint,
    )
    return Dispatch(task.id, node, start, restart=row.restarts > 0)


def record_report(s: Session, report: wire.TrainingReport, now: float) -> ReportOutcome:
    found = fts.fine_tune_of_task(s, report.task_id)
    assert found is not None
    task, job, row = found
    if TaskState(task.state) in TaskState.terminal() or row.state not in fts.IN_FLIGHT:
        return Unwanted(fts.node_url(s, task.node_id))
    if task.state == TaskState.PENDING:
        return None  # not sent yet: a report from an earlier life of this id
    if report.state in ("running", "succeeded"):
        where = {"warm_pod": " in a warm pod", "process": " in a new process"}
        why = "training" + where.get(report.executor or "", "")
        store.change_state(s, "task", task.id, TaskState.RUNNING, why, now)
    progress = report.progress
    if progress is not None and progress.step > row.last_step:
        row.last_step = progress.step
        row.trained_tokens = progress.tokens
        data = {
            "step": progress.step,
            "total_steps": progress.total_steps,
            "train_loss": progress.loss,
            "epoch": progress.epoch,
            "learning_rate": progress.learning_rate,
            "trained_tokens": progress.tokens,
            "elapsed_s": progress.elapsed_s,
        }
        message = f"Step {progress.step}/{progress.total_steps}: training loss={progress.loss:.4f}"
        fts.add_event(s, row.id, message, now, type="metrics", data=data)
    if report.checkpoint is not None and fts.add_checkpoint(s, row, report.checkpoint, now):
        fts.add_event(s, row.id, f"Checkpoint created at step {report.checkpoint.step}", now)
    if report.state == "succeeded":
        result = report.result
        if result is None:
            return AttemptFailed("the trainer succeeded without a result")
        row.merged_path = result.merged_model_path
        row.trained_tokens = result.trained_tokens
        row.train_loss = result.train_loss
        row.valid_loss = result.valid_loss
        why = f"trained {result.steps} steps"
        store.change_state(s, "task", task.id, TaskState.SUCCEEDED, why, now, finished_at=now)
        store.change_state(s, "job", job.id, JobState.SUCCEEDED, why, now, finished_at=now)
        return TrainingDone()
    if report.state in ("failed", "stopped"):
        why = report.reason or f"trainer {report.state}"
        if len(why) > MAX_REASON:  # an agent's reason may carry a long stderr tail: keep its end
            why = "..." + why[-MAX_REASON:]
        if report.exit_code is not None:
            why = f"{why} (exit code {report.exit_code})"
        return AttemptFailed(why)
    return None


def end_attempt(
    s: Session, task_id: str, why: str, max_restarts: int, now: float
) -> tuple[bool, str | None, str | None, list[tuple[str, str]]] | None:
    """Fail the attempt's task; then a new task resumes from the last checkpoint, or (past
    `max_restarts`) the job fails. None when the task had already ended."""
    found = fts.fine_tune_of_task(s, task_id)
    assert found is not None
    task, job, row = found
    if TaskState(task.state) in TaskState.terminal() or row.state not in fts.IN_FLIGHT:
        return None
    node_url = fts.node_url(s, task.node_id)
    store.change_state(s, "task", task.id, TaskState.FAILED, why, now, finished_at=now, error=why)
    if row.restarts >= max_restarts:
        message = f"Training failed after {row.restarts} restarts: {why}"
        to_stop = fts.settle(
            s, row, FineTuneState.FAILED, message, now, error_code="training_failed"
        )
        return False, node_url, task.node_id, to_stop
    row.restarts += 1
    step = fts.checkpoint_step(s, row.id, row.last_checkpoint)
    row.last_step = step or 0
    fts.new_task(s, job, new_id("task"), TaskKind.TRAIN, now)
    where = f"from the checkpoint at step {step}" if step is not None else "from the start"
    message = (
        f"Training failed: {why}; restarting {where} (restart {row.restarts} of {max_restarts})"
    )
    fts.add_event(s, row.id, message, now, level="warn")
    return True, node_url, task.node_id, []


def evaluate(s: Session, fine_tune_id: str, now: float) -> str | None:
    """Record the validation loss; return the merged folder to register."""
    row = fts.get_fine_tune(s, fine_tune_id)
    if row.state != FineTuneState.RUNNING or row.merged_path is None:
        return None
    task = fts.start_step(s, row, JobKind.FINE_TUNE_EVALUATE, "evaluating", now)
    if row.valid_loss is not None:
        data = {"step": row.last_step, "train_loss": row.train_loss, "valid_loss": row.valid_loss}
        message = f"Validation loss={row.valid_loss:.4f}"
        fts.add_event(s, row.id, message, now, type="metrics", data=data)
        fts.finish_step(s, task, f"validation loss {row.valid_loss:.4f}", now)
    else:
        fts.finish_step(s, task, "no validation file", now)
    fts.start_step(s, row, JobKind.FINE_TUNE_REGISTER, "registering the model", now)
    return row.merged_path


def register(s: Session, fine_tune_id: str, info: FolderInfo, now: float) -> None:
    row = fts.get_fine_tune(s, fine_tune_id)
    if row.state != FineTuneState.RUNNING:
        return
    name = plan.fine_tuned_model_name(row.model, row.suffix, row.id)
    store.add_model(
        s,
        t.Model(
            name=name,
            path=str(info.path),
            source="fine-tune",
            architecture=info.architecture,
            num_parameters=info.num_parameters,
            size_bytes=info.size_bytes,
            created_at=now,
        ),
    )
    job = fts.job_of(s, row.request_id, JobKind.FINE_TUNE_REGISTER)
    fts.finish_step(s, fts.task_of(s, job.id), f"registered {name}", now)
    store.change_state(
        s, "request", row.request_id, RequestState.SUCCEEDED, "fine-tuned", now, finished_at=now
    )
    fts.add_event(s, row.id, f"New fine-tuned model created: {name}", now)
    fts.move_fine_tune(
        s,
        row,
        FineTuneState.SUCCEEDED,
        "The job has successfully completed",
        now,
        fine_tuned_model=name,
        finished_at=now,
    )
