# mypy: disable-error-code="no-untyped-def,untyped-decorator"
# (Triton's @jit kernels take untyped pointers and constexprs by design.)
"""Per-token kernels: the KV store into paged blocks, RMSNorm fused with the residual add, and
rotary embedding applied in place. Each rounds where transformers' Llama rounds (the residual add,
the normalised activations and each rotary product in the model dtype), so bf16 outputs match."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_co,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, KV_HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    dest = block * stride_cb + offset * stride_co + h * stride_ch + d
    k = tl.load(k_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(k_cache_ptr + dest, k, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_cache_ptr + dest, v, mask=mask)


def store_kv(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim], last dim contiguous
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k_cache.stride() == v_cache.stride() and k.stride(-1) == v.stride(-1) == 1
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
    )


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(variance + eps)).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = (normed.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def rms_norm(
    x: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, hidden]: x + residual is normed and written here
) -> torch.Tensor:  # [T, hidden]
    """transformers' RMSNorm of `x` (or of `x + residual`, which then replaces `residual`)."""
    num_rows, n_cols = x.shape
    out = torch.empty_like(x)
    if num_rows == 0:
        return out
    assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1)
    _rms_norm_kernel[(num_rows,)](
        x,
        x if residual is None else residual,
        weight,
        out,
        x.stride(0),
        0 if residual is None else residual.stride(0),
        out.stride(0),
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(n_cols),
        num_warps=4 if n_cols <= 4096 else 8,
    )
    return out


@triton.jit
def _rope_kernel(
    x_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_t,
    stride_h,
    stride_table,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_co,
    stride_ch,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    STORE: tl.constexpr,  # also write the rotated K heads (the last ones) and V into the cache
    NUM_KV_HEADS: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    cos = tl.load(cos_ptr + position * stride_table + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + position * stride_table + j, mask=j < HALF, other=0.0).to(tl.float32)
    base = x_ptr + token * stride_t + h * stride_h + j
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    # Each product rounded to the model dtype, then the sum: transformers' op order.
    o1 = ((x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
    tl.store(base, o1, mask=mask)
    tl.store(base + HALF, o2, mask=mask)
    if STORE:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        cache = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co
        kv_head = h - (NUM_HEADS - NUM_KV_HEADS)  # negative for the query heads: masked
        k_mask = mask & (kv_head >= 0)
        k_dest = k_cache_ptr + cache + kv_head * stride_ch + j
        tl.store(k_dest, o1, mask=k_mask)
        tl.store(k_dest + HALF, o2, mask=k_mask)
        vh = tl.arange(0, KV_HEADS_PAD)[:, None]
        d = tl.arange(0, 2 * HALF_PAD)[None, :]
        v_mask = (vh < NUM_KV_HEADS) & (d < 2 * HALF)
        v = tl.load(v_ptr + token * stride_vt + vh * stride_vh + d, mask=v_mask)
        tl.store(v_cache_ptr + cache + vh * stride_ch + d, v, mask=v_mask)


def rotary_embedding(
    x: torch.Tensor,  # [T, heads, head_dim], last dim contiguous: rotated in place
    positions: torch.Tensor,  # [T] int
    cos: torch.Tensor,  # [max_positions, head_dim // 2], model dtype
    sin: torch.Tensor,
    store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Rotate-half rotary embedding (transformers' Llama layout), in place. With `store` =
    (v [T, kv_heads, head_dim], k_cache, v_cache, slot_mapping [T]), the last kv_heads heads of
    `x` are K: they and V are also written into the cache, as `store_kv` would (one kernel less
    per layer)."""
    num_tokens, num_heads, head_dim = x.shape
    if num_tokens == 0:
        return
    assert x.stride(-1) == 1 and cos.stride() == sin.stride() and cos.stride(-1) == 1
    half = head_dim // 2
    v, k_cache, v_cache, slots = store if store is not None else (x, x, x, positions)
    if store is not None:
        assert v.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
        assert k_cache.shape[-1] == head_dim == 2 * half
    num_kv_heads = v.shape[1] if store is not None else 1
    _rope_kernel[(num_tokens,)](
        x,
        positions,
        cos,
        sin,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        v,
        k_cache,
        v_cache,
        slots,
        v.stride(0),
        v.stride(1),
        k_cache.stride(0) if store is not None else 0,
        k_cache.stride(1) if store is not None else 0,
        k_cache.stride(2) if store is not None else 0,
        NUM_HEADS=num_heads,
        HALF=half,
        HEADS_PAD=triton.next_power_of_2(num_heads),
        HALF_PAD=triton.next_power_of_2(half),
        STORE=store is not None,
        NUM_KV_HEADS=num_kv_heads,
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        BLOCK_SIZE=k_cache.shape[1] if store is not None else 1,
    )


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_o,
    n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    dtype = gate.dtype
    g = gate.to(tl.float32)
    # silu rounded to the model dtype, then the product: transformers' `act(gate) * up`.
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * n] -> [T, n]
    """`silu(x[:, :n]) * x[:, n:]` in one pass (the gate and up halves of a fused projection)."""
    num_rows, width = x.shape
    n_cols = width // 2
    out = torch.empty((num_rows, n_cols), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    assert x.stride(-1) == 1
    block = min(1024, triton.next_power_of_2(n_cols))
    _silu_and_mul_kernel[(num_rows, triton.cdiv(n_cols, block))](
        x, out, x.stride(0), out.stride(0), n_cols, BLOCK=block, num_warps=4
    )
    return out
