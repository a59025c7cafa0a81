"""Runs one scheduled batch through the model over the paged KV cache.

The runner owns the model and the KV cache tensors; the scheduler and block manager own which
blocks hold what. `run(batch)` turns the batch's plain data into one flat token batch, runs the
model, and returns logits only for the sequences that sample this step.

Two paths, chosen by what the platform can do, never by its name:

- host (PyTorch ops, `attention.AttentionMetadata`): the CPU, and any device without Triton;
- kernels (`paged_metadata`, FlowServe's Triton kernels): prefill and mixed steps eager, decode
  steps replayed from CUDA graphs captured for a ladder of batch sizes (padded up to the next
  size), unless `enforce_eager`.

Start-up on a device: `profile_activations()` (or a stored profile) -> `allocate_kv_cache(n)` ->
`capture_graphs()`. Nothing in `run` waits for the device; the caller reads the sampled tokens.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np
import torch

from dataplane.flowserve.attention import AttentionMetadata, KVCache
from dataplane.flowserve.kv_cache import allocate_kv_cache
from dataplane.flowserve.models import LlamaForCausalLM, ModelConfig
from dataplane.flowserve.paged_metadata import BlockTableRows, StagingBuffers, StepInputs
from dataplane.flowserve.platform import Platform
from dataplane.flowserve.prompt_kv import KVLayout, gather_kv, scatter_kv, token_slots
from dataplane.flowserve.scheduler import ScheduledBatch
from dataplane.flowserve.sequence import Sequence

log = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes captured: 1, 2, 4, 8, then every 8 to 64, every 16 to 128, every
    32 beyond, and `max_num_seqs` itself. A batch pads up to the next size."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, 129, 16), *range(160, 4097, 32)]
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


@dataclass(slots=True)
class _Graph:
    graph: object
    inputs: torch.Tensor  # the static packed inputs (paged_metadata's layout) it reads
    logits: torch.Tensor  # [size, vocab] the graph writes


@dataclass(frozen=True, slots=True)
class PendingTokens:
    """The previous step's sampled tokens, still on the device (async scheduling): `rows[seq]`
    is the index of `seq`'s token in `tokens`."""

    tokens: torch.Tensor  # [num_sampling_seqs of that step] long, on the device
    rows: dict[Sequence, int]


@dataclass(slots=True)
class _HostBatch:
    token_ids: list[int]
    query_lens: list[int]
    context_lens: list[int]
    tables: list[list[int]]
    sample_rows: list[int]  # token rows whose logits are sampled
    # Token rows whose id is a pending token, and where it is in PendingTokens.tokens.
    fill_rows: list[int] = field(default_factory=list)
    fill_from: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, batch: ScheduledBatch, pending: PendingTokens | None = None) -> _HostBatch:
        if pending is not None and batch.num_batched_tokens == len(batch.seqs):
            fast = cls._pending_decodes(batch, pending)
            if fast is not None:
                return fast
        host = cls([], [], [], [], [])
        # Runs for every sequence every step: locals, and no list built for a pending decode.
        token_ids, fill_rows, fill_from = host.token_ids, host.fill_rows, host.fill_from
        query_lens, context_lens, tables = host.query_lens, host.context_lens, host.tables
        sample_rows = host.sample_rows
        for item in batch.seqs:
            seq = item.seq
            start = item.start
            end = start + item.num_new_tokens
            prompt, output = seq.prompt_token_ids, seq.output_token_ids
            known = len(prompt) + len(output)
            if start < known:
                token_ids.extend(_slice(prompt, output, start, min(end, known)))
            if end > known:  # the last is the token the previous step sampled
                assert pending is not None and end == known + 1
                fill_rows.append(len(token_ids))
                fill_from.append(pending.rows[seq])
                token_ids.append(0)
            query_lens.append(end - start)
            context_lens.append(end)
            tables.append(seq.block_table)
            if item.samples:
                sample_rows.append(len(token_ids) - 1)
        return host

    @classmethod
    def _pending_decodes(cls, batch: ScheduledBatch, pending: PendingTokens) -> _HostBatch | None:
        """The steady state of async decoding, in list comprehensions: every sequence decodes
        the token the previous step sampled (None when some sequence does not)."""
        rows = pending.rows
        try:
            fill_from = [rows[item.seq] for item in batch.seqs]
        except KeyError:
            return None
        context_lens = [item.start + 1 for item in batch.seqs]
        known = [len(i.seq.prompt_token_ids) + len(i.seq.output_token_ids) for i in batch.seqs]
        if known != [n - 1 for n in context_lens] or not all(i.samples for i in batch.seqs):
            return None
        num_seqs = len(batch.seqs)
        order = list(range(num_seqs))
        return cls(
            token_ids=[0] * num_seqs,
            query_lens=[1] * num_seqs,
            context_lens=context_lens,
            tables=[item.seq.block_table for item in batch.seqs],
            sample_rows=order,
            fill_rows=order,
            fill_from=fill_from,
        )


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        config: ModelConfig,
        *,
        platform: Platform,
        block_size: int,
        dtype: torch.dtype,
        max_model_len: int,
        max_num_seqs: int,
        enforce_eager: bool = False,
    ) -> None:
        self.model = model
        self.config = config
        self.platform = platform
        self.block_size = block_size
        self.dtype = dtype
        self.device = platform.device
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.kernels = platform.triton_kernels
        if self.kernels:
            model.use_fused_kernels()
        self.use_graphs = self.kernels and platform.supports_graphs and not enforce_eager
        self.num_blocks = 0
        self.kv_caches: list[KVCache] = []
        self._graphs: dict[int, _Graph] = {}
        self._graph_sizes: list[int] = []
        self._graph_width = -(-max_model_len // block_size)  # block table columns in graphs
        self._pending: PendingTokens | None = None  # for the step being prepared
        self._staging = StagingBuffers(platform)  # the kernel path's inputs go through these
        self._decode_rows: BlockTableRows | None = None  # the decode graphs' block tables

    def sibling(self) -> ModelRunner:
        """Another runner over the same weights and KV cache, with per-step state of its own
        (the pending tokens, the staging buffers whose events guard their reuse, and no decode
        graphs: their static inputs and outputs would be shared), for a second thread that runs
        batches concurrently with this one (semi-PD's prefill worker). Capture its graphs
        with `capture_graphs()` if it needs them."""
        runner = ModelRunner(
            self.model,
            self.config,
            platform=self.platform,
            block_size=self.block_size,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            enforce_eager=not self.use_graphs,
        )
        runner.num_blocks = self.num_blocks
        runner.kv_caches = self.kv_caches  # the same tensors: one pool, one block manager
        return runner

    # --- start-up -----------------------------------------------------------------------------

    @torch.inference_mode()
    def profile_activations(self, max_num_batched_tokens: int) -> int:
        """Peak bytes a full prefill step allocates beyond what is held now (weights), measured
        with a throwaway cache just big enough for it; 0 where the platform cannot measure."""
        num_tokens = min(max_num_batched_tokens, self.max_model_len)
        blocks = -(-num_tokens // self.block_size)
        caches = allocate_kv_cache(self.config, blocks, self.block_size, self.dtype, self.device)
        cache_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in caches)
        self.platform.synchronize()
        self.platform.reset_peak_memory()
        base = self.platform.peak_memory()
        if base == 0:
            return 0
        num_seqs = min(self.max_num_seqs, num_tokens)
        # num_seqs sequences sharing the tokens, every one sampling: the largest logits too.
        lens = [num_tokens // num_seqs] * num_seqs
        lens[-1] += num_tokens - sum(lens)
        table = list(range(blocks))
        host = _HostBatch(
            token_ids=[0] * num_tokens,
            query_lens=lens,
            context_lens=lens,
            tables=[table] * num_seqs,
            sample_rows=list(np.cumsum(lens) - 1),
        )
        if self.kernels:
            self._forward_eager(host, caches)
        else:
            self._forward_host(host, caches)
        self.platform.synchronize()
        peak = self.platform.peak_memory() - base
        del caches
        return max(0, peak - cache_bytes)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """`num_blocks` for the block manager, plus one scratch block where padded graph rows
        write (never handed out)."""
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_cache(
            self.config, num_blocks + 1, self.block_size, self.dtype, self.device
        )

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture the decode step at every ladder size, largest first (smaller ones reuse the
        pool's memory)."""
        if not self.use_graphs:
            return
        width = self._graph_width
        pool = self.platform.graph_pool()
        sizes = graph_batch_sizes(self.max_num_seqs)
        for size in reversed(sizes):
            inputs = self._pad_decode(_HostBatch([], [], [], [], []), size, width)
            # The packed inputs, then room for the pending tokens' (row, source) indices.
            static = torch.zeros(len(inputs.packed) + 2 * size, dtype=torch.long)
            static[: len(inputs.packed)] = torch.from_numpy(inputs.packed)
            static = self.platform.to_device(static)
            packed = static[: len(inputs.packed)]
            self._decode_forward(inputs, packed)  # warm-up: compile kernels, create handles
            self.platform.synchronize()
            graph = self.platform.graph()
            with self.platform.capture(graph, pool):
                logits = self._decode_forward(inputs, packed)
            self._graphs[size] = _Graph(graph, static, logits)
        self.platform.synchronize()
        self._graph_sizes = sizes
        log.info("captured decode graphs for batch sizes %s", sizes)

    # --- steps --------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, pending: PendingTokens | None = None) -> torch.Tensor:
        """Logits `[num_sampling_seqs, vocab]` in `batch.sampling_seqs` order (model dtype on
        the kernel path, float32 on the host path). Tokens the host does not know yet are taken
        from `pending` on the device."""
        self._pending = pending
        host = _HostBatch.of(batch, pending)
        if not self.kernels:
            return self._forward_host(host, self.kv_caches)
        num_seqs = len(host.query_lens)
        if self._graphs and len(host.token_ids) == num_seqs and num_seqs <= self._graph_sizes[-1]:
            return self._replay(host)
        return self._forward_eager(host, self.kv_caches)

    def _fill_pending(self, host: _HostBatch, input_ids: torch.Tensor) -> None:
        """Write the pending tokens into the device's copy of the input ids."""
        if not host.fill_rows:
            return
        assert self._pending is not None
        index = self.platform.to_device(torch.tensor([host.fill_rows, host.fill_from]))
        input_ids.index_copy_(0, index[0], self._pending.tokens.index_select(0, index[1]))

    def _forward_host(self, host: _HostBatch, kv_caches: list[KVCache]) -> torch.Tensor:
        meta = AttentionMetadata.build(
            query_lens=host.query_lens,
            context_lens=host.context_lens,
            block_tables=host.tables,
            block_size=self.block_size,
            device=self.device,
            dtype=self.dtype,
        )
        input_ids = self.platform.to_device(torch.tensor(host.token_ids, dtype=torch.long))
        self._fill_pending(host, input_ids)
        hidden = self.model(input_ids, meta.positions, kv_caches, meta)  # [T, hidden]
        if not host.sample_rows:
            return torch.empty((0, self.config.vocab_size), device=self.device)
        rows = self.platform.to_device(torch.tensor(host.sample_rows, dtype=torch.long))
        return self.model.compute_logits(hidden.index_select(0, rows)).float()

    def _forward_eager(self, host: _HostBatch, kv_caches: list[KVCache]) -> torch.Tensor:
        inputs = StepInputs.build(
            token_ids=host.token_ids,
            query_lens=host.query_lens,
            context_lens=host.context_lens,
            block_tables=host.tables,
            block_size=self.block_size,
        )
        # Rows to sample and the pending tokens' indices go at the end: one copy for everything.
        n, num_sample = len(inputs.packed), len(host.sample_rows)
        extra = host.sample_rows + host.fill_rows + host.fill_from
        device = self._staging.upload(
            np.concatenate([inputs.packed, np.asarray(extra, dtype=np.int64)])
        )
        ids, meta = inputs.metadata(device[:n])
        self._fill_pending_on_device(ids, device[n + num_sample :], len(host.fill_rows))
        hidden = self.model(ids, meta.positions, kv_caches, meta)  # [T, hidden]
        rows = device[n : n + num_sample]
        return self.model.compute_logits(hidden.index_select(0, rows))

    def _fill_pending_on_device(
        self, input_ids: torch.Tensor, indices: torch.Tensor, num_fill: int
    ) -> None:
        """Write the pending tokens into the input ids; `indices` holds the rows to fill, then
        where each one's token is in the pending tokens, already on the device."""
        if not num_fill:
            return
        assert self._pending is not None
        rows, sources = indices[:num_fill], indices[num_fill : 2 * num_fill]
        input_ids.index_copy_(0, rows, self._pending.tokens.index_select(0, sources))

    def _pad_decode(self, host: _HostBatch, size: int, width: int) -> StepInputs:
        rows = self._decode_rows
        if rows is None or rows.width != width or rows.pad_block != self.num_blocks:
            rows = self._decode_rows = BlockTableRows(width, self.num_blocks)
        return StepInputs.build(
            token_ids=host.token_ids,
            query_lens=host.query_lens,
            context_lens=host.context_lens,
            block_tables=host.tables,
            block_size=self.block_size,
            width=width,
            pad_to=size,
            pad_block=self.num_blocks,  # the scratch block
            table_rows=rows,
        )

    def _decode_forward(self, inputs: StepInputs, static: torch.Tensor) -> torch.Tensor:
        ids, meta = inputs.metadata(static, max_context_len=self.max_model_len)
        hidden = self.model(ids, meta.positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden)  # [size, vocab]: every row, padding too

    def _replay(self, host: _HostBatch) -> torch.Tensor:
        num_seqs = len(host.query_lens)
        size = self._graph_sizes[bisect.bisect_left(self._graph_sizes, num_seqs)]
        graph = self._graphs[size]
        inputs = self._pad_decode(host, size, self._graph_width)
        n = len(inputs.packed)
        fill = np.asarray(host.fill_rows + host.fill_from, dtype=np.int64)
        self._staging.upload(np.concatenate([inputs.packed, fill]), out=graph.inputs)
        self._fill_pending_on_device(graph.inputs[:size], graph.inputs[n:], len(host.fill_rows))
        graph.graph.replay()  # type: ignore[attr-defined]
        if len(host.sample_rows) == num_seqs:
            return graph.logits[:num_seqs]
        rows = self.platform.to_device(torch.tensor(host.sample_rows, dtype=torch.long))
        return graph.logits.index_select(0, rows)

    @torch.inference_mode()
    def copy_blocks(self, pairs: Seq[tuple[int, int]]) -> None:
        """Copy-on-write: each (src, dst) block, in order, in every layer."""
        if not pairs:
            return
        src = self.platform.to_device(torch.tensor([p[0] for p in pairs], dtype=torch.long))
        dst = self.platform.to_device(torch.tensor([p[1] for p in pairs], dtype=torch.long))
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

    # --- K/V in and out of the cache (PD disaggregation) ----------------------------------------

    @property
    def kv_layout(self) -> KVLayout:
        config = self.config
        return KVLayout(
            config.num_hidden_layers, config.num_key_value_heads, config.head_dim, self.dtype
        )

    def gather_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """The K/V of a sequence's first `num_tokens` tokens, `[layers, 2, num_tokens, heads,
        dim]` on the device, read after everything launched before."""
        slots = token_slots(block_table, self.block_size, 0, num_tokens)
        return gather_kv(self.kv_caches, self.platform, slots)

    def scatter_kv(self, block_table: list[int], start: int, kv: torch.Tensor) -> None:
        """Write tokens `start ..` of host K/V `[layers, 2, num_tokens, heads, dim]` into a
        sequence's blocks (the first `start` are already there: prefix-cache hits)."""
        slots = token_slots(block_table, self.block_size, start, kv.shape[2])
        scatter_kv(self.kv_caches, self.platform, slots, kv[:, :, start:])


def _slice(prompt: list[int], output: list[int], start: int, end: int) -> list[int]:
    """`(prompt + output)[start:end]` without building the whole list."""
    n = len(prompt)
    if end <= n:
        return prompt[start:end]
    if start >= n:
        return output[start - n : end - n]
    return prompt[start:] + output[: end - n]
