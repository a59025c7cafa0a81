"""The CPU decode kernel against plain attention over gathered K/V."""

from __future__ import annotations

import pytest
import torch

from dataplane.flowserve import cpu_kernels

pytestmark = pytest.mark.skipif(
    cpu_kernels.paged_decode_kernel() is None, reason="no C compiler to build the CPU kernels"
)


def reference(q, k_cache, v_cache, tables, lens, scale):  # type: ignore[no-untyped-def]
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    out = []
    for n in range(q.shape[0]):
        length = int(lens[n])
        k = k_cache[tables[n]].flatten(0, 1)[:length]  # [len, kv_heads, head_dim]
        v = v_cache[tables[n]].flatten(0, 1)[:length]
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1).transpose(0, 1)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1).transpose(0, 1)
        weights = torch.softmax((q[n][:, None, :] @ k.transpose(1, 2)) * scale, dim=-1)
        out.append((weights @ v)[:, 0, :])
    return torch.stack(out)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size", "lens"),
    [
        (9, 3, 64, 16, [1, 17, 300, 64]),
        (4, 4, 32, 8, [5, 8, 9]),
        (8, 1, 16, 4, [33]),
    ],
)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_reference(num_heads, num_kv_heads, head_dim, block_size, lens, threads):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    max_blocks = max(-(-n // block_size) for n in lens) + 1  # one spare column, as padding
    num_blocks = len(lens) * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    tables = torch.randperm(num_blocks)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    q = torch.randn(len(lens), num_heads, head_dim)
    context = torch.tensor(lens, dtype=torch.int64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.paged_decode(q, k_cache, v_cache, tables, context, head_dim**-0.5)
    finally:
        torch.set_num_threads(previous)
    want = reference(q, k_cache, v_cache, tables, context, head_dim**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_usable_only_for_float32_cpu() -> None:
    cache = torch.zeros(2, 4, 1, 8)
    assert cpu_kernels.usable(torch.zeros(1, 1, 8), cache)
    assert not cpu_kernels.usable(torch.zeros(1, 1, 8, dtype=torch.bfloat16), cache)
    assert not cpu_kernels.usable(torch.zeros(1, 1, 8), cache.to(torch.bfloat16))


def test_off_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_kernels.paged_decode_kernel.cache_clear()
    monkeypatch.setenv("FLOWSERVE_CPU_KERNELS", "0")
    try:
        assert cpu_kernels.paged_decode_kernel() is None
    finally:
        cpu_kernels.paged_decode_kernel.cache_clear()
