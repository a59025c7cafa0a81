"""`deepflow models pull|import|create-random` drive the model store, then register."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_fakes import FakeApi, Invoke, error_reply, model

import dataplane.modelstore as modelstore
from deepflow_cli.commands.models import sanitize
from deepflow_cli.errors import ExitCode


class FakeStore:
    """Stands in for the model store's writers; `inspect_folder` accepts folders it wrote."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Path, dict[str, Any]]] = []

    def _write(self, dest: Path, progress: Any) -> Path:
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        if progress is not None:
            progress("convert", 1, 2)
            progress("convert", 2, 2)
            progress("write", 10, 10)
        return dest

    def pull(self, source: str, dest: Path, *, progress: Any = None) -> Path:
        self.calls.append(("pull", dest, {"source": source}))
        return self._write(dest, progress)

    def create_random(self, dest: Path, preset: str, **kwargs: Any) -> Path:
        self.calls.append(("create_random", dest, {"preset": preset, **kwargs}))
        return self._write(dest, kwargs.get("progress"))

    def inspect_folder(self, path: Path) -> object:
        if not (path / "config.json").is_file():
            raise modelstore.InvalidModelFolder(f"{path} has no config.json")
        return object()


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> FakeStore:
    fake = FakeStore()
    for name in ("pull", "create_random", "inspect_folder"):
        monkeypatch.setattr(modelstore, name, getattr(fake, name))
    return fake


def test_pull_converts_then_registers(
    api: FakeApi, cli: Invoke, store: FakeStore, home: Path
) -> None:
    dest = home / "models" / "smollm2-135m-instruct"
    api.on("POST", "/api/v1/models", model("smollm2-135m-instruct", str(dest)))
    result = cli("models", "pull", "smollm2-135m-instruct")
    assert result.exit_code == 0, result.output
    assert [c[0] for c in store.calls] == ["pull"] and store.calls[0][1] == dest
    assert api.bodies("POST", "/api/v1/models") == [
        {"name": "smollm2-135m-instruct", "path": str(dest), "source": "pull:smollm2-135m-instruct"}
    ]
    assert "registered model smollm2-135m-instruct" in result.stdout


def test_pull_again_reuses_the_folder_and_accepts_409(
    api: FakeApi, cli: Invoke, store: FakeStore, home: Path
) -> None:
    dest = home / "models" / "smol"
    store._write(dest, None)
    api.on("POST", "/api/v1/models", error_reply(409, "model smol already exists"))
    api.on("GET", "/api/v1/models/smol", model("smol", str(dest)))
    result = cli("models", "pull", "smollm2-135m-instruct", "--name", "smol")
    assert result.exit_code == 0, result.output
    assert store.calls == []
    assert "already registered" in result.stdout


def test_pull_409_with_another_path_is_an_error(
    api: FakeApi, cli: Invoke, store: FakeStore
) -> None:
    api.on("POST", "/api/v1/models", error_reply(409, "model smol already exists"))
    api.on("GET", "/api/v1/models/smol", model("smol", "/elsewhere"))
    result = cli("models", "pull", "smollm2-135m-instruct", "--name", "smol")
    assert result.exit_code == ExitCode.ERROR
    assert "already registered with path /elsewhere" in result.stderr


def test_pull_force_converts_again(api: FakeApi, cli: Invoke, store: FakeStore, home: Path) -> None:
    dest = home / "models" / "smol"
    store._write(dest, None)
    (dest / "stale").write_text("x")
    api.on("POST", "/api/v1/models", model("smol", str(dest)))
    result = cli("models", "pull", "smollm2-135m-instruct", "-n", "smol", "--force")
    assert result.exit_code == 0, result.output
    assert [c[0] for c in store.calls] == ["pull"]
    assert not (dest / "stale").exists()


def test_pull_unknown_source_is_one_line(api: FakeApi, cli: Invoke, home: Path) -> None:
    result = cli("models", "pull", "no-such-source")
    assert result.exit_code == ExitCode.ERROR
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown source" in lines[0]
    assert api.seen == []


def test_import_registers_the_absolute_path(
    api: FakeApi, cli: Invoke, store: FakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "My_Model"
    store._write(folder, None)
    api.on("POST", "/api/v1/models", model("my_model", str(folder)))
    monkeypatch.chdir(tmp_path)
    result = cli("models", "import", "My_Model")
    assert result.exit_code == 0, result.output
    assert api.bodies("POST", "/api/v1/models") == [
        {"name": "my_model", "path": str(folder), "source": "import"}
    ]


def test_import_of_an_invalid_folder(
    api: FakeApi, cli: Invoke, store: FakeStore, tmp_path: Path
) -> None:
    result = cli("models", "import", str(tmp_path))
    assert result.exit_code == ExitCode.ERROR
    assert "has no config.json" in result.stderr
    assert api.seen == []


def test_create_random(api: FakeApi, cli: Invoke, store: FakeStore, home: Path) -> None:
    api.on("POST", "/api/v1/models", model("rand"))
    result = cli("models", "create-random", "rand", "--preset", "tiny", "--seed", "3")
    assert result.exit_code == 0, result.output
    ((kind, dest, kwargs),) = store.calls
    assert dest == home / "models" / "rand"
    assert (kwargs["preset"], kwargs["seed"], kwargs["dtype"]) == ("tiny", 3, "float32")
    (body,) = api.bodies("POST", "/api/v1/models")
    assert body["name"] == "rand" and body["source"].startswith("random:tiny")

    again = cli("models", "create-random", "rand", "--preset", "tiny")
    assert again.exit_code == ExitCode.ERROR and "--force" in again.stderr


def test_create_random_rejects_unknown_presets(cli: Invoke) -> None:
    assert cli("models", "create-random", "x", "--preset", "huge").exit_code == ExitCode.USAGE


def test_sanitize() -> None:
    assert sanitize("HuggingFaceTB/SmolLM2 135M") == "huggingfacetb-smollm2-135m"
    assert sanitize("-x-") == "x"


def test_the_cli_starts_without_the_model_store_or_torch() -> None:
    code = (
        "import sys, deepflow_cli.main\n"
        "assert 'dataplane.modelstore' not in sys.modules\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
