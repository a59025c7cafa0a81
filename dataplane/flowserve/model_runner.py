"""Runs one scheduled batch through the model over the paged KV cache.

The runner owns the model and the KV cache tensors; the scheduler and block manager own which
blocks hold what. `run(batch)` turns the batch's plain data into one flat token batch, runs the
model, and returns logits only for the sequences that sample this step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq

import torch

from dataplane.flowserve.attention import AttentionMetadata, KVCache
from dataplane.flowserve.kv_cache import (
    KVCacheBudget,
    allocate_kv_cache,
    num_blocks_for_budget,
)
from dataplane.flowserve.models import LlamaForCausalLM, ModelConfig
from dataplane.flowserve.scheduler import ScheduledBatch

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        config: ModelConfig,
        *,
        budget: KVCacheBudget,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_blocks: int | None = None,
    ) -> None:
        """`max_blocks` caps the pool where the budget would hold far more than can be used."""
        self.model = model
        self.config = config
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self.num_blocks = num_blocks_for_budget(budget.num_bytes, config, block_size, dtype)
        if max_blocks is not None:
            self.num_blocks = min(self.num_blocks, max_blocks)
        self.kv_caches: list[KVCache] = allocate_kv_cache(
            config, self.num_blocks, block_size, dtype, device
        )

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits `[num_sampling_seqs, vocab]` (float32) in `batch.sampling_seqs` order."""
        token_ids: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        for item in batch.seqs:
            seq = item.seq
            end = item.start + item.num_new_tokens
            token_ids.extend(_slice(seq.prompt_token_ids, seq.output_token_ids, item.start, end))
            query_lens.append(item.num_new_tokens)
            context_lens.append(end)
            tables.append(seq.block_table)
            if item.samples:
                sample_rows.append(len(token_ids) - 1)
        meta = AttentionMetadata.build(
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=tables,
            block_size=self.block_size,
            device=self.device,
            dtype=self.dtype,
        )
        input_ids = torch.tensor(token_ids, dtype=torch.long).to(self.device, non_blocking=True)
        hidden = self.model(input_ids, meta.positions, self.kv_caches, meta)  # [T, hidden]
        if not sample_rows:
            return torch.empty((0, self.config.vocab_size), device=self.device)
        rows = torch.tensor(sample_rows, dtype=torch.long).to(self.device, non_blocking=True)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()

    @torch.inference_mode()
    def copy_blocks(self, pairs: Seq[tuple[int, int]]) -> None:
        """Copy-on-write: each (src, dst) block, in order, in every layer."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=self.device)
        dst = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))


def _slice(prompt: list[int], output: list[int], start: int, end: int) -> list[int]:
    """`(prompt + output)[start:end]` without building the whole list."""
    n = len(prompt)
    if end <= n:
        return prompt[start:end]
    if start >= n:
        return output[start - n : end - n]
    return prompt[start:] + output[: end - n]
