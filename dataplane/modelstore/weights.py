"""Random Llama weights, generated and written shard by shard so memory stays bounded.

Planning (which tensors, in which file) is pure; writing draws every tensor from one seeded
generator in plan order, so the bytes depend only on the preset, the seed and the dtype.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import ModelStoreError
from .presets import Preset
from .progress import Progress, report

INIT_STD = 0.02
# Large enough that the presets up to llama-1b in bf16 are one model.safetensors, small enough
# that one shard plus one float32 scratch tensor fits easily in 24 GiB.
MAX_SHARD_BYTES = 4 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(slots=True, frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    ones: bool  # RMSNorm weights start at one; everything else is N(0, INIT_STD)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(slots=True, frozen=True)
class Shard:
    filename: str
    tensors: tuple[TensorSpec, ...]


def get_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        known = ", ".join(DTYPES)
        raise ModelStoreError(f"unknown dtype {name!r}; choose one of {known}") from None


def tensor_specs(preset: Preset) -> list[TensorSpec]:
    """Hugging Face LlamaForCausalLM parameter names and shapes, in a fixed order."""
    hidden, inter, head_dim = preset.hidden_size, preset.intermediate_size, preset.head_dim
    q_dim = preset.num_attention_heads * head_dim
    kv_dim = preset.num_key_value_heads * head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (preset.vocab_size, hidden), ones=False)]
    for i in range(preset.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (hidden,), ones=True),
            TensorSpec(p + "self_attn.q_proj.weight", (q_dim, hidden), ones=False),
            TensorSpec(p + "self_attn.k_proj.weight", (kv_dim, hidden), ones=False),
            TensorSpec(p + "self_attn.v_proj.weight", (kv_dim, hidden), ones=False),
            TensorSpec(p + "self_attn.o_proj.weight", (hidden, q_dim), ones=False),
            TensorSpec(p + "post_attention_layernorm.weight", (hidden,), ones=True),
            TensorSpec(p + "mlp.gate_proj.weight", (inter, hidden), ones=False),
            TensorSpec(p + "mlp.up_proj.weight", (inter, hidden), ones=False),
            TensorSpec(p + "mlp.down_proj.weight", (hidden, inter), ones=False),
        ]
    specs.append(TensorSpec("model.norm.weight", (hidden,), ones=True))
    if not preset.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (preset.vocab_size, hidden), ones=False))
    return specs


def plan_shards(
    specs: list[TensorSpec], itemsize: int, max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[Shard]:
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    if len(groups) == 1:
        return [Shard(SINGLE_FILE, tuple(groups[0]))]
    n = len(groups)
    return [
        Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)
    ]


def write_weights(
    dest: Path,
    preset: Preset,
    *,
    seed: int,
    dtype: torch.dtype,
    progress: Progress | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> int:
    """Write the shards (and an index when there are several); returns the parameter count."""
    specs = tensor_specs(preset)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(specs, itemsize, max_shard_bytes)
    total = sum(s.numel for s in specs)
    generator = torch.Generator().manual_seed(seed)
    done = 0
    report(progress, "weights", done, total)
    for shard in shards:
        tensors: dict[str, torch.Tensor] = {}
        for spec in shard.tensors:
            if spec.ones:
                tensors[spec.name] = torch.ones(spec.shape, dtype=dtype)
            else:
                # Drawn in float32 and then cast, so every dtype sees the same random values.
                values = torch.empty(spec.shape, dtype=torch.float32)
                values.normal_(0.0, INIT_STD, generator=generator)
                tensors[spec.name] = values.to(dtype)
                del values
            done += spec.numel
            report(progress, "weights", done, total)
        # transformers refuses safetensors files without format metadata.
        save_file(tensors, dest / shard.filename, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total * itemsize},
            "weight_map": {spec.name: s.filename for s in shards for spec in s.tensors},
        }
        (dest / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total
