from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dataplane.modelstore import InvalidModelFolder, ModelStoreError, inspect_folder


@pytest.fixture
def folder(tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model, free to break."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_good_folder(tiny_model: Path) -> None:
    info = inspect_folder(tiny_model)
    assert info.architecture == "LlamaForCausalLM"
    assert info.model_type == "llama"
    # The tiny preset: hidden 64, 4 heads of 16, 2 kv heads, mlp 128, vocab 512, tied.
    attention = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64
    layer = attention + 3 * 64 * 128 + 2 * 64
    assert info.num_parameters == 512 * 64 + 2 * layer + 64
    assert info.size_bytes == sum(p.stat().st_size for p in tiny_model.iterdir())
    assert info.has_tokenizer and info.has_chat_template


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFolder, match="does not exist"):
        inspect_folder(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidModelFolder, match="not a directory"):
        inspect_folder(tmp_path / "file")


def test_no_config(folder: Path) -> None:
    (folder / "config.json").unlink()
    with pytest.raises(InvalidModelFolder, match="no config.json"):
        inspect_folder(folder)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff"])
def test_config_not_a_json_object(folder: Path, text: str) -> None:
    (folder / "config.json").write_text(text, encoding="latin-1")
    with pytest.raises(InvalidModelFolder, match="config.json"):
        inspect_folder(folder)


def test_no_model_type(folder: Path) -> None:
    _edit_config(folder, model_type=None)
    with pytest.raises(InvalidModelFolder, match="no model_type"):
        inspect_folder(folder)


def test_unsupported_model_type_is_named(folder: Path) -> None:
    _edit_config(folder, model_type="gpt2")
    with pytest.raises(InvalidModelFolder, match="'gpt2'.*llama, mistral, qwen2"):
        inspect_folder(folder)


@pytest.mark.parametrize(
    ("model_type", "architecture"),
    [("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM")],
)
def test_architecture_defaults_from_model_type(
    folder: Path, model_type: str, architecture: str
) -> None:
    _edit_config(folder, model_type=model_type, architectures=None)
    info = inspect_folder(folder)
    assert (info.model_type, info.architecture) == (model_type, architecture)


def test_no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    with pytest.raises(InvalidModelFolder, match=r"no \*.safetensors"):
        inspect_folder(folder)


@pytest.mark.parametrize("content", [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}", b"\xff" * 16])
def test_corrupt_weights(folder: Path, content: bytes) -> None:
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(InvalidModelFolder, match="not a safetensors file"):
        inspect_folder(folder)


def test_no_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()
    with pytest.raises(InvalidModelFolder, match="no tokenizer files"):
        inspect_folder(folder)
    assert not inspect_folder(folder, require_tokenizer=False).has_tokenizer


def test_no_chat_template(folder: Path) -> None:
    (folder / "chat_template.jinja").unlink()
    assert not inspect_folder(folder).has_chat_template


def test_chat_template_in_tokenizer_config(folder: Path) -> None:
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert inspect_folder(folder).has_chat_template


def test_errors_share_one_base() -> None:
    assert issubclass(InvalidModelFolder, ModelStoreError)
