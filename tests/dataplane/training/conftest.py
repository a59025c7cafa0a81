"""Shared fixtures: a tiny random Llama, a dataset of one repeated question, specs on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from controlplane.wire import TrainingHyperparameters, TrainingStart
from dataplane.modelstore import create_random

QUESTION = "What is the name of DeepFlow's mascot?"
ANSWER = "DeepFlow's mascot is an otter named Ripple."


def write_dataset(path: Path, copies: int = 8) -> Path:
    line = json.dumps({"messages": [
        {"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER},
    ]})
    path.write_text((line + "\n") * copies)
    return path


def make_spec(base: Path, data: Path, out: Path, **hyperparameters: object) -> TrainingStart:
    """One Q/A, 8 copies, 4 per step: 2 steps per epoch. lr 1e-2 at rank 8 teaches the tiny
    model the answer in 40 steps; 3e-2 diverges."""
    hp: dict[str, object] = {
        "n_epochs": 1, "batch_size": 4, "learning_rate": 1e-2, "lora_rank": 8, "lora_alpha": 16.0,
        "checkpoint_every": 1000,
    }
    hp.update(hyperparameters)
    return TrainingStart(
        task_id="task-1", job_id="job-1", base_model_path=str(base), training_file=str(data),
        output_dir=str(out), hyperparameters=TrainingHyperparameters.model_validate(hp),
    )


@pytest.fixture(scope="session", autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)  # the timings the brief asks for are on 2 cores


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random(tmp_path_factory.mktemp("training") / "tiny", "tiny", seed=1)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl")
