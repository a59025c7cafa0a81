"""FlowServe on a CUDA device (run on the GPU machine: `pytest -m gpu`): greedy output equal to
Hugging Face's with decode graphs on and off, through the prefix cache, chunked prefill and
preemption; graphs replay what eager computes; the KV cache is sized after a profiling pass and
a stored profile skips it. The kernels' own tests (test_flowserve_kernels) run compiled here too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_flowserve_correctness import PROMPTS, ids_of
from test_flowserve_engine import run, tokens
from transformers import AutoModelForCausalLM, PreTrainedModel

from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.kv_cache import bytes_per_block
from dataplane.flowserve.models import ModelConfig
from dataplane.flowserve.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def hf_cuda(tiny_model_dir: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.to("cuda").eval()


def hf_greedy_cuda(model: PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
    )
    return list(out[0, ids.shape[1] :].tolist())


def engine_on_cuda(model_dir: Path, **options: object) -> Engine:
    config = EngineConfig(str(model_dir), device="cuda", max_num_seqs=8, **options)  # type: ignore[arg-type]
    return Engine(config)


def generate(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    outputs = run(engine)
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    return [tokens(outputs[f"r{i}"]) for i in range(len(prompts))]


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_float32_greedy_equals_hf_with_graphs_on_and_off(
    tiny_model_dir: Path, hf_cuda: PreTrainedModel, enforce_eager: bool
) -> None:
    engine = engine_on_cuda(
        tiny_model_dir,
        dtype="float32",
        enforce_eager=enforce_eager,
        max_num_batched_tokens=32,  # chunked prefill, mixed batches
        block_size=4,
    )
    assert engine._runner.kernels and engine._runner.use_graphs is not enforce_eager
    prompts = [ids_of(engine, p) for p in PROMPTS]
    expected = [hf_greedy_cuda(hf_cuda, p, 24) for p in prompts]
    assert generate(engine, prompts[:1], 24) == expected[:1]
    hits = engine.stats().prefix_cache_hits
    assert generate(engine, prompts, 24) == expected
    assert engine.stats().prefix_cache_hits > hits


def test_float32_greedy_equals_hf_under_preemption(
    tiny_model_dir: Path, hf_cuda: PreTrainedModel
) -> None:
    block_bytes = bytes_per_block(ModelConfig.from_folder(tiny_model_dir), 4, torch.float32)
    engine = engine_on_cuda(
        tiny_model_dir, dtype="float32", block_size=4, kv_cache_bytes=12 * block_bytes
    )
    prompts = [ids_of(engine, p) for p in ("One two three", "Blue sky", "Hello", "4 5 6")]
    assert generate(engine, prompts, 24) == [hf_greedy_cuda(hf_cuda, p, 24) for p in prompts]
    assert engine.stats().num_preemptions > 0


def test_bfloat16_graphs_replay_what_eager_computes(tiny_model_dir: Path) -> None:
    prompts_text = [*PROMPTS, "A B C", "x y z w", "7 8 9"]
    eager = engine_on_cuda(tiny_model_dir, dtype="bfloat16", enforce_eager=True)
    graphs = engine_on_cuda(tiny_model_dir, dtype="bfloat16")
    prompts = [ids_of(eager, p) for p in prompts_text]  # 7 sequences: padded to the graph of 8
    assert generate(graphs, prompts, 32) == generate(eager, prompts, 32)


def test_kv_cache_is_sized_after_profiling_and_the_profile_is_reused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    profile = tmp_path / "profile.json"
    first = engine_on_cuda(tiny_model_dir, memory_profile=str(profile), kv_cache_fraction=0.01)
    assert profile.is_file()
    del first
    second = engine_on_cuda(tiny_model_dir, memory_profile=str(profile), kv_cache_fraction=0.01)
    assert second.num_kv_blocks > 0
