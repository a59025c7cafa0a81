"""FlowServe's model code: `load_model(path, dtype, device)` builds the model of a Hugging Face
folder over a paged KV cache and loads its safetensors weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from dataplane.flowserve.attention import KVCache
from dataplane.flowserve.errors import ConfigError
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
    ready: Mapping[str, torch.Tensor] | None = None,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """The model of the folder at `path`, in eval mode, weights in `dtype` on `device`.
    `max_positions` sizes the rope tables (pass max_model_len; default max_position_embeddings).
    `ready` is the model's state already converted (`weights_cache`): tensors already on
    `device` become the parameters themselves (a shared mapping stays shared, another
    instance's GPU memory stays its), others are copied in.
    Raises ConfigError for an unsupported config or weights that do not fit it."""
    config = ModelConfig.from_folder(path)
    # Built without memory, then given uninitialised memory: no time spent on random init.
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions)
    model = model.to(dtype)
    in_place = ready is not None and all(_on(t, device) for t in ready.values())
    if ready is not None and in_place:
        # Already where they belong (a shared mapping, another instance's GPU memory, one
        # upload): they become the parameters; only the rest (rope tables) gets new memory.
        load_ready(model, ready, assign=True)
        _materialize(model, device)
    else:
        model = model.to_empty(device=device)
    model.rotary.refresh()
    if ready is None:
        model.load_weights(iter_weights(path))
    elif not in_place:
        load_ready(model, ready, assign=False)
    model.requires_grad_(False)
    return model.eval(), config


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and device.index in (None, tensor.device.index)


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Memory on `device` for what is still on the meta device (buffers the state lacks)."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)


def load_ready(model: LlamaForCausalLM, ready: Mapping[str, torch.Tensor], *, assign: bool) -> None:
    try:
        model.load_state_dict(ready, strict=True, assign=assign)
    except RuntimeError as exc:  # names the missing, unexpected or misshapen tensors
        raise ConfigError(f"the ready weights do not fit this model: {exc}") from exc
