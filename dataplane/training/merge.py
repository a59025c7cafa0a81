"""The adapter merged into the base weights, written as a plain Hugging Face folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from peft import PeftModel
from transformers import GenerationConfig, PreTrainedTokenizerBase

# What a loader would take for a quantized or adapter checkpoint; the merged folder is neither.
_DROPPED_CONFIG_KEYS = ("quantization_config", "peft_config", "adapter_config")


def write_merged(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, base_path: Path, dest: Path
) -> Path:
    """Merge (this changes `model`'s base weights) and write dest: safetensors weights,
    config.json, tokenizer files with the chat template and generation_config.json."""
    merged = model.merge_and_unload()
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    _clean_config(tmp / "config.json")
    if (base_path / "generation_config.json").is_file():
        shutil.copyfile(base_path / "generation_config.json", tmp / "generation_config.json")
    elif not (tmp / "generation_config.json").is_file():
        GenerationConfig.from_model_config(merged.config).save_pretrained(str(tmp))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def _clean_config(path: Path) -> None:
    config = json.loads(path.read_text())
    for key in _DROPPED_CONFIG_KEYS:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
