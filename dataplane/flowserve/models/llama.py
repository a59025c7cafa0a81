"""Llama (and Mistral, Qwen2) over a paged KV cache.

Numerically this follows transformers' LlamaForCausalLM op for op (RMSNorm in float32, rope
cos/sin cast to the model dtype, residual adds in the model dtype), so float32 logits match it to
rounding. q/k/v and gate/up are fused into one matmul each; `load_weights` maps the checkpoint's
separate tensors into their slices.

`use_fused_kernels()` swaps in FlowServe's Triton kernels (RMSNorm fused with the residual add,
rotary in place, SiLU fused with the up product, the KV store and paged attention through a
`PagedAttentionMetadata`); they round where transformers rounds, so the numbers stay the same up
to summation order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from dataplane.flowserve.attention import KVCache
from dataplane.flowserve.errors import ConfigError
from dataplane.flowserve.models.config import ModelConfig

if TYPE_CHECKING:
    from dataplane.flowserve.paged_metadata import PagedAttentionMetadata

# Checkpoint tensors we do not need: old exports saved the rope frequencies.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class AttentionMeta(Protocol):
    """What the model needs of a step's attention metadata (`attention.AttentionMetadata` on the
    host path, `paged_metadata.PagedAttentionMetadata` with the Triton kernels)."""

    positions: torch.Tensor  # [T] long

    def attend(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: KVCache,
        scale: float,
    ) -> torch.Tensor: ...  # [T, num_heads, head_dim]; k/v stored into kv_cache first


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernels: ModuleType | None = None  # FlowServe's Triton kernels, when fused

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); with no residual, (norm(x), x)."""
        if self.kernels is not None:
            if residual is None:
                return self.kernels.rms_norm(x, self.weight, self.eps), x
            return self.kernels.rms_norm(x, self.weight, self.eps, residual=residual), residual
        if residual is not None:
            x = x + residual
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype), x


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:  # [head_dim // 2] float32
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama 3.1: long wavelengths are stretched by `factor`, short ones kept, and the band
    # between them interpolated smoothly.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin of every position up to `max_positions`, looked up by position."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.max_positions = max_positions
        shape = (max_positions, config.head_dim // 2)
        self.register_buffer("cos", torch.empty(shape), persistent=False)
        self.register_buffer("sin", torch.empty(shape), persistent=False)
        if not self.cos.is_meta:
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Compute the tables into the buffers (again after `to_empty`), in float32 on the
        CPU whatever the buffers' dtype and device, as transformers does."""
        positions = torch.arange(self.max_positions, dtype=torch.float, device="cpu")
        freqs = positions[:, None] * rope_inv_freq(self.config)[None, :]
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [T, 1, head_dim // 2] each, to broadcast over heads
        return self.cos[positions][:, None, :], self.sin[positions][:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim] in the rotate-half layout of transformers' Llama."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.kernels: ModuleType | None = None
        # The model's cos/sin tables [max_positions, head_dim // 2], for the fused rope kernel.
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor | None,  # [T, 1, head_dim // 2]; None with the fused rope kernel
        sin: torch.Tensor | None,
        kv_cache: KVCache,
        meta: AttentionMeta,
    ) -> torch.Tensor:  # [T, hidden]
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (heads + 2 * kv_heads) * head_dim]
        num_qk_heads = self.num_heads + self.num_kv_heads
        # q and k are adjacent in qkv, so one rope call rotates both.
        qk = qkv[:, : num_qk_heads * self.head_dim].view(num_tokens, num_qk_heads, self.head_dim)
        v = qkv[:, num_qk_heads * self.head_dim :].view(num_tokens, self.num_kv_heads, -1)
        if self.kernels is not None and self.rope_tables is not None:
            # The kernel path's metadata: rotary and the KV store in one kernel.
            paged = cast("PagedAttentionMetadata", meta)
            store = (v, kv_cache[0], kv_cache[1], paged.slot_mapping)
            self.kernels.rotary_embedding(qk, meta.positions, *self.rope_tables, store=store)
            q = qk[:, : self.num_heads]
            o = paged.attend_cached(q, kv_cache, self.scale)  # [T, heads, head_dim]
        else:
            assert cos is not None and sin is not None
            qk = apply_rope(qk, cos, sin)  # [T, heads + kv_heads, head_dim]
            q, k = torch.split(qk, [self.num_heads, self.num_kv_heads], dim=1)
            o = meta.attend(q, k, v, kv_cache, self.scale)  # [T, heads, head_dim]
        out: torch.Tensor = self.o_proj(o.reshape(num_tokens, self.num_heads * self.head_dim))
        return out


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias
        )
        self.down_proj = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )
        self.kernels: ModuleType | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        gate_up = self.gate_up_proj(x)  # [T, 2 * intermediate]
        if self.kernels is not None:
            fused: torch.Tensor = self.down_proj(self.kernels.silu_and_mul(gate_up))
            return fused
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        out: torch.Tensor = self.down_proj(F.silu(gate) * up)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]: the previous layer's output (the embeddings for the first)
        residual: torch.Tensor | None,  # [T, hidden]: the stream x adds to; None for the first
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        kv_cache: KVCache,
        meta: AttentionMeta,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream it adds to): the add is left to the next
        norm, which fuses it."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int | None = None) -> None:
        """`max_positions` sizes the rope tables (default: the model's max_position_embeddings);
        the engine passes its max_model_len."""
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config, max_positions or config.max_position_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Linear | None = None  # tied: logits use embed_tokens.weight
        self.kernels: ModuleType | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] long
        positions: torch.Tensor,  # [T] long
        kv_caches: list[KVCache],  # one (k, v) per layer
        meta: AttentionMeta,
    ) -> torch.Tensor:  # [T, hidden]
        cos = sin = None
        if self.kernels is None:
            cos, sin = self.rotary(positions)  # looked up once, shared by every layer
        x = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        hidden: torch.Tensor = self.norm(x, residual)[0]
        return hidden

    def use_fused_kernels(self) -> None:
        """Run RMSNorm, rotary, the KV store and attention through FlowServe's Triton kernels
        (the step's metadata must then be a `PagedAttentionMetadata`)."""
        from dataplane.flowserve import kernels

        self.kernels = kernels
        for module in list(self.modules()):
            if isinstance(module, RMSNorm | Attention | MLP):
                module.kernels = kernels
            if isinstance(module, Attention):
                module.rope_tables = (self.rotary.cos, self.rotary.sin)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in the model dtype, for the rows that sample."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def checkpoint_layout(self) -> dict[str, tuple[str, int, int]]:
        """Every tensor a checkpoint must hold: its Hugging Face name -> (our parameter, first
        row, number of rows) — fused parameters take several checkpoint tensors."""
        c = self.config
        layout: dict[str, tuple[str, int, int]] = {}
        fused = {
            "self_attn.qkv_proj": (
                ("self_attn.q_proj", 0, c.q_size),
                ("self_attn.k_proj", c.q_size, c.kv_size),
                ("self_attn.v_proj", c.q_size + c.kv_size, c.kv_size),
            ),
            "mlp.gate_up_proj": (
                ("mlp.gate_proj", 0, c.intermediate_size),
                ("mlp.up_proj", c.intermediate_size, c.intermediate_size),
            ),
        }
        for name, param in self.named_parameters():
            prefix, _, kind = name.rpartition(".")  # kind: weight | bias
            module = prefix.split(".", 2)[-1] if prefix.startswith("layers.") else prefix
            parts = fused.get(module)
            hf_prefix = "lm_head" if prefix == "lm_head" else f"model.{prefix}"
            if parts is None:
                layout[f"{hf_prefix}.{kind}"] = (name, 0, param.shape[0])
                continue
            layer_prefix = hf_prefix[: -len(module)]
            for hf_module, first, rows in parts:
                layout[f"{layer_prefix}{hf_module}.{kind}"] = (name, first, rows)
        return layout

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) in; every parameter must be covered and
        every tensor used, else ConfigError names the culprits."""
        layout = self.checkpoint_layout()
        params = dict(self.named_parameters())
        unexpected: list[str] = []
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            target = layout.get(hf_name)
            if target is None:
                tied_head = hf_name == "lm_head.weight" and self.lm_head is None
                if not tied_head and not hf_name.endswith(_IGNORED_SUFFIXES):
                    unexpected.append(hf_name)
                continue
            name, first, rows = target
            dest = params[name].narrow(0, first, rows)
            if dest.shape != tensor.shape:
                raise ConfigError(
                    f"checkpoint tensor {hf_name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            loaded.add(hf_name)
        missing = sorted(set(layout) - loaded)
        if unexpected or missing:
            problems = []
            if missing:
                problems.append(f"missing tensors {_some(missing)}")
            if unexpected:
                problems.append(f"unexpected tensors {_some(sorted(unexpected))}")
            raise ConfigError(
                f"the checkpoint does not fit a {self.config.model_type} model with this config: "
                + "; ".join(problems)
            )


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
