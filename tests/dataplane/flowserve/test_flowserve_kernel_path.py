"""The engine's kernel path (FlowServe's Triton kernels over `paged_metadata`) on the CPU, under
Triton's interpreter: greedy tokens equal Hugging Face's through chunked prefill, mixed prefill and
decode batches, prefix-cache hits and preemption. The GPU runs the same path compiled (test_gpu)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_flowserve_correctness import PROMPTS, check_against_hf, ids_of
from transformers import PreTrainedModel

from dataplane.flowserve import engine as engine_module
from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.kv_cache import bytes_per_block
from dataplane.flowserve.models import ModelConfig
from dataplane.flowserve.platform import Platform

pytest.importorskip("triton")


class KernelHost(Platform):
    """The host, taking the kernel path (the interpreter runs the kernels)."""

    triton_kernels = True


@pytest.fixture()
def kernel_path(monkeypatch: pytest.MonkeyPatch) -> None:
    platform = KernelHost(torch.device("cpu"))
    monkeypatch.setattr(engine_module, "get_platform", lambda device: platform)


@pytest.mark.usefixtures("kernel_path")
def test_kernel_path_matches_hf_with_chunks_and_prefix_cache(
    tiny_model_dir: Path, hf_model: PreTrainedModel
) -> None:
    engine = Engine(
        EngineConfig(
            str(tiny_model_dir),
            max_num_seqs=4,
            max_num_batched_tokens=16,
            block_size=4,
            max_model_len=256,
        )
    )
    assert engine._runner.kernels
    prompts = [ids_of(engine, p) for p in PROMPTS[1:]]
    check_against_hf(engine, hf_model, prompts[:1], 3)
    hits = engine.stats().prefix_cache_hits
    check_against_hf(engine, hf_model, [ids_of(engine, PROMPTS[0]), *prompts], 4)
    assert engine.stats().prefix_cache_hits > hits


@pytest.mark.usefixtures("kernel_path")
def test_kernel_path_matches_hf_under_preemption(
    tiny_model_dir: Path, hf_model: PreTrainedModel
) -> None:
    block_bytes = bytes_per_block(ModelConfig.from_folder(tiny_model_dir), 4, torch.float32)
    engine = Engine(
        EngineConfig(
            str(tiny_model_dir),
            max_num_seqs=4,
            block_size=4,
            kv_cache_bytes=8 * block_bytes,
            max_model_len=256,
        )
    )
    prompts = [ids_of(engine, p) for p in ("One two three", "Blue sky", "4 5 6")]
    check_against_hf(engine, hf_model, prompts, 14)
    assert engine.stats().num_preemptions > 0
