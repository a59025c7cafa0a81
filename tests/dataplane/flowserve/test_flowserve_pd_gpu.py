"""PD disaggregation on a CUDA device (run on the GPU machine: `pytest -m gpu`): the kernel path's
cache (rotated K written by the fused kernels, decode graphs, async scheduling) exports to pinned
host memory and imports back, and greedy output through a prefill -> decode pair equals one
colocated engine's, as on the CPU (test_flowserve_pd_engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_flowserve_correctness import PROMPTS, ids_of
from test_flowserve_engine import tokens
from test_flowserve_pd_engine import colocated, decode, greedy, prefill

from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.kv_cache import bytes_per_block
from dataplane.flowserve.kv_transfer import decode as decode_transfer
from dataplane.flowserve.kv_transfer import encode_header, payload
from dataplane.flowserve.models import ModelConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def on_cuda(model_dir: Path, **options: object) -> Engine:
    config = EngineConfig(str(model_dir), device="cuda", max_num_seqs=8, **options)  # type: ignore[arg-type]
    return Engine(config)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_decode_pair_equals_colocated_on_cuda(tiny_model_dir: Path, dtype: str) -> None:
    """All three engines alike (block size 4, 32 tokens a step: chunked prompts, prefix-cache
    hits; kernels, graphs, async scheduling) and fed one prompt at a time, so that each step's
    shapes match and even bf16 rounds the same: the decode instance then computes exactly what
    the colocated one does."""
    options = {"dtype": dtype, "block_size": 4, "max_num_batched_tokens": 32}
    p, d, c = (on_cuda(tiny_model_dir, **options) for _ in range(3))
    assert p.async_scheduling and p._runner.kernels and d._runner.use_graphs
    prompts = [ids_of(c, text) for text in PROMPTS]
    params = greedy(16)
    hits = 0
    for prompt in prompts:
        expected = colocated(c, [prompt], params)
        (kv,) = prefill(p, [prompt], params)
        assert kv.kv.device.type == "cpu" and kv.kv.is_pinned()
        assert kv.kv.dtype == getattr(torch, dtype)
        # Through the serialized form, as a transport carries them.
        carried = decode_transfer(bytearray(encode_header(kv) + bytes(payload(kv))))
        (outputs,) = decode(d, [prompt], [carried], params)
        assert [tokens(outputs)] == expected
    assert p.stats().prefix_cache_hits > hits


def test_preempted_imports_recompute_on_cuda(tiny_model_dir: Path) -> None:
    block_bytes = bytes_per_block(ModelConfig.from_folder(tiny_model_dir), 4, torch.float32)
    p = on_cuda(tiny_model_dir, dtype="float32")
    d = on_cuda(tiny_model_dir, dtype="float32", block_size=4, kv_cache_bytes=12 * block_bytes)
    c = on_cuda(tiny_model_dir, dtype="float32")
    prompts = [ids_of(c, text) for text in ("One two three", "Blue sky", "Hello", "4 5 6")]
    params = greedy(24)
    outputs = decode(d, prompts, prefill(p, prompts, params), params)
    assert d.stats().num_preemptions > 0
    assert [tokens(o) for o in outputs] == colocated(c, prompts, params)
