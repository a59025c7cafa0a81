"""Reading a Hugging Face folder's safetensors weights, one tensor at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dataplane.flowserve.errors import ConfigError

INDEX_FILE = "model.safetensors.index.json"


def weight_files(path: str | Path) -> list[Path]:
    """The folder's weight files: those its index names when it has one (a folder may also hold
    other exports, such as Mistral's consolidated.safetensors), else every *.safetensors."""
    folder = Path(path)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"cannot read {index}: {exc}") from exc
        files = [folder / name for name in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ConfigError(f"{index} names weight files that are not there: {absent}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} has no *.safetensors weight files")
    return files


def iter_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in the folder's weight files, on the CPU, as stored."""
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name)
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"cannot read {file}: {exc}") from exc
