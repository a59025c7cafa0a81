"""OpenAI's files and fine-tuning objects (docs/fine-tuning.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from controlplane.wire.base import Open, Strict

# ---------------------------------------------------------------------------------------------
# OpenAI: files and fine-tuning (docs/fine-tuning.md)
# ---------------------------------------------------------------------------------------------

FilePurpose = Literal["fine-tune", "batch", "assistants", "user_data", "evals", "vision"]


class FileObject(Open):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(Open):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class Page(Open):
    """OpenAI's cursor page: newest first; pass the last id as `after` for the next page."""

    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


Auto = Literal["auto"]


class Hyperparameters(Strict):
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] = "auto"


class LoraConfig(Strict):
    """DeepFlow's extra: the LoRA shape (OpenAI does not expose it)."""

    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=16.0, gt=0)


class SupervisedMethod(Strict):
    hyperparameters: Hyperparameters | None = None


class FineTuneMethod(Strict):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod | None = None


class FineTuningJobCreate(Strict):
    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: FineTuneMethod | None = None
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[a-zA-Z0-9_-]*$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    lora: LoraConfig | None = None

    def chosen_hyperparameters(self) -> Hyperparameters:
        if self.method is not None and self.method.supervised is not None:
            if self.method.supervised.hyperparameters is not None:
                return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


class ResolvedHyperparameters(Open):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class FineTuningError(Open):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(Open):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: FineTuningError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: ResolvedHyperparameters
    model: str
    organization_id: str = "deepflow"
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None
    user_provided_suffix: str | None = None
    request_id: str | None = None  # DeepFlow: the request record behind the job


class FineTuningEvent(Open):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class FineTuningCheckpoint(Open):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int
