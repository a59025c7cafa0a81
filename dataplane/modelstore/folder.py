"""inspect_folder: check that a folder is a loadable Hugging Face causal LM and describe it.

Reads only config.json, tokenizer metadata and safetensors headers, never the tensors, so it is
quick even on an 8B model.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidModelFolder

# model_type -> the architecture FlowServe runs it with (used when config.json names none).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# Any one of these is enough for transformers to build a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# A safetensors header larger than this is a corrupt or foreign file, not a model shard.
MAX_HEADER_BYTES = 100 * 1024**2


@dataclass(slots=True, frozen=True)
class FolderInfo:
    path: Path
    architecture: str
    model_type: str
    num_parameters: int
    size_bytes: int  # every file in the folder
    has_tokenizer: bool
    has_chat_template: bool


def inspect_folder(path: Path, *, require_tokenizer: bool = True) -> FolderInfo:
    if not path.exists():
        raise InvalidModelFolder(f"{path} does not exist")
    if not path.is_dir():
        raise InvalidModelFolder(f"{path} is not a directory")
    config = _read_config(path)
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise InvalidModelFolder(f"{path / 'config.json'} has no model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        known = ", ".join(SUPPORTED_MODEL_TYPES)
        raise InvalidModelFolder(f"model_type {model_type!r} is not supported; supported: {known}")
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        raise InvalidModelFolder(f"{path} has no *.safetensors weight files")
    has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
    if require_tokenizer and not has_tokenizer:
        names = ", ".join(TOKENIZER_FILES)
        raise InvalidModelFolder(f"{path} has no tokenizer files (one of {names})")
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        architecture = architectures[0]
    else:
        architecture = SUPPORTED_MODEL_TYPES[model_type]
    return FolderInfo(
        path=path,
        architecture=architecture,
        model_type=model_type,
        num_parameters=sum(_count_parameters(f) for f in weight_files),
        size_bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        has_tokenizer=has_tokenizer,
        has_chat_template=_has_chat_template(path),
    )


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InvalidModelFolder(f"{path} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidModelFolder(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidModelFolder(f"{config_path} does not hold a JSON object")
    return config


def _count_parameters(weight_file: Path) -> int:
    """Sum of tensor sizes from the header: an 8-byte little-endian length, then that much JSON."""
    try:
        with weight_file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_HEADER_BYTES:
                raise ValueError(f"header of {header_len} bytes")
            header = json.loads(f.read(header_len))
        return sum(
            math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__"
        )
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise InvalidModelFolder(f"{weight_file} is not a safetensors file: {exc}") from exc


def _has_chat_template(path: Path) -> bool:
    # transformers 5 saves the template beside the tokenizer; older versions kept it in the
    # tokenizer config.
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config_path = path / "tokenizer_config.json"
    if not config_path.is_file():
        return False
    try:
        tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(tokenizer_config, dict) and bool(tokenizer_config.get("chat_template"))
