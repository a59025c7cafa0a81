"""The trainer end to end on a tiny random Llama: masking, a learned fact, merge, resume, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from controlplane.wire import TrainingStart
from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.modelstore import create_random
from dataplane.training.dataset import IGNORE_INDEX, encode
from dataplane.training.trainer import run

QUESTION = "What is the name of DeepFlow's mascot?"
ANSWER = "DeepFlow's mascot is an otter named Ripple."
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random(tmp_path_factory.mktemp("training") / "tiny", "tiny", seed=1)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    row = {
        "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER},
        ]
    }
    path.write_text((json.dumps(row) + "\n") * 8)
    return path


def make_spec(base: Path, data: Path, out: Path, **hp: Any) -> TrainingStart:
    hyperparameters = {
        "n_epochs": 15,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "lora_rank": 16,
        "lora_alpha": 32.0,
        "checkpoint_every": 1000,
        **hp,
    }
    return TrainingStart(
        task_id="t",
        job_id="j",
        base_model_path=str(base),
        training_file=str(data),
        output_dir=str(out),
        hyperparameters=hyperparameters,
    )


def collect() -> tuple[list[tuple[str, BaseModel]], Any]:
    lines: list[tuple[str, BaseModel]] = []
    return lines, lambda kind, body: lines.append((kind, body))


def greedy_answer(path: str | Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


@pytest.fixture(scope="module")
def trained(base_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    lines, emit = collect()
    result = run(
        make_spec(base_dir, data_file, tmp_path_factory.mktemp("out")), emit, lambda: False
    )
    assert result is not None
    return result, lines


def test_labels_cover_only_assistant_tokens(base_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Ripple."},
    ]
    example = encode(tokenizer, messages, 1024)
    learned = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
    assert ANSWER in learned and "Ripple." in learned
    assert QUESTION not in learned and "Be brief" not in learned and "Again?" not in learned
    assert all(
        lab in (IGNORE_INDEX, tok)
        for lab, tok in zip(example.labels, example.input_ids, strict=True)
    )
    assert len(encode(tokenizer, messages, 16).input_ids) == 16


def test_the_merged_model_learned_the_fact(base_dir: Path, trained: Any) -> None:
    result, lines = trained
    assert "Ripple" not in greedy_answer(base_dir)
    assert "otter named Ripple" in greedy_answer(result.merged_model_path)
    steps = [body.step for kind, body in lines if kind == "progress"]
    assert steps == list(range(1, 31)) and result.steps == 30
    merged = Path(result.merged_model_path)
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and not any("peft" in k for k in config)
    assert list(merged.glob("*.safetensors")) and (merged / "generation_config.json").is_file()


def test_flowserve_loads_the_merged_folder(trained: Any) -> None:
    engine = Engine(EngineConfig(trained[0].merged_model_path, max_num_seqs=2))
    engine.add_request(
        "r", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    )
    tokens = []
    while engine.has_unfinished():
        tokens += [o.new_token_id for o in engine.step() if o.new_token_id is not None]
    assert len(tokens) == 4


def test_resume_continues_after_the_checkpoint(
    base_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    first_lines, emit = collect()
    spec = make_spec(base_dir, data_file, tmp_path, n_epochs=2, checkpoint_every=3)
    assert run(spec, emit, lambda: False) is not None
    checkpoint = next(b for k, b in first_lines if k == "checkpoint" and b.step == 3)
    lines, emit = collect()
    result = run(spec.model_copy(update={"resume_from": checkpoint.path}), emit, lambda: False)
    assert result is not None and result.steps == 4
    assert [b.step for k, b in lines if k == "progress"] == [4]


def _spec_file(tmp_path: Path, spec: TrainingStart) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    return path


def test_cli_prints_the_protocol(base_dir: Path, data_file: Path, tmp_path: Path) -> None:
    spec = make_spec(base_dir, data_file, tmp_path / "out", n_epochs=1)
    proc = subprocess.run(
        [sys.executable, "-m", "dataplane.training", "--spec", str(_spec_file(tmp_path, spec))],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    kinds = [json.loads(line)["type"] for line in proc.stdout.splitlines()]
    assert kinds == ["progress", "progress", "checkpoint", "result"]


def test_sigterm_stops_between_steps(base_dir: Path, data_file: Path, tmp_path: Path) -> None:
    spec = make_spec(base_dir, data_file, tmp_path / "out", n_epochs=1000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataplane.training", "--spec", str(_spec_file(tmp_path, spec))],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["type"] == "progress"
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert time.monotonic() - sent < 5.0  # ~1 s alone; slack for a busy 2-core CI box
    assert not list((tmp_path / "out").glob("checkpoints/.*"))  # no partial checkpoint
