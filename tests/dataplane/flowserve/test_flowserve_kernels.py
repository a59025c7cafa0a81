"""FlowServe's Triton kernels against plain PyTorch references.

On the CPU they run under Triton's interpreter (`TRITON_INTERPRET=1`, set here before Triton is
imported), at small sizes so the file takes seconds; on a GPU machine the same tests run compiled
on the device (the `gpu`-marked copies at the end, at model sizes too). Skipped only when Triton
cannot be imported.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from dataplane.flowserve.kernels import (  # noqa: E402
    decode_partitions,
    paged_decode_attention,
    paged_prefill_attention,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
    store_kv,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter stores bfloat16 as raw 16-bit integers and converts it wrongly: bf16 is checked
# compiled on the GPU, fp16 (the same code paths) under the interpreter.
BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(DEVICE.type == "cpu", reason="the interpreter mishandles bf16"),
)
HALF = (BF16, torch.float16)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def paged_cache(
    context_lens: list[int], block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A cache with each sequence's K/V scattered over shuffled blocks; returns the cache, the
    int32 block tables and each sequence's dense K/V `[len, kv_heads, head_dim]`."""
    g = torch.Generator().manual_seed(sum(context_lens))
    needed = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.zeros(len(context_lens), max(needed), dtype=torch.int32)
    ks, vs = [], []
    for b, n in enumerate(needed):
        blocks = [order.pop() for _ in range(n)]
        tables[b, :n] = torch.tensor(blocks, dtype=torch.int32)
        ks.append(k_cache[blocks].reshape(-1, kv_heads, head_dim)[: context_lens[b]])
        vs.append(v_cache[blocks].reshape(-1, kv_heads, head_dim)[: context_lens[b]])
    return k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE), ks, vs


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [q_len, heads, d] (the last q_len positions), k/v [ctx, kv_heads, d]; float64."""
    q_len, heads, _ = q.shape
    ctx, kv_heads, _ = k.shape
    k = k.double().repeat_interleave(heads // kv_heads, dim=1)
    v = v.double().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double().cpu(), k) * scale
    rows = torch.arange(ctx - q_len, ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > rows, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (6, 2, 24)])
def test_decode_kernel_matches_reference(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> None:
    tol = TOLERANCE[dtype]
    block_size = 4
    context_lens = [1, 5, 37, 300]  # 300 spans several partitions
    k_cache, v_cache, tables, ks, vs = paged_cache(
        context_lens, block_size, kv_heads, head_dim, dtype
    )
    q = torch.randn(len(context_lens), heads, head_dim).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(
        q,
        k_cache,
        v_cache,
        tables,
        torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        scale,
        max_context_len=512,
        out=out,
    )
    assert not out.isnan().any()
    for b in range(len(context_lens)):
        ref = reference_attention(q[b : b + 1], ks[b], vs[b], scale)
        assert rel_error(out[b : b + 1].cpu(), ref) < tol


def test_decode_partitions_fill_the_device_and_no_more() -> None:
    assert decode_partitions(1, 8, 4096) == 32  # a batch of one spreads over many programs
    assert decode_partitions(1, 8, 100) == 2  # but never into partitions of no tokens
    assert decode_partitions(16, 8, 4096) == 8
    assert decode_partitions(256, 8, 4096) == 1  # 2048 programs already


@pytest.mark.parametrize(
    ("context_lens", "max_context_len"), [([1, 17, 64], 64), ([1, 64, 65, 130, 257], 512)]
)
def test_decode_kernel_any_partition_count(context_lens: list[int], max_context_len: int) -> None:
    # One partition per sequence (a bound of 64 tokens), then 8 of a tile or two each.
    k_cache, v_cache, tables, ks, vs = paged_cache(context_lens, 4, 2, 16, torch.float32)
    q = torch.randn(len(context_lens), 4, 16).to(DEVICE)
    lens = torch.tensor(context_lens, device=DEVICE)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25, max_context_len)
    for b in range(len(context_lens)):
        ref = reference_attention(q[b : b + 1], ks[b], vs[b], 0.25)
        assert rel_error(out[b : b + 1].cpu(), ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_prefill_kernel_matches_reference(dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 4
    # (query_len, context_len): a whole prompt, a chunk after a cached prefix, a decode mixed in.
    shapes = [(23, 23), (9, 30), (1, 17), (40, 41)]
    context_lens = [c for _, c in shapes]
    k_cache, v_cache, tables, ks, vs = paged_cache(
        context_lens, block_size, kv_heads, head_dim, dtype
    )
    query_lens = [q for q, _ in shapes]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, head_dim).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(
        q,
        k_cache,
        v_cache,
        tables,
        torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        scale,
        max_query_len=max(query_lens),
        out=out,
    )
    assert not out.isnan().any()
    for b in range(len(shapes)):
        ref = reference_attention(q[starts[b] : starts[b + 1]], ks[b], vs[b], scale)
        assert rel_error(out[starts[b] : starts[b + 1]].cpu(), ref) < tol


def test_store_kv_writes_each_slot() -> None:
    kv_heads, head_dim, block_size, num_blocks = 2, 16, 4, 6
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    qkv = torch.randn(5, (4 + 2 * kv_heads) * head_dim, device=DEVICE)  # strided views, as in
    k = qkv[:, 4 * head_dim : 6 * head_dim].view(5, kv_heads, head_dim)  # the model
    v = qkv[:, 6 * head_dim :].view(5, kv_heads, head_dim)
    slots = torch.tensor([3, 9, 10, 22, 0], device=DEVICE)
    store_kv(k, v, k_cache, v_cache, slots)
    ref_k = torch.zeros_like(k_cache).view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    ref_v = torch.zeros_like(v_cache).view(-1, kv_heads, head_dim).index_copy_(0, slots, v)
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim), ref_k)
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim), ref_v)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_rms_norm_with_and_without_residual(dtype: torch.dtype) -> None:
    x = torch.randn(7, 96).to(dtype).to(DEVICE)
    residual = torch.randn(7, 96).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(96)).to(dtype).to(DEVICE)
    out = rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(out, reference_rms_norm(x, weight, 1e-5), atol=1e-5, rtol=1e-2)
    summed = x + residual
    fused_residual = residual.clone()
    out = rms_norm(x, weight, 1e-5, residual=fused_residual)
    assert torch.equal(fused_residual, summed)
    torch.testing.assert_close(out, reference_rms_norm(summed, weight, 1e-5), atol=1e-5, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_rotary_embedding_matches_rotate_half(dtype: torch.dtype) -> None:
    heads, head_dim, max_pos = 6, 16, 64
    freqs = torch.arange(max_pos)[:, None] * (1e4 ** (-torch.arange(0, head_dim, 2) / head_dim))
    cos, sin = freqs.cos().to(dtype).to(DEVICE), freqs.sin().to(dtype).to(DEVICE)
    qkv = torch.randn(5, (heads + 2) * head_dim).to(dtype).to(DEVICE)
    x = qkv[:, : heads * head_dim].view(5, heads, head_dim)
    positions = torch.tensor([0, 3, 17, 63, 5], device=DEVICE)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    ref = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    tail = qkv[:, heads * head_dim :].clone()
    rotary_embedding(x, positions, cos, sin)
    # Compiled, the rounding of each product may fold away: one ulp of the half type apart.
    exact = dtype == torch.float32
    torch.testing.assert_close(x, ref, atol=1e-6 if exact else 2e-2, rtol=1e-6 if exact else 1e-2)
    assert torch.equal(qkv[:, heads * head_dim :], tail)  # only the rotated heads change


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_silu_and_mul_matches_reference(dtype: torch.dtype) -> None:
    # 2 x 1500 columns: more than one column block, the last one partial.
    x = (3 * torch.randn(6, 3000)).to(dtype).to(DEVICE)
    gate, up = x.split(1500, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    out = silu_and_mul(x)
    exact = dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5 if exact else 2e-2, rtol=1e-5 if exact else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_rotary_with_store_matches_rotary_then_store_kv(dtype: torch.dtype) -> None:
    heads, kv_heads, head_dim, block_size, max_pos = 4, 2, 16, 4, 64
    freqs = torch.arange(max_pos)[:, None] * (1e4 ** (-torch.arange(0, head_dim, 2) / head_dim))
    cos, sin = freqs.cos().to(dtype).to(DEVICE), freqs.sin().to(dtype).to(DEVICE)
    qkv = torch.randn(5, (heads + 2 * kv_heads) * head_dim).to(dtype).to(DEVICE)
    positions = torch.tensor([0, 3, 17, 63, 5], device=DEVICE)
    slots = torch.tensor([2, 9, 10, 21, 5], device=DEVICE)
    caches = [torch.randn(6, block_size, kv_heads, head_dim).to(dtype).to(DEVICE) for _ in "kv"]
    expected = [c.clone() for c in caches]
    qkv_ref = qkv.clone()

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qk = t[:, : (heads + kv_heads) * head_dim].view(5, heads + kv_heads, head_dim)
        return qk, t[:, (heads + kv_heads) * head_dim :].view(5, kv_heads, head_dim)

    qk_ref, v_ref = split(qkv_ref)
    rotary_embedding(qk_ref, positions, cos, sin)
    store_kv(qk_ref[:, heads:], v_ref, expected[0], expected[1], slots)
    qk, v = split(qkv)
    rotary_embedding(qk, positions, cos, sin, store=(v, caches[0], caches[1], slots))
    assert torch.equal(qkv, qkv_ref)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
