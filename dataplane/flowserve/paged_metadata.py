"""A step's inputs for the Triton kernels: built on the host in numpy, moved in one copy.

`StepInputs.build` lays every integer the step needs out in one int64 array:

    [input_ids (T) | positions (T) | slot_mapping (T) | context_lens (B) | query_start_loc (B + 1)
     | block_tables (B * width)]

which goes to the device in one non-blocking copy from pinned memory (`platform.to_device`):
nothing here waits for the device. Decode graphs keep a static copy of the same layout at their
largest size and get each step's padded to it (see `model_runner.DecodeGraphs`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dataplane.flowserve.attention import KVCache
from dataplane.flowserve.platform import Platform


@dataclass(frozen=True, slots=True)
class PagedAttentionMetadata:
    """Device tensors of one step (int64), and the host-side bounds that size the kernels' grids."""

    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]: block_id * block_size + offset of each new token
    context_lens: torch.Tensor  # [B]: K/V length after this step
    query_start_loc: torch.Tensor  # [B + 1]: sequence b owns token rows [b]:[b + 1]
    block_tables: torch.Tensor  # [B, width]
    max_query_len: int
    max_context_len: int  # a bound (for graphs: max_model_len, so the grid never changes)
    decode_only: bool  # every sequence has one query token: the split-K decode kernel

    def attend(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: KVCache,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        from dataplane.flowserve import kernels

        k_cache, v_cache = kv_cache
        kernels.store_kv(k, v, k_cache, v_cache, self.slot_mapping)
        return self.attend_cached(q, kv_cache, scale)

    def attend_cached(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        kv_cache: KVCache,  # this step's K/V already stored (the fused rotary kernel does)
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        from dataplane.flowserve import kernels

        k_cache, v_cache = kv_cache
        if self.decode_only:
            return kernels.paged_decode_attention(
                q,
                k_cache,
                v_cache,
                self.block_tables,
                self.context_lens,
                scale,
                self.max_context_len,
            )
        return kernels.paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            self.block_tables,
            self.context_lens,
            self.query_start_loc,
            scale,
            self.max_query_len,
        )


@dataclass(frozen=True, slots=True)
class StepInputs:
    """One step on the host: the packed array and where each field sits in it."""

    packed: np.ndarray  # int64, the layout in the module docstring
    num_tokens: int
    num_seqs: int
    width: int  # block table columns
    max_query_len: int
    max_context_len: int

    @classmethod
    def build(
        cls,
        *,
        token_ids: Sequence[int],
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        width: int | None = None,
        pad_to: int | None = None,
        pad_block: int = 0,
        table_rows: BlockTableRows | None = None,
    ) -> StepInputs:
        """Sequence `b` computes the last `query_lens[b]` of its `context_lens[b]` tokens.
        `width` fixes the block table's columns (default: the longest context's blocks);
        `pad_to` adds sequences of one token (decode graphs) that live in `pad_block`.
        `table_rows` (of this `width` and `pad_block`) keeps the block tables between steps."""
        num_real = len(query_lens)
        num_seqs = max(num_real, pad_to or 0)
        q_lens = np.ones(num_seqs, dtype=np.int64)
        q_lens[:num_real] = query_lens
        ctx = np.ones(num_seqs, dtype=np.int64)
        ctx[:num_real] = context_lens
        needed = -(-ctx // block_size)
        if width is None:
            width = int(needed.max())
        if table_rows is not None:
            assert table_rows.width == width and table_rows.pad_block == pad_block
            table = table_rows.gather(block_tables, needed[:num_real].tolist(), num_seqs)
        else:
            table = np.full((num_seqs, width), pad_block, dtype=np.int64)
        if num_real and table_rows is None:
            # One vectorised scatter for every row: a loop over rows cost ~2 us per sequence.
            lens = needed[:num_real]
            lens_list = lens.tolist()
            rows: Iterable[Sequence[int]] = block_tables
            if any(len(t) != n for t, n in zip(block_tables, lens_list, strict=True)):
                rows = [t[:n] for t, n in zip(block_tables, lens_list, strict=True)]
            flat = np.fromiter(itertools.chain.from_iterable(rows), np.int64, int(lens.sum()))
            table[:num_real][np.arange(width) < lens[:, None]] = flat
        starts = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=starts[1:])
        num_tokens = int(starts[-1])
        seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
        positions = np.arange(num_tokens) - starts[seq_of_token] + (ctx - q_lens)[seq_of_token]
        slots = table[seq_of_token, positions // block_size] * block_size + positions % block_size
        ids = np.zeros(num_tokens, dtype=np.int64)
        ids[: len(token_ids)] = token_ids
        packed = np.concatenate([ids, positions, slots, ctx, starts, table.reshape(-1)])
        return cls(
            packed=packed,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            width=width,
            max_query_len=int(q_lens.max()),
            max_context_len=int(ctx.max()),
        )

    def views(self, device_packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(input_ids, positions, slot_mapping, context_lens, query_start_loc, block_tables)
        as views of the packed array once on the device."""
        t, b = self.num_tokens, self.num_seqs
        ids, positions, slots, ctx, starts, table = torch.split(
            device_packed, [t, t, t, b, b + 1, b * self.width]
        )
        return ids, positions, slots, ctx, starts, table.view(b, self.width)

    def metadata(
        self, device_packed: torch.Tensor, *, max_context_len: int | None = None
    ) -> tuple[torch.Tensor, PagedAttentionMetadata]:
        """(input_ids, metadata) over `device_packed` (this step's array on the device)."""
        ids, positions, slots, ctx, starts, table = self.views(device_packed)
        meta = PagedAttentionMetadata(
            positions=positions,
            slot_mapping=slots,
            context_lens=ctx,
            query_start_loc=starts,
            block_tables=table,
            max_query_len=self.max_query_len,
            max_context_len=max_context_len or self.max_context_len,
            decode_only=self.max_query_len == 1,
        )
        return ids, meta


@dataclass(slots=True)
class _Row:
    table: Sequence[int]  # the sequence's block_table list, held so that its id stays its own
    index: int  # its row in BlockTableRows._rows
    num_written: int  # its first entries written into the row; the rest is padding


class BlockTableRows:
    """The block tables of the last decode batch, kept from step to step (a persistent batch):
    each table of the batch owns a row, and a step writes only the entries it gained since, so
    the step's table is one gather instead of a rebuild of every row (~1 us a row at 256 rows).

    A table is known by its list's identity. This relies on the block manager's rule that a
    sequence's `block_table` list only ever grows in place: any other change (allocation,
    copy-on-write, free) gives the sequence a new list. A table missing from a step gives its
    row back."""

    def __init__(self, width: int, pad_block: int) -> None:
        self.width = width
        self.pad_block = pad_block
        self._rows = np.full((1, width), pad_block, dtype=np.int64)  # row 0: padding's table
        self._free: list[int] = []
        self._known: dict[int, _Row] = {}  # id(table) -> its row

    def gather(
        self, tables: Sequence[Sequence[int]], lens: Sequence[int], num_rows: int
    ) -> np.ndarray:
        """`[num_rows, width]`: row b holds `tables[b][:lens[b]]`, then `pad_block`; the rows past
        the tables are padding (every entry `pad_block`)."""
        # Runs for every sequence every decode step: a look-up and a length check per row.
        known, self._known = self._known, {}
        kept, indices = self._known, np.zeros(num_rows, dtype=np.int64)
        slots = []
        for table, n in zip(tables, lens, strict=True):
            key = id(table)
            row = known.pop(key, None)
            if row is None:
                row = _Row(table, self._take(), 0)
            if row.num_written != n:
                self._write(row, n)
            kept[key] = row
            slots.append(row.index)
        self._free.extend(row.index for row in known.values())
        indices[: len(slots)] = slots
        return self._rows.take(indices, axis=0)

    def _write(self, row: _Row, n: int) -> None:
        values = self._rows[row.index]
        if n > row.num_written:
            values[row.num_written : n] = row.table[row.num_written : n]
        else:
            values[n:] = self.pad_block
        row.num_written = n

    def _take(self) -> int:
        """A row of padding, for a table new to the batch."""
        if not self._free:
            # Double the rows: amortised O(1), and rare past the first steps.
            num_rows = len(self._rows)
            grown = np.full((2 * num_rows, self.width), self.pad_block, dtype=np.int64)
            grown[:num_rows] = self._rows
            self._rows = grown
            self._free.extend(range(2 * num_rows - 1, num_rows - 1, -1))
        index = self._free.pop()
        self._rows[index] = self.pad_block
        return index


@dataclass(slots=True)
class StagingBuffers:
    """Host buffers (pinned on a GPU) that each step's packed inputs go through to the device,
    reused in turn. Pinning a fresh buffer every step cost ~1 ms at 256 sequences on an H100
    host; a buffer is written again only once the copy out of it has run (its event)."""

    platform: Platform
    depth: int = 4
    _buffers: list[torch.Tensor] = field(default_factory=list)
    _events: list[Any] = field(default_factory=list)
    _next: int = 0

    def upload(self, packed: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """`packed` (int64) on the device, in `out[:len(packed)]` when given, else in a new
        tensor. Nothing waits for the device unless every buffer's copy is still queued."""
        n = len(packed)
        event = self.platform.event()
        if event is None:  # the device is the host: nothing to stage
            host = torch.from_numpy(packed)
            return host if out is None else out[:n].copy_(host)
        slot = self._next
        self._next = (slot + 1) % self.depth
        if slot == len(self._buffers):
            self._buffers.append(self.platform.host_buffer(max(n, 1 << 16), torch.int64))
            self._events.append(None)
        elif self._buffers[slot].numel() < n:
            # The old buffer's pending copy keeps it alive (the caching host allocator).
            self._buffers[slot] = self.platform.host_buffer(2 * n, torch.int64)
        elif self._events[slot] is not None:
            self._events[slot].synchronize()
        staged = self._buffers[slot][:n]
        staged.numpy()[:] = packed
        if out is None:
            device = staged.to(self.platform.device, non_blocking=True)
        else:
            device = out[:n].copy_(staged, non_blocking=True)
        event.record()
        self._events[slot] = event
        return device
