"""FlowServe's model code: `load_model(path, dtype, device)` builds the model of a Hugging Face
folder over a paged KV cache and loads its safetensors weights."""

from __future__ import annotations

from pathlib import Path

import torch

from dataplane.flowserve.attention import KVCache
from dataplane.flowserve.models.config import Llama3RopeScaling, ModelConfig
from dataplane.flowserve.models.llama import LlamaForCausalLM
from dataplane.flowserve.weights import iter_weights

__all__ = ["KVCache", "Llama3RopeScaling", "LlamaForCausalLM", "ModelConfig", "load_model"]


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    *,
    max_positions: int | None = None,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """The model of the folder at `path`, in eval mode, weights in `dtype` on `device`.
    `max_positions` sizes the rope tables (pass max_model_len; default max_position_embeddings).
    Raises ConfigError for an unsupported config or weights that do not fit it."""
    config = ModelConfig.from_folder(path)
    # Built without memory, then given uninitialised memory: no time spent on random init.
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions)
    model = model.to(dtype).to_empty(device=device)
    model.rotary.refresh()
    model.load_weights(iter_weights(path))
    model.requires_grad_(False)
    return model.eval(), config
