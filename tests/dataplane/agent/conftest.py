"""Fixtures for the node agent tests; the fakes live in `agent_fakes.py`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_fakes import FAKE_INSTANCE

from controlplane.wire import InstanceStart


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
