"""Paged attention over a block KV cache, in plain PyTorch (SDPA), for CPU and as a GPU fallback.

One flat batch of `T` tokens from `B` sequences. Sequence `b` owns tokens
`query_start_loc[b]:query_start_loc[b + 1]` (its `q_len` new tokens) and, after this step, has
`context_lens[b]` tokens of K/V in the cache; its new tokens sit at the end of that context.

The cache of one layer is `k, v: [num_blocks, block_size, num_kv_heads, head_dim]`; token `i` of a
sequence lives in block `block_table[i // block_size]` at offset `i % block_size`.

Sequences with `q_len == 1` (decodes) are attended in one batched SDPA call; the others (prefill
chunks) one at a time. Everything that depends only on the batch's shape (gather indices, masks)
is computed once per step by `AttentionMetadata.build`, not once per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dataplane.flowserve import cpu_kernels

KVCache = tuple[torch.Tensor, torch.Tensor]  # k, v: [num_blocks, block_size, kv_heads, head_dim]


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """One sequence with `q_len > 1`: its token rows `start:end` attend to its first
    `context_len` cached positions."""

    start: int
    end: int
    context_len: int
    block_ids: torch.Tensor  # [ceil(context_len / block_size)] physical blocks, in order
    # [q_len, context_len] additive (0 / -inf) causal mask offset by context_len - q_len;
    # None when the chunk is the whole context (plain causal attention over the new tokens).
    mask: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Decodes (one new token each) attended in one batched call: their token rows (a slice when
    contiguous), the blocks to gather for them, padded to the longest, and the padding mask."""

    rows: slice | torch.Tensor
    num: int
    block_ids: torch.Tensor  # [num * max_blocks] long
    mask: torch.Tensor  # [num, 1, 1, max_blocks * block_size] additive 0 / -inf
    # The gathered K and V, allocated by the first layer and reused by the others: on the CPU a
    # fresh allocation per layer costs page faults comparable to the copy itself.
    buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def gather_buffers(self, k_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two `[num * max_blocks, block_size, kv_heads, head_dim]` buffers."""
        if not self.buffers:
            shape = (self.block_ids.shape[0], *k_cache.shape[1:])
            self.buffers["k"] = k_cache.new_empty(shape)
            self.buffers["v"] = k_cache.new_empty(shape)
        return self.buffers["k"], self.buffers["v"]


@dataclass(frozen=True, slots=True)
class KernelDecodes:
    """All decodes of a step, for the CPU kernel that reads the paged cache in place."""

    rows: slice | torch.Tensor
    block_tables: torch.Tensor  # [num, max_blocks] long
    context_lens: torch.Tensor  # [num] long


# Decodes are split into at most this many groups of at least MIN_DECODE_GROUP sequences each.
MAX_DECODE_GROUPS = 4
MIN_DECODE_GROUP = 8


def group_decodes(blocks_needed: np.ndarray) -> list[np.ndarray]:
    """Indices (into `blocks_needed`) of each decode group: sorted by length, cut into equal
    shares, so that short contexts are not padded to the longest one in the batch."""
    order = np.argsort(blocks_needed, kind="stable")
    num_groups = max(1, min(MAX_DECODE_GROUPS, len(order) // MIN_DECODE_GROUP))
    return [np.sort(part) for part in np.array_split(order, num_groups) if len(part)]


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    num_tokens: int
    block_size: int
    positions: torch.Tensor  # [T] long: position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] long: block_id * block_size + offset of each new token
    query_start_loc: list[int]  # [B + 1] host ints
    context_lens: torch.Tensor  # [B] long: K/V length of each sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] long, padded with block 0 (masked)
    num_decodes: int
    # Decodes, batched in groups of similar context length (less padding to gather and attend).
    decode_groups: tuple[DecodeGroup, ...]
    prefills: tuple[PrefillChunk, ...]
    # Set instead of decode_groups where the CPU kernel runs the decodes (float32 on the CPU).
    kernel_decodes: KernelDecodes | None = None

    def attend(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: KVCache,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Store this step's K/V, then attend (the model's one call into attention)."""
        k_cache, v_cache = kv_cache
        store_kv(k, v, k_cache, v_cache, self.slot_mapping)
        return paged_attention(q, k_cache, v_cache, self, scale, k=k, v=v)

    @classmethod
    def build(
        cls,
        *,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        decode_kernel: bool | None = None,
    ) -> AttentionMetadata:
        """Metadata of one step from host data. Sequence `b` computes its last `query_lens[b]`
        of `context_lens[b]` tokens; `block_tables[b]` must cover `context_lens[b]` tokens
        (longer tables are fine). `dtype` is the model's (masks are additive, in that dtype).

        All integer data goes to the device in one copy; nothing here waits for the device.
        `decode_kernel` runs the decodes in the CPU kernel (None: wherever it applies, that is
        float32 on the CPU once the kernel has built) instead of grouped SDPA calls.
        """
        num_seqs = len(query_lens)
        if not num_seqs or len(context_lens) != num_seqs or len(block_tables) != num_seqs:
            raise ValueError("query_lens, context_lens and block_tables need one entry per seq")
        blocks_needed = [-(-c // block_size) for c in context_lens]
        for b in range(num_seqs):
            if not 1 <= query_lens[b] <= context_lens[b]:
                raise ValueError(
                    f"seq {b}: query_len {query_lens[b]} not in [1, {context_lens[b]}]"
                )
            if len(block_tables[b]) < blocks_needed[b]:
                raise ValueError(f"seq {b}: its block table does not cover {context_lens[b]}")
        max_blocks = max(blocks_needed)
        table = np.zeros((num_seqs, max_blocks), dtype=np.int64)  # [B, max_blocks]
        for b in range(num_seqs):
            table[b, : blocks_needed[b]] = block_tables[b][: blocks_needed[b]]

        starts = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=starts[1:])
        num_tokens = int(starts[-1])
        ctx = np.asarray(context_lens, dtype=np.int64)
        q_lens = np.asarray(query_lens, dtype=np.int64)
        seq_of_token = np.repeat(np.arange(num_seqs), q_lens)  # [T]
        positions = np.arange(num_tokens) - starts[seq_of_token] + (ctx - q_lens)[seq_of_token]
        slots = table[seq_of_token, positions // block_size] * block_size + positions % block_size

        decodes = np.flatnonzero(q_lens == 1)
        needed = np.asarray(blocks_needed, dtype=np.int64)
        use_kernel = decode_kernel
        if use_kernel is None:
            use_kernel = device.type == "cpu" and dtype == torch.float32
            use_kernel = use_kernel and cpu_kernels.paged_decode_kernel() is not None
        groups = []
        if len(decodes) and not use_kernel:
            groups = [decodes[idx] for idx in group_decodes(needed[decodes])]
        parts = [positions, slots, ctx, table.reshape(-1)]
        for members in groups:
            max_blocks_g = int(needed[members].max())
            parts += [starts[members], table[members, :max_blocks_g].reshape(-1), ctx[members]]
        packed = torch.from_numpy(np.concatenate(parts)).to(device)
        views = list(torch.split(packed, [len(p) for p in parts]))
        positions_t, slots_t, ctx_t, table_t = views[:4]
        table_t = table_t.view(num_seqs, max_blocks)
        decode_groups = []
        for g, members in enumerate(groups):
            rows_t, block_ids_t, group_ctx_t = views[4 + 3 * g : 7 + 3 * g]
            rows_host = starts[members]
            rows: slice | torch.Tensor = rows_t
            if rows_host[-1] - rows_host[0] == len(members) - 1:
                rows = slice(int(rows_host[0]), int(rows_host[0]) + len(members))
            padded_len = int(needed[members].max()) * block_size
            keep = torch.arange(padded_len, device=device) < group_ctx_t[:, None]
            pad_mask = _additive(keep, dtype)[:, None, None, :]
            decode_groups.append(DecodeGroup(rows, len(members), block_ids_t, pad_mask))

        kernel_decodes = None
        if len(decodes) and use_kernel:
            rows_host = starts[decodes]
            kernel_rows: slice | torch.Tensor = torch.from_numpy(rows_host)
            if rows_host[-1] - rows_host[0] == len(decodes) - 1:
                kernel_rows = slice(int(rows_host[0]), int(rows_host[0]) + len(decodes))
            kernel_decodes = KernelDecodes(
                kernel_rows, torch.from_numpy(table[decodes]), torch.from_numpy(ctx[decodes])
            )

        start_list = [int(s) for s in starts]
        prefills = []
        for b in (int(i) for i in np.flatnonzero(q_lens > 1)):
            q_len, context_len = int(q_lens[b]), int(ctx[b])
            mask = None
            if q_len < context_len:
                cols = torch.arange(context_len, device=device)
                rows = torch.arange(context_len - q_len, context_len, device=device)
                mask = _additive(cols[None, :] <= rows[:, None], dtype)
            prefills.append(
                PrefillChunk(
                    start=start_list[b],
                    end=start_list[b + 1],
                    context_len=context_len,
                    block_ids=table_t[b, : blocks_needed[b]],
                    mask=mask,
                )
            )
        return cls(
            num_tokens=num_tokens,
            block_size=block_size,
            positions=positions_t,
            slot_mapping=slots_t,
            query_start_loc=start_list,
            context_lens=ctx_t,
            block_tables=table_t,
            num_decodes=len(decodes),
            decode_groups=tuple(decode_groups),
            prefills=tuple(prefills),
            kernel_decodes=kernel_decodes,
        )


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # SDPA's CPU kernels are faster with an additive mask than a boolean one.
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return mask.masked_fill_(~keep, float("-inf"))


def store_kv(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] long
) -> None:
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    k: torch.Tensor | None = None,  # [T, num_kv_heads, head_dim]: this step's K, already stored
    v: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Attention of each token to its sequence's cached K/V (this step's must be stored first).
    Given `k` and `v`, a prefill with no cached prefix uses them instead of reading them back."""
    kd = meta.kernel_decodes
    if kd is not None and meta.num_decodes == meta.num_tokens:
        return cpu_kernels.paged_decode(
            q, k_cache, v_cache, kd.block_tables, kd.context_lens, scale
        )
    if len(meta.decode_groups) == 1 and meta.num_decodes == meta.num_tokens:
        return _decode(q, k_cache, v_cache, meta.decode_groups[0], scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if kd is not None:
        out[kd.rows] = cpu_kernels.paged_decode(
            q[kd.rows], k_cache, v_cache, kd.block_tables, kd.context_lens, scale
        )
    for group in meta.decode_groups:
        out[group.rows] = _decode(q[group.rows], k_cache, v_cache, group, scale)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.end)
        if chunk.mask is None and k is not None and v is not None:
            k_seq, v_seq = k[rows], v[rows]  # [C, num_kv_heads, head_dim]
        else:
            k_seq = k_cache.index_select(0, chunk.block_ids).view(-1, num_kv_heads, head_dim)
            v_seq = v_cache.index_select(0, chunk.block_ids).view(-1, num_kv_heads, head_dim)
            k_seq, v_seq = k_seq[: chunk.context_len], v_seq[: chunk.context_len]
        # SDPA's fast CPU path wants 4-d inputs: [1, heads, len, head_dim]. K/V are repeated
        # per query head rather than passed with enable_gqa, which keeps CUDA off the slow
        # math kernel.
        per_kv = q.shape[1] // num_kv_heads
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1)[None],
            _per_query_head(k_seq.transpose(0, 1), per_kv)[None],
            _per_query_head(v_seq.transpose(0, 1), per_kv)[None],
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=scale,
        )  # [1, num_heads, q_len, head_dim]
        out[rows] = o[0].transpose(0, 1)
    return out


def _per_query_head(x: torch.Tensor, group: int) -> torch.Tensor:
    """[kv_heads, len, head_dim] -> [kv_heads * group, len, head_dim], like HF's repeat_kv."""
    return x if group == 1 else x.repeat_interleave(group, dim=0)


def _decode(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: DecodeGroup,
    scale: float,
) -> torch.Tensor:  # [num_decodes, num_heads, head_dim]
    num_decodes, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    # [num_decodes, num_kv_heads, padded_len, head_dim]
    k_buffer, v_buffer = group.gather_buffers(k_cache)
    k = torch.index_select(k_cache, 0, group.block_ids, out=k_buffer)
    k = k.view(num_decodes, -1, num_kv_heads, head_dim).transpose(1, 2)
    v = torch.index_select(v_cache, 0, group.block_ids, out=v_buffer)
    v = v.view(num_decodes, -1, num_kv_heads, head_dim).transpose(1, 2)
    # GQA without repeating K/V: the query heads that share a KV head stand in for SDPA's query
    # length, which is free since a decode has one query and the mask is the same for all of them.
    q = q.reshape(num_decodes, num_kv_heads, num_heads // num_kv_heads, head_dim)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scale)
    return o.reshape(num_decodes, num_heads, head_dim)
