from __future__ import annotations

from pathlib import Path

import pytest
from cli_fakes import FakeApi, Invoke
from typer.testing import CliRunner, Result

# Imported while pytest still has the repository root on sys.path: later, `tests/dataplane` (no
# __init__.py) would shadow the real package as a namespace package.
import dataplane.modelstore  # noqa: F401
from deepflow_cli import main
from deepflow_cli.client import DeepFlowClient


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DEEPFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DEEPFLOW_URL", raising=False)
    return tmp_path / "home"


@pytest.fixture
def api(home: Path, monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi()

    def factory(url: str) -> DeepFlowClient:
        fake.urls.append(url)
        return DeepFlowClient(url, transport=fake.transport())

    monkeypatch.setattr(main, "client_factory", factory)
    return fake


@pytest.fixture
def cli(api: FakeApi) -> Invoke:
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Result:
        return runner.invoke(main.app, list(args), input=input)

    return invoke
