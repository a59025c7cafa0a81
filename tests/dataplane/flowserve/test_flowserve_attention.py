"""Paged attention against a naive per-token reference, and KV cache sizing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from dataplane.flowserve import cpu_kernels, kv_cache
from dataplane.flowserve.attention import AttentionMetadata, paged_attention, store_kv
from dataplane.flowserve.errors import ConfigError
from dataplane.flowserve.models import ModelConfig

CPU = torch.device("cpu")
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8


def _meta(
    query_lens: list[int],
    context_lens: list[int],
    tables: list[list[int]],
    block_size: int,
    decode_kernel: bool = False,
) -> AttentionMetadata:
    return AttentionMetadata.build(
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=tables,
        block_size=block_size,
        device=CPU,
        dtype=torch.float32,
        decode_kernel=decode_kernel,
    )


def _tables(
    context_lens: list[int], block_size: int, num_blocks: int, seed: int
) -> list[list[int]]:
    """Non-contiguous, shuffled block ids; some tables longer than needed."""
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    tables = []
    for i, n in enumerate(context_lens):
        needed = -(-n // block_size) + (i % 2)
        tables.append([free.pop() for _ in range(needed)])
    return tables


def _reference(
    q: torch.Tensor,  # [T, heads, hd]
    keys: list[torch.Tensor],  # per seq [context_len, kv_heads, hd]
    values: list[torch.Tensor],
    query_lens: list[int],
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(q)
    group = NUM_HEADS // NUM_KV_HEADS
    row = 0
    for k, v, q_len in zip(keys, values, query_lens, strict=True):
        context_len = k.shape[0]
        for i in range(q_len):
            visible = context_len - q_len + i + 1
            for h in range(NUM_HEADS):
                scores = k[:visible, h // group] @ q[row, h] * scale  # [visible]
                out[row, h] = scores.softmax(-1) @ v[:visible, h // group]
            row += 1
    return out


KERNEL = pytest.param(
    True,
    marks=pytest.mark.skipif(
        cpu_kernels.paged_decode_kernel() is None, reason="no C compiler for the CPU kernel"
    ),
    id="cpu-kernel",
)


@pytest.mark.parametrize("decode_kernel", [pytest.param(False, id="sdpa"), KERNEL])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(
    ("query_lens", "context_lens"),
    [
        ([1, 1, 1], [5, 17, 1]),  # decodes only
        ([1, 6, 1, 9, 1], [12, 6, 3, 20, 33]),  # decodes between a prefill and a chunk
        ([1, 1, 4, 7], [8, 2, 4, 7]),  # decodes first, then prefills
        ([5], [11]),  # one chunk continuing an earlier one
    ],
)
def test_paged_attention_matches_reference(
    decode_kernel: bool, block_size: int, query_lens: list[int], context_lens: list[int]
) -> None:
    torch.manual_seed(0)
    num_blocks = 40
    tables = _tables(context_lens, block_size, num_blocks, seed=block_size)
    meta = _meta(query_lens, context_lens, tables, block_size, decode_kernel)
    assert (meta.kernel_decodes is not None) == (decode_kernel and 1 in query_lens)
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.randn(shape), torch.randn(shape)  # stale data everywhere
    keys = [torch.randn(n, NUM_KV_HEADS, HEAD_DIM) for n in context_lens]
    values = [torch.randn(n, NUM_KV_HEADS, HEAD_DIM) for n in context_lens]
    # The cached prefix of each sequence is already in its blocks; this step adds the rest.
    for table, k, v, q_len in zip(tables, keys, values, query_lens, strict=True):
        for pos in range(k.shape[0] - q_len):
            block, offset = table[pos // block_size], pos % block_size
            k_cache[block, offset], v_cache[block, offset] = k[pos], v[pos]
    new_k = torch.cat([k[-n:] for k, n in zip(keys, query_lens, strict=True)])
    new_v = torch.cat([v[-n:] for v, n in zip(values, query_lens, strict=True)])
    q = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM)
    store_kv(new_k, new_v, k_cache, v_cache, meta.slot_mapping)

    expected = _reference(q, keys, values, query_lens, scale=0.3)
    from_cache = paged_attention(q, k_cache, v_cache, meta, 0.3)
    with_new_kv = paged_attention(q, k_cache, v_cache, meta, 0.3, k=new_k, v=new_v)
    torch.testing.assert_close(from_cache, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_new_kv, expected, atol=1e-5, rtol=1e-5)


def test_metadata_positions_slots_and_decode_group() -> None:
    meta = _meta([1, 3, 1], [6, 3, 2], [[7, 2], [5], [0, 9]], block_size=4)
    assert meta.positions.tolist() == [5, 0, 1, 2, 1]
    # seq 0 position 5 -> block 2 offset 1; seq 1 -> block 5; seq 2 position 1 -> block 0.
    assert meta.slot_mapping.tolist() == [9, 20, 21, 22, 1]
    assert meta.query_start_loc == [0, 1, 4, 5]
    assert meta.context_lens.tolist() == [6, 3, 2]
    assert meta.block_tables.tolist() == [[7, 2], [5, 0], [0, 0]]
    assert meta.num_decodes == 2
    (group,) = meta.decode_groups
    assert isinstance(group.rows, torch.Tensor)
    assert group.rows.tolist() == [0, 4]
    assert group.block_ids.tolist() == [7, 2, 0, 0]
    assert group.mask.shape == (2, 1, 1, 8)
    assert (group.mask[0, 0, 0] == 0).tolist() == [True] * 6 + [False] * 2
    (chunk,) = meta.prefills
    assert (chunk.start, chunk.end, chunk.context_len, chunk.mask) == (1, 4, 3, None)


def test_metadata_decodes_first_are_a_slice() -> None:
    meta = _meta([1, 1, 2], [3, 4, 5], [[1], [2], [3, 4]], block_size=4)
    assert meta.decode_groups[0].rows == slice(0, 2)
    (chunk,) = meta.prefills
    assert chunk.mask is not None  # a chunk after a cached prefix needs an offset causal mask
    assert (chunk.mask == 0).tolist() == [
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]


@pytest.mark.parametrize(
    ("query_lens", "context_lens", "tables"),
    [
        ([], [], []),
        ([1], [1, 2], [[0]]),
        ([0], [3], [[0]]),
        ([4], [3], [[0]]),
        ([1], [5], [[0]]),  # five tokens do not fit one block of four
    ],
)
def test_metadata_rejects_bad_input(
    query_lens: list[int], context_lens: list[int], tables: list[list[int]]
) -> None:
    with pytest.raises(ValueError):
        _meta(query_lens, context_lens, tables, block_size=4)


def test_store_kv_writes_each_token_at_its_slot() -> None:
    k_cache = torch.zeros(3, 2, NUM_KV_HEADS, HEAD_DIM)
    v_cache = torch.zeros(3, 2, NUM_KV_HEADS, HEAD_DIM)
    k = torch.randn(3, NUM_KV_HEADS, HEAD_DIM)
    v = torch.randn(3, NUM_KV_HEADS, HEAD_DIM)
    store_kv(k, v, k_cache, v_cache, torch.tensor([5, 0, 2]))
    torch.testing.assert_close(k_cache[2, 1], k[0])
    torch.testing.assert_close(k_cache[0, 0], k[1])
    torch.testing.assert_close(v_cache[1, 0], v[2])
    assert k_cache[0, 1].abs().sum() == 0


# --- KV cache sizing -----------------------------------------------------------------------


def _config() -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 100,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
        }
    )


def test_bytes_per_block_and_blocks_for_budget() -> None:
    config = _config()  # 3 layers, 2 kv heads of 16
    assert kv_cache.bytes_per_block(config, 16, torch.float32) == 2 * 3 * 2 * 16 * 16 * 4
    assert kv_cache.bytes_per_block(config, 16, torch.bfloat16) == 2 * 3 * 2 * 16 * 16 * 2
    block = kv_cache.bytes_per_block(config, 16, torch.float32)
    assert kv_cache.num_blocks_for_budget(10 * block + 5, config, 16, torch.float32) == 10
    with pytest.raises(ConfigError, match="holds no block"):
        kv_cache.num_blocks_for_budget(block - 1, config, 16, torch.float32)


def test_allocate_kv_cache_is_zeroed_views_of_one_tensor() -> None:
    caches = kv_cache.allocate_kv_cache(_config(), 5, 4, torch.float32, CPU)
    assert len(caches) == 3
    for k, v in caches:
        assert k.shape == v.shape == (5, 4, 2, 16)
        assert k.is_contiguous() and v.is_contiguous()
        assert k.abs().sum() == 0
    storage = {k.untyped_storage().data_ptr() for layer in caches for k in layer}
    assert len(storage) == 1


def test_budget_fixed_or_fraction_of_free(monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = kv_cache.resolve_kv_cache_budget(CPU, num_bytes=1000)
    assert (fixed.num_bytes, fixed.free_bytes, fixed.fraction) == (1000, None, None)
    assert "fixed" in fixed.describe()
    monkeypatch.setattr(kv_cache, "free_memory", lambda device: 8 * 1024**3)
    half = kv_cache.resolve_kv_cache_budget(CPU, fraction=0.5)
    assert (half.num_bytes, half.free_bytes) == (4 * 1024**3, 8 * 1024**3)
    assert half.describe() == "4.00 GiB (0.5 of 8.00 GiB free)"
    for kwargs in ({}, {"num_bytes": 1, "fraction": 0.5}, {"num_bytes": 0}, {"fraction": 1.5}):
        with pytest.raises(ConfigError):
            kv_cache.resolve_kv_cache_budget(CPU, **kwargs)


def test_free_memory_on_cpu_is_plausible() -> None:
    assert 0 < kv_cache.free_memory(CPU) < 1 << 50


def test_meminfo_fallback(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  100 kB\nMemAvailable:   2048 kB\n")
    assert kv_cache._mem_available_from_proc(meminfo) == 2048 * 1024
    meminfo.write_text("MemTotal:  100 kB\n")
    with pytest.raises(ConfigError):
        kv_cache._mem_available_from_proc(meminfo)


def test_many_decodes_are_grouped_by_context_length() -> None:
    # 16 decodes, lengths alternating short and long: two groups, the short ones unpadded.
    lens = [4 if i % 2 == 0 else 64 for i in range(16)]
    tables = [list(range(i * 16, i * 16 + 16)) for i in range(16)]
    meta = _meta([1] * 16, lens, tables, block_size=4)
    short, long = meta.decode_groups
    assert short.rows.tolist() == list(range(0, 16, 2))
    assert short.mask.shape == (8, 1, 1, 4) and long.mask.shape == (8, 1, 1, 64)
    assert sum(g.num for g in meta.decode_groups) == 16
