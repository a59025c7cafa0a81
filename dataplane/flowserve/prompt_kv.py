"""A prompt's K/V outside the paged cache: what a prefill instance exports and a decode instance
imports (PD disaggregation, docs/flowserve.md).

`PromptKV.kv` is `[num_layers, 2, num_tokens, num_kv_heads, head_dim]` (index 0 of the second
axis is K, 1 is V) for tokens `0 .. num_tokens - 1`, in the order they sit in the prompt: the
layout depends on neither side's block size, so a prefill and a decode instance may page their
caches differently. K is stored as the cache holds it, i.e. after rotary embedding.

`gather_kv` and `scatter_kv` move tokens between that layout and the paged cache with index ops
on whatever device the cache lives on; the platform does the copies to and from the host. An
export for a hand-off through device memory (transport cuda_ipc) stays on the device instead,
and an import taken that way arrives on the device.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dataplane.flowserve.attention import KVCache
from dataplane.flowserve.errors import InvalidRequest
from dataplane.flowserve.platform import Platform


class KVMismatch(InvalidRequest):
    """Imported K/V that do not fit this request or this engine (other model, other prompt)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="kv_source", code="kv_mismatch")


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What an engine's cache holds per token: a PromptKV must match it to be imported."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def check(self, kv: PromptKV, prompt_token_ids: list[int], vocab_size: int) -> None:
        """Raises KVMismatch unless `kv` has this layout and is of this prompt (its length, and
        its tokens where `kv` says which they were)."""
        num_prompt_tokens = len(prompt_token_ids)
        _, _, _, heads, dim = kv.kv.shape
        mine = (self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)
        theirs = (kv.num_layers, heads, dim, kv.kv.dtype)
        if mine != theirs:
            raise KVMismatch(
                f"the K/V are (layers, kv heads, head dim, dtype) {theirs}; this engine's "
                f"cache holds {mine}"
            )
        if kv.num_tokens != num_prompt_tokens:
            raise KVMismatch(
                f"the K/V are of {kv.num_tokens} tokens but the prompt has {num_prompt_tokens}"
            )
        if kv.prompt_digest is not None and kv.prompt_digest != prompt_digest(prompt_token_ids):
            raise KVMismatch("the K/V are of another prompt of the same length")
        if not 0 <= kv.first_token_id < vocab_size:
            raise KVMismatch(f"first token {kv.first_token_id} is out of the vocabulary")


@dataclass(frozen=True, slots=True)
class PromptKV:
    """The K/V of a prompt's tokens in every layer, on the host (or on the device, for a hand-off
    through device memory), and the token sampled after it. `prompt_digest` names the prompt
    (`prompt_digest()`), so that an importer can tell it from another of the same length;
    `export_s`: seconds the exporting engine spent gathering the K/V and copying them out."""

    kv: torch.Tensor  # [num_layers, 2, num_tokens, num_kv_heads, head_dim], contiguous
    first_token_id: int
    prompt_digest: str | None = None
    export_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kv.dim() != 5 or self.kv.shape[1] != 2 or self.kv.shape[2] < 1:
            raise ValueError(
                f"prompt K/V must be [layers, 2, tokens>0, heads, dim], not {list(self.kv.shape)}"
            )
        if self.first_token_id < 0:
            raise ValueError(f"first_token_id must not be negative, not {self.first_token_id}")

    @property
    def num_layers(self) -> int:
        return int(self.kv.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.kv.shape[2])

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(slots=True)
class PendingExport:
    """A prompt's K/V on their way out: gathered (and copied to the host) behind the forward pass
    that computed them, complete once `event` is."""

    kv: torch.Tensor  # [layers, 2, num_prompt_tokens, heads, dim] on the host, or the device
    event: Any  # None where the copy is already complete
    launch_s: float  # host time spent launching the gather and the copy

    def finish(self, first_token_id: int, prompt_token_ids: list[int]) -> PromptKV:
        started = time.perf_counter()
        if self.event is not None:
            self.event.synchronize()
        waited = time.perf_counter() - started
        digest = prompt_digest(prompt_token_ids)
        return PromptKV(self.kv, first_token_id, digest, self.launch_s + waited)


def start_export(
    gathered: torch.Tensor, platform: Platform, *, on_device: bool
) -> tuple[torch.Tensor, Any]:
    """(K/V, event) of gathered K/V: copied to the host (pinned where the platform has that), or
    left on the device for a hand-off through device memory; complete once the event is (None:
    already). The event is waited for either way, so that the K/V are whole before anything
    reads them, whichever stream or process that is."""
    if not on_device:
        return platform.to_host_async(gathered)
    event = platform.event()
    if event is not None:
        event.record()
    return gathered, event


def prompt_digest(token_ids: list[int]) -> str:
    """A short hash of a prompt's token ids."""
    return hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=16).hexdigest()


def skip_first_draw(generator: torch.Generator, vocab_size: int) -> None:
    """Advance a sampled sequence's generator past the draw of its first token (the sampler's
    exponential race over the vocabulary), which another instance made: a seeded request then
    continues as it would have on one instance."""
    noise = torch.empty(vocab_size, dtype=torch.float32, device=generator.device)
    noise.exponential_(generator=generator)


def token_slots(block_table: Sequence[int], block_size: int, start: int, end: int) -> list[int]:
    """Where tokens `start .. end - 1` of a sequence live in the flattened cache
    (`block_id * block_size + offset`)."""
    if not 0 <= start <= end <= len(block_table) * block_size:
        raise ValueError(f"tokens {start}..{end} are outside a table of {len(block_table)} blocks")
    return [block_table[i // block_size] * block_size + i % block_size for i in range(start, end)]


@torch.no_grad()
def gather_kv(
    kv_caches: Sequence[KVCache], platform: Platform, slots: Sequence[int]
) -> torch.Tensor:
    """The K/V at `slots` in every layer, `[num_layers, 2, len(slots), num_kv_heads, head_dim]`
    on the cache's device (the caller copies it to the host)."""
    index = platform.to_device(torch.tensor(slots, dtype=torch.long))
    layers = [
        torch.stack(
            (k.flatten(0, 1).index_select(0, index), v.flatten(0, 1).index_select(0, index))
        )
        for k, v in kv_caches
    ]
    return torch.stack(layers)


@torch.no_grad()
def scatter_kv(
    kv_caches: Sequence[KVCache], platform: Platform, slots: Sequence[int], kv: torch.Tensor
) -> None:
    """Write K/V `[num_layers, 2, len(slots), heads, dim]` (on the host, or already on a device)
    into the cache at `slots`. The upload does not wait for the device; work launched later on
    its stream sees the K/V."""
    if kv.shape[0] != len(kv_caches) or kv.shape[2] != len(slots):
        raise ValueError(f"K/V of shape {list(kv.shape)} for {len(slots)} slots")
    if not slots:
        return
    index = platform.to_device(torch.tensor(slots, dtype=torch.long))
    on_device = platform.to_device(kv).contiguous()
    for layer, (k, v) in enumerate(kv_caches):
        k.flatten(0, 1).index_copy_(0, index, on_device[layer, 0])
        v.flatten(0, 1).index_copy_(0, index, on_device[layer, 1])
