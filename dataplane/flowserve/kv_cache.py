"""The paged KV cache: how much memory it gets, how many blocks that is, and the tensors.

Per layer `k, v: [num_blocks, block_size, num_kv_heads, head_dim]`, all layers views of one
allocation `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dataplane.flowserve.attention import KVCache
from dataplane.flowserve.errors import ConfigError
from dataplane.flowserve.models.config import ModelConfig
from dataplane.flowserve.platform import _mem_available_from_proc, get_platform

__all__ = ["_mem_available_from_proc"]  # kept importable from here for old callers

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVCacheBudget:
    """The bytes given to the KV cache, and how they were chosen (for the start-up log)."""

    num_bytes: int
    free_bytes: int | None  # free device memory when measured; None for a fixed budget
    fraction: float | None  # the share of free_bytes taken; None for a fixed budget

    def describe(self) -> str:
        gib = self.num_bytes / 1024**3
        if self.fraction is None or self.free_bytes is None:
            return f"{gib:.2f} GiB (fixed)"
        return f"{gib:.2f} GiB ({self.fraction:g} of {self.free_bytes / 1024**3:.2f} GiB free)"


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of `block_size` tokens in every layer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * block_size * itemsize


def num_blocks_for_budget(
    budget_bytes: int, config: ModelConfig, block_size: int, dtype: torch.dtype
) -> int:
    block_bytes = bytes_per_block(config, block_size, dtype)
    num_blocks = budget_bytes // block_bytes
    if num_blocks < 1:
        raise ConfigError(
            f"a KV cache budget of {budget_bytes} bytes holds no block "
            f"(one block of {block_size} tokens takes {block_bytes} bytes)"
        )
    return num_blocks


def free_memory(device: torch.device) -> int:
    """Bytes free now on `device` (its platform measures)."""
    return get_platform(device).free_memory()


def resolve_kv_cache_budget(
    device: torch.device,
    *,
    num_bytes: int | None = None,
    fraction: float | None = None,
    reserved_bytes: int = 0,
) -> KVCacheBudget:
    """Exactly one of a fixed `num_bytes` or a `fraction` (0, 1] of the memory free now, less
    `reserved_bytes` (the activations' peak, from a profiling pass or a stored profile).
    Measure after the model is loaded, since the cache gets a share of what is left."""
    if (num_bytes is None) == (fraction is None):
        raise ConfigError("give the KV cache budget as either bytes or a fraction of free memory")
    if num_bytes is not None:
        if num_bytes < 1:
            raise ConfigError(f"the KV cache budget must be positive, not {num_bytes} bytes")
        return KVCacheBudget(num_bytes=num_bytes, free_bytes=None, fraction=None)
    assert fraction is not None
    if not 0 < fraction <= 1:
        raise ConfigError(f"the KV cache fraction must be in (0, 1], not {fraction}")
    free = max(0, free_memory(device) - reserved_bytes)
    return KVCacheBudget(num_bytes=int(free * fraction), free_bytes=free, fraction=fraction)


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    """What a profiling pass measured, stored so that a scale-up of the same model and config
    on the same kind of device can size its KV cache without running the pass again."""

    key: str  # model, device kind, dtype and the batch limits the pass ran at
    activation_bytes: int  # peak allocated during the pass, over what the weights hold

    @staticmethod
    def load(path: Path, key: str) -> MemoryProfile | None:
        """The stored profile for `key`, or None (no file, unreadable, or another key)."""
        try:
            data = json.loads(path.read_text())
            profile = MemoryProfile(str(data["key"]), int(data["activation_bytes"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if profile.key != key:
            log.info("memory profile %s is for another config; profiling again", path)
            return None
        return profile

    def save(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self)) + "\n")
            tmp.replace(path)
        except OSError as exc:  # a read-only model store must not stop the instance
            log.warning("cannot store the memory profile at %s: %s", path, exc)


def allocate_kv_cache(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[KVCache]:
    """Zeroed, so that padding gathered from never-written slots is finite: masked-out
    positions get weight 0, and 0 * NaN would still poison the output. (The runner asks for one
    block more than the block manager hands out: padded graph rows write there.)"""
    cache = torch.zeros(
        (
            config.num_hidden_layers,
            2,
            num_blocks,
            block_size,
            config.num_key_value_heads,
            config.head_dim,
        ),
        dtype=dtype,
        device=device,
    )
    return [(layer[0], layer[1]) for layer in cache]
