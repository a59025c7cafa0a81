# mypy: disable-error-code="no-untyped-def,untyped-decorator"
# (Triton's @jit kernels take untyped pointers and constexprs by design.)
"""Paged attention over the block KV cache `[num_blocks, block_size, num_kv_heads, head_dim]`.

Both kernels handle grouped-query attention by giving one program one KV head and all the query
heads that share it, so each K/V tile is read once per KV head, not once per query head.

- Decode (one query per sequence): split-K ("flash decoding"). Each sequence's context is cut
  into the same number of partitions, sized by its own length; each program attends one
  (sequence, KV head, partition) and writes a partial result, a second kernel merges the
  partials. The number of partitions depends only on the batch's shape (enough programs to fill
  the device), so the grid stays the same from step to step (CUDA graphs): a batch of one still
  spreads over many SMs, and a batch of 256 launches no programs with nothing to do.
- Prefill (any number of queries per sequence, also mixed with decodes): flash attention with a
  causal mask offset by the cached prefix, rows = (token, query head of the group) pairs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Decode: at most this many partitions per sequence, and (sequence, KV head, partition)
# programs enough to fill a large GPU; a partition is a multiple of DECODE_BLOCK_N tokens.
MAX_PARTITIONS = 32
TARGET_PROGRAMS = 1024
DECODE_BLOCK_N = 64


def decode_partitions(num_seqs: int, num_kv_heads: int, max_context_len: int) -> int:
    """How many partitions each sequence's context is cut into (fixed for a batch shape)."""
    wanted = -(-TARGET_PROGRAMS // max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, MAX_PARTITIONS, -(-max_context_len // DECODE_BLOCK_N)))


@triton.jit
def _partition_size(context_len, NUM_PARTITIONS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per partition of a context: its share, rounded up to whole BLOCK_N tiles."""
    return tl.cdiv(tl.cdiv(context_len, NUM_PARTITIONS), BLOCK_N) * BLOCK_N


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 models are the reference path: no tf32 rounding in the products.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    part_out_ptr,  # [num_seqs, num_heads, NUM_PARTITIONS, HEAD_DIM_PAD] float32
    part_max_ptr,  # [num_seqs, num_heads, NUM_PARTITIONS] float32
    part_sum_ptr,
    scale,
    num_heads,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_bt,
    NUM_PARTITIONS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    partition = _partition_size(context_len, NUM_PARTITIONS, BLOCK_N)
    start = part * partition
    if start < context_len:
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM_PAD)
        heads = kv_head * GROUP + g
        g_mask = g < GROUP
        d_mask = d < HEAD_DIM
        q = tl.load(
            q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [GROUP_PAD, HEAD_DIM_PAD]
        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
        end = tl.minimum(start + partition, context_len)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs < end
            block = tl.load(table + offs // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            kv_offs = (
                block[:, None] * stride_cb
                + (offs % BLOCK_SIZE)[:, None] * stride_co
                + kv_head * stride_ch
                + d[None, :]
            )
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # [BLOCK_N, HEAD_DIM_PAD]
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            qk = tl.where(n_mask[None, :], qk, float("-inf"))  # [GROUP_PAD, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        row = (seq.to(tl.int64) * num_heads + heads) * NUM_PARTITIONS + part  # [GROUP_PAD]
        tl.store(
            part_out_ptr + row[:, None] * HEAD_DIM_PAD + d[None, :],
            acc / l_i[:, None],
            mask=g_mask[:, None],
        )
        tl.store(part_max_ptr + row, m_i, mask=g_mask)
        tl.store(part_sum_ptr + row, l_i, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    context_lens_ptr,
    out_ptr,
    num_heads,
    stride_ot,
    stride_oh,
    NUM_PARTITIONS: tl.constexpr,
    PARTITIONS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    num_parts = tl.cdiv(context_len, _partition_size(context_len, NUM_PARTITIONS, BLOCK_N))
    p = tl.arange(0, PARTITIONS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    p_mask = p < num_parts
    row = (seq.to(tl.int64) * num_heads + head) * NUM_PARTITIONS + p
    m = tl.load(part_max_ptr + row, mask=p_mask, other=float("-inf"))
    s = tl.load(part_sum_ptr + row, mask=p_mask, other=0.0)
    weight = tl.where(p_mask, tl.exp(m - tl.max(m, axis=0)) * s, 0.0)  # [PARTITIONS_PAD]
    o = tl.load(part_out_ptr + row[:, None] * HEAD_DIM_PAD + d[None, :], mask=p_mask[:, None])
    out = tl.sum(weight[:, None] * o, axis=0) / tl.sum(weight, axis=0)
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + d,
        out.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]: one query per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, each >= 1
    scale: float,
    max_context_len: int,  # a bound on context_lens (graphs: max_model_len)
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_parts = decode_partitions(num_seqs, num_kv_heads, max_context_len)
    head_dim_pad = triton.next_power_of_2(head_dim)
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    assert q.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    part_out = torch.empty(
        (num_seqs, num_heads, num_parts, head_dim_pad), dtype=torch.float32, device=q.device
    )
    part_max = torch.empty((num_seqs, num_heads, num_parts), dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    _decode_partition_kernel[(num_seqs, num_kv_heads, num_parts)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        part_out,
        part_max,
        part_sum,
        scale,
        num_heads,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        NUM_PARTITIONS=num_parts,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=DECODE_BLOCK_N,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=4,
    )
    _decode_merge_kernel[(num_seqs, num_heads)](
        part_out,
        part_max,
        part_sum,
        context_lens,
        out,
        num_heads,
        out.stride(0),
        out.stride(1),
        NUM_PARTITIONS=num_parts,
        PARTITIONS_PAD=triton.next_power_of_2(num_parts),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_N=DECODE_BLOCK_N,
        num_warps=1,
    )
    return out


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_ptr,
    out_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    row0 = tl.program_id(2) * BLOCK_M
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    context_len = tl.load(context_lens_ptr + seq)
    if row0 < q_len * GROUP:
        r = row0 + tl.arange(0, BLOCK_M)
        token = r // GROUP
        heads = kv_head * GROUP + r % GROUP
        d = tl.arange(0, HEAD_DIM_PAD)
        d_mask = d < HEAD_DIM
        r_mask = token < q_len
        q_rows = (q_start + token).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
            mask=r_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, HEAD_DIM_PAD]
        q_pos = context_len - q_len + token  # each row's position: it sees keys <= it
        last_token = tl.minimum(row0 + BLOCK_M - 1, q_len * GROUP - 1) // GROUP
        kv_end = context_len - q_len + last_token + 1
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for n0 in range(0, kv_end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs < kv_end
            block = tl.load(table + offs // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            kv_offs = (
                block[:, None] * stride_cb
                + (offs % BLOCK_SIZE)[:, None] * stride_co
                + kv_head * stride_ch
                + d[None, :]
            )
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            visible = (offs[None, :] <= q_pos[:, None]) & n_mask[None, :]
            qk = tl.where(visible, qk, float("-inf"))  # key 0 is visible to every row
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=r_mask[:, None] & d_mask[None, :],
        )


def paged_prefill_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]: this step's K/V in
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32: K/V length after this step
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: sequence b owns rows [b]:[b + 1]
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Causal attention of each sequence's new tokens (the last of its context) to its context."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    block_m = 64 if max_query_len * group >= 64 else 16
    head_dim_pad = triton.next_power_of_2(head_dim)
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_query_len * group, block_m))
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        query_start_loc,
        out,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_N=64 if head_dim_pad <= 64 else 32,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=4,
    )
    return out
