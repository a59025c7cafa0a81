"""Canned files and fine-tuning records (OpenAI's shapes) for the CLI tests."""

from __future__ import annotations

from typing import Any

from cli_fakes import NOW

from controlplane import wire

T0 = int(NOW)


def file_object(file_id: str = "file-abc", filename: str = "train.jsonl") -> wire.FileObject:
    return wire.FileObject(
        id=file_id, bytes=2048, created_at=T0, filename=filename, purpose="fine-tune"
    )


def job(
    status: str = "queued",
    *,
    job_id: str = "ftjob-1",
    fine_tuned_model: str | None = None,
    error: str | None = None,
) -> wire.FineTuningJob:
    return wire.FineTuningJob(
        id=job_id,
        created_at=T0,
        model="tiny",
        status=status,  # type: ignore[arg-type]
        training_file="file-abc",
        hyperparameters=wire.ResolvedHyperparameters(
            n_epochs=2, batch_size=4, learning_rate_multiplier=1.0
        ),
        seed=7,
        fine_tuned_model=fine_tuned_model,
        user_provided_suffix="demo",
        error=None if error is None else wire.FineTuningError(code="train_failed", message=error),
        finished_at=T0 + 60 if status in ("succeeded", "failed", "cancelled") else None,
    )


def message(event_id: str, text: str, at: int, level: str = "info") -> wire.FineTuningEvent:
    return wire.FineTuningEvent(
        id=event_id,
        created_at=at,
        level=level,  # type: ignore[arg-type]
        message=text,
    )


def metrics(step: int, total: int, loss: float, at: int) -> wire.FineTuningEvent:
    data: dict[str, Any] = {"step": step, "total_steps": total, "train_loss": loss}
    return wire.FineTuningEvent(
        id=f"ftevent-step-{step}",
        created_at=at,
        level="info",
        message=f"Step {step}/{total}: training loss={loss:.4f}",
        data=data,
        type="metrics",
    )


def checkpoint(step: int) -> wire.FineTuningCheckpoint:
    return wire.FineTuningCheckpoint(
        id=f"ftckpt-{step}",
        created_at=T0 + step,
        fine_tuned_model_checkpoint=f"ft:tiny:demo:ftjob-1:ckpt-step-{step}",
        fine_tuning_job_id="ftjob-1",
        metrics={"step": step, "train_loss": 1.25},
        step_number=step,
    )


def page(items: list[Any], has_more: bool = False) -> wire.Page:
    data = [item.model_dump(mode="json") for item in items]
    return wire.Page(
        data=data,
        has_more=has_more,
        first_id=items[0].id if items else None,
        last_id=items[-1].id if items else None,
    )
