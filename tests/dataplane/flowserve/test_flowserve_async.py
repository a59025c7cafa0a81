"""Async scheduling (step k launches batch k before reading batch k-1's tokens) gives the same
tokens as the one-step-at-a-time engine: checked on the CPU, where the host path runs it too."""

from __future__ import annotations

from pathlib import Path

import torch
from test_flowserve_correctness import PROMPTS, check_against_hf, ids_of
from test_flowserve_engine import run, tokens
from transformers import PreTrainedModel

from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.kv_cache import bytes_per_block
from dataplane.flowserve.models import ModelConfig
from dataplane.flowserve.sampling_params import SamplingParams


def async_engine(model_dir: Path, **options: object) -> Engine:
    engine = Engine(EngineConfig(str(model_dir), async_scheduling=True, **options))  # type: ignore[arg-type]
    assert engine.async_scheduling
    return engine


def test_async_matches_hf_with_chunks_and_prefix_cache(
    tiny_model_dir: Path, hf_model: PreTrainedModel
) -> None:
    engine = async_engine(tiny_model_dir, max_num_seqs=4, max_num_batched_tokens=8, block_size=4)
    prompts = [ids_of(engine, p) for p in PROMPTS]
    check_against_hf(engine, hf_model, prompts[:1], 12)
    hits = engine.stats().prefix_cache_hits
    check_against_hf(engine, hf_model, prompts, 12)
    assert engine.stats().prefix_cache_hits > hits


def test_async_matches_hf_under_preemption(tiny_model_dir: Path, hf_model: PreTrainedModel) -> None:
    block_bytes = bytes_per_block(ModelConfig.from_folder(tiny_model_dir), 4, torch.float32)
    engine = async_engine(
        tiny_model_dir, max_num_seqs=4, block_size=4, kv_cache_bytes=12 * block_bytes
    )
    prompts = [ids_of(engine, p) for p in ("One two three", "Blue sky", "Hello", "4 5 6")]
    check_against_hf(engine, hf_model, prompts, 24)
    assert engine.stats().num_preemptions > 0


def test_async_stops_sampled_and_aborted_requests_like_sync(tiny_model_dir: Path) -> None:
    def outputs(engine: Engine) -> dict[str, list[int]]:
        prompt = ids_of(engine, PROMPTS[2])
        free = run_to_completion(engine, prompt)
        stop = free["plain"][5]  # a token it is known to sample: it must stop there
        engine.add_request(
            "stop", prompt, SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop])
        )
        sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
        engine.add_request("sampled", prompt, sampled)
        engine.add_request("aborted", prompt, SamplingParams(max_tokens=50, ignore_eos=True))
        got: dict[str, list[int]] = {}
        for i in range(200):
            if not engine.has_unfinished():
                break
            if i == 3:
                engine.abort_request("aborted")
            for out in engine.step():
                got.setdefault(out.request_id, []).append(out.new_token_id)  # type: ignore[arg-type]
        assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
        return got | free

    def run_to_completion(engine: Engine, prompt: list[int]) -> dict[str, list[int]]:
        engine.add_request(
            "plain", prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        )
        return {"plain": tokens(run(engine)["plain"])}

    sync = outputs(Engine(EngineConfig(str(tiny_model_dir), max_num_seqs=4)))
    overlapped = outputs(async_engine(tiny_model_dir, max_num_seqs=4))
    for name in ("plain", "stop", "sampled"):
        assert overlapped[name] == sync[name], name
    assert overlapped["stop"][-1] == sync["plain"][5]
    assert overlapped["aborted"][-1] is None  # reported as an abort, at most a token late
