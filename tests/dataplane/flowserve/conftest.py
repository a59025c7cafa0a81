"""Shared fixtures: one tiny random Llama folder per session, engines on it, a live server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flowserve_live import LiveServer
from transformers import AutoModelForCausalLM, PreTrainedModel

from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.modelstore import create_random


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random(tmp_path_factory.mktemp("flowserve") / "tiny", "tiny", seed=1)


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture()
def engine(tiny_model_dir: Path) -> Engine:
    return Engine(EngineConfig(str(tiny_model_dir), max_num_seqs=4))


@pytest.fixture(scope="module")
def live_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    server = LiveServer(tiny_model_dir)
    server.start()
    yield server
    server.stop()
