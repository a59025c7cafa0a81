"""Fixtures for the node agent tests; the fakes live in `agent_fakes.py`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_fakes import FAKE_INSTANCE

from controlplane.wire import InstanceStart
from dataplane.modelstore import create_random


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake_instance_command(tmp_path: Path) -> Callable[[InstanceStart, int], list[str]]:
    script = tmp_path / "fake_instance.py"
    script.write_text(FAKE_INSTANCE)

    def command_for(start: InstanceStart, port: int) -> list[str]:
        return [sys.executable, str(script), "--port", str(port), "--mode", start.model]

    return command_for


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Llama and a chat JSONL of 8 rows (2 steps an epoch at batch size 4), for the
    training task tests."""
    root = tmp_path_factory.mktemp("training")
    data = root / "train.jsonl"
    row = {
        "messages": [
            {"role": "user", "content": "What is the name of DeepFlow's mascot?"},
            {"role": "assistant", "content": "DeepFlow's mascot is an otter named Ripple."},
        ]
    }
    data.write_text((json.dumps(row) + "\n") * 8)
    return {"base": create_random(root / "tiny", "tiny", seed=1), "data": data, "root": root}
