"""Training tasks (control plane -> node agent -> trainer process)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from controlplane.wire.base import Open, Strict

# ---------------------------------------------------------------------------------------------
# Training tasks (control plane -> node agent -> trainer process)
# ---------------------------------------------------------------------------------------------


class TrainingHyperparameters(Strict):
    n_epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    seed: int = 0
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    checkpoint_every: int = Field(default=50, ge=1)  # steps
    max_seq_len: int = Field(default=1024, ge=16)


class TrainingStart(Strict):
    task_id: str = Field(min_length=1)
    job_id: str = Field(min_length=1)
    base_model_path: str
    training_file: str
    validation_file: str | None = None
    output_dir: str
    hyperparameters: TrainingHyperparameters
    resume_from: str | None = None  # a checkpoint folder written by an earlier run


class TrainingProgress(Open):
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens: int  # trained tokens so far
    elapsed_s: float


class TrainingCheckpoint(Open):
    step: int
    path: str
    metrics: dict[str, float] = Field(default_factory=dict)


class TrainingResult(Open):
    merged_model_path: str
    adapter_path: str
    trained_tokens: int
    train_loss: float
    valid_loss: float | None = None
    steps: int


TrainingState = Literal["starting", "running", "succeeded", "failed", "stopped"]


class TrainingReport(Open):
    """What the agent tells the control plane about one training task, pushed on every change."""

    task_id: str
    state: TrainingState
    pid: int | None = None  # the trainer process on the node
    # what runs it: a warm pod taken from the node's pool (no imports to wait for), or a new process
    executor: Literal["warm_pod", "process"] | None = None
    progress: TrainingProgress | None = None
    checkpoint: TrainingCheckpoint | None = None
    result: TrainingResult | None = None
    exit_code: int | None = None
    reason: str | None = None
