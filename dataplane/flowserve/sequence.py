"""One sequence being generated: its tokens, sampling state, status and KV blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

from dataplane.flowserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from dataplane.flowserve.prompt_kv import PromptKV

FinishReason = Literal["stop", "length", "abort"]


class SequenceStatus(StrEnum):
    WAITING = "waiting"  # queued (new, or preempted): holds no KV blocks
    RUNNING = "running"  # holds KV blocks; prefills in chunks, then decodes one token per step
    FINISHED = "finished"  # done or aborted; its KV blocks are freed


@dataclass(slots=True, eq=False)
class Sequence:
    """Compared and hashed by identity, so a batch can key dicts by sequence.

    KV state (owned by the block manager): `block_table` lists the physical blocks holding this
    sequence's K/V in order; `num_computed_tokens` of `all_token_ids` have their K/V there.
    `num_cached_tokens` of them came from the prefix cache at its (last) admission; it outlives
    `free`, so the engine can report it as usage's cached tokens once the sequence finishes."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    max_tokens: int  # the params' limit, capped by what is left of max_model_len
    output_token_ids: list[int] = field(default_factory=list)
    priority: int = 0  # lower runs first and is preempted last, as in vLLM
    arrival: int = 0  # arrival order, set by Scheduler.add; breaks priority ties (FCFS)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    # Chained hashes of this sequence's full blocks, a memo the block manager extends: tokens are
    # append-only, so a full block's hash never changes (and survives preemption).
    block_hashes: list[bytes] = field(default_factory=list)
    # Sampled on the device, not yet read by the host (async scheduling): counted in num_tokens
    # (the next step may already compute them) but not yet in output_token_ids.
    num_pending_tokens: int = 0
    # PD disaggregation. A prefill-only sequence samples one token and exports its prompt's K/V.
    # An imported one arrives with its prompt's K/V and first output token: admission writes
    # them into its blocks instead of computing the prompt, then drops them (a later preemption
    # recomputes, as for any sequence).
    prefill_only: bool = False
    export_on_device: bool = False  # its K/V stay on the device (a hand-off by device memory)
    imported_kv: PromptKV | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host has: `len(all_token_ids)`."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V is still to compute: 1 while decoding, more while (re)prefilling."""
        return (
            len(self.prompt_token_ids)
            + len(self.output_token_ids)
            + self.num_pending_tokens
            - self.num_computed_tokens
        )
