"""Greedy output equals Hugging Face's token for token under every path the paged engine can take:
prefix-cache hits, chunked prefill, preemption with recompute (a tiny random model, and SmolLM2
in a slow test); logprobs agree with HF's."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import torch
from test_flowserve_engine import hf_greedy, run, tokens
from transformers import AutoModelForCausalLM, PreTrainedModel

from controlplane.wire import ChatMessage, GenerateRequest
from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.kv_cache import bytes_per_block
from dataplane.flowserve.models import ModelConfig
from dataplane.flowserve.prompts import build_prompt
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.scheduler import ScheduledBatch

# Logprobs of our model code against HF's, fp32 on the CPU.
LOGPROB_ATOL = 1e-3

SYSTEM = "You are a careful assistant. Answer briefly and precisely, in plain words. " * 3
PROMPTS = [SYSTEM + "What is the sea?", SYSTEM + "Name a colour.", "Short one", "1 2 3 4 5 6"]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def ids_of(engine: Engine, text: str) -> list[int]:
    return list(engine.tokenizer(text)["input_ids"])


def hf_until_eos(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens
    )
    return list(out[0, ids.shape[1] :].tolist())


def check_against_hf(
    engine: Engine, hf: PreTrainedModel, prompts: list[list[int]], n: int, *, eos: bool = False
) -> None:
    """`eos`: stop at end of sequence on both sides (a real model says it); otherwise generate
    exactly `n` tokens (HF forbids eos for that, so only random models compare this way)."""
    params = SamplingParams(temperature=0.0, max_tokens=n) if eos else greedy(n)
    reference = hf_until_eos if eos else hf_greedy
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    outputs = run(engine)
    for i, prompt in enumerate(prompts):
        assert tokens(outputs[f"r{i}"]) == reference(hf, prompt, n), f"request {i}"
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks  # nothing leaked


def test_prefix_cache_hits_give_the_same_tokens(
    tiny_model_dir: Path, hf_model: PreTrainedModel
) -> None:
    engine = Engine(EngineConfig(str(tiny_model_dir), max_num_seqs=4))
    prompts = [ids_of(engine, p) for p in PROMPTS[:2]]
    check_against_hf(engine, hf_model, prompts[:1], 16)  # fills the cache with the system prompt
    hits_before = engine.stats().prefix_cache_hits
    check_against_hf(engine, hf_model, prompts, 16)
    assert engine.stats().prefix_cache_hits > hits_before


def test_chunked_prefill_gives_the_same_tokens(
    tiny_model_dir: Path, hf_model: PreTrainedModel
) -> None:
    engine = Engine(
        EngineConfig(str(tiny_model_dir), max_num_seqs=4, max_num_batched_tokens=8, block_size=4)
    )
    prompts = [ids_of(engine, p) for p in PROMPTS]
    assert max(len(p) for p in prompts) > 8  # every long prompt is split over several steps
    check_against_hf(engine, hf_model, prompts, 12)


def test_preemption_and_recompute_give_the_same_tokens(
    tiny_model_dir: Path, hf_model: PreTrainedModel
) -> None:
    config = ModelConfig.from_folder(tiny_model_dir)
    block_bytes = bytes_per_block(config, 4, torch.float32)
    # Room for 12 blocks of 4 tokens: four sequences that grow to ~40 tokens each cannot all fit.
    engine = Engine(
        EngineConfig(
            str(tiny_model_dir), max_num_seqs=4, block_size=4, kv_cache_bytes=12 * block_bytes
        )
    )
    prompts = [ids_of(engine, p) for p in ("One two three", "Blue sky", "Hello", "4 5 6")]
    check_against_hf(engine, hf_model, prompts, 24)
    assert engine.stats().num_preemptions > 0


def test_logprobs_agree_with_hf(tiny_model_dir: Path, hf_model: PreTrainedModel) -> None:
    engine = Engine(EngineConfig(str(tiny_model_dir), max_num_seqs=4))
    prompt = ids_of(engine, PROMPTS[0])
    params = SamplingParams(
        temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=3
    )
    engine.add_request("lp", prompt, params)
    outs = run(engine)["lp"]
    generated = tokens(outs)
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + generated])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]  # [n, vocab]
    for step, out in enumerate(o for o in outs if o.new_token_id is not None):
        assert out.logprob is not None
        expected = reference[step, out.new_token_id].item()
        assert out.logprob.logprob == pytest.approx(expected, abs=LOGPROB_ATOL)
        top_ids = reference[step].topk(3).indices.tolist()
        assert [t for t, _ in out.logprob.top] == top_ids
        for token_id, value in out.logprob.top:
            assert value == pytest.approx(reference[step, token_id].item(), abs=LOGPROB_ATOL)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One sequence's share of a scheduled step, copied out (the sequence changes later)."""

    step: int
    request_id: str
    start: int
    samples: bool


@dataclass(frozen=True, slots=True)
class Preemption:
    step: int
    request_id: str
    num_tokens: int
    num_output_tokens: int


def trace_scheduler(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[Chunk], list[Preemption]]:
    """Record every chunk the engine's scheduler schedules and every preemption, as they happen."""
    chunks: list[Chunk] = []
    preemptions: list[Preemption] = []
    schedule = engine._scheduler.schedule
    steps = count()

    def recording(**kwargs: Any) -> ScheduledBatch:
        batch = schedule(**kwargs)
        step = next(steps)
        chunks.extend(Chunk(step, s.seq.request_id, s.start, s.samples) for s in batch.seqs)
        preemptions.extend(
            Preemption(step, seq.request_id, seq.num_tokens, seq.num_output_tokens)
            for seq in batch.preempted
        )
        return batch

    monkeypatch.setattr(engine._scheduler, "schedule", recording)
    return chunks, preemptions


def num_prefill_chunks(chunks: list[Chunk], request_id: str) -> int:
    """How many chunks the request's prompt took, up to the one that sampled its first token."""
    mine = [c for c in chunks if c.request_id == request_id]
    return next(i for i, c in enumerate(mine, 1) if c.samples)


@pytest.mark.slow
def test_smollm2_greedy_matches_hf_with_chunks_cache_hits_and_preemption(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four chat requests at once under a 16-token step budget and a KV cache of 12 blocks of 8
    tokens: the first prompt (37 tokens) is prefilled in chunks, the later ones find the shared
    system prompt's blocks in the prefix cache, and when the blocks run out a decoding request is
    preempted and recomputed. One answer ends at eos, the others at max_tokens."""
    block_bytes = bytes_per_block(ModelConfig.from_folder(smollm2_dir), 8, torch.float32)
    engine = Engine(
        EngineConfig(
            str(smollm2_dir),
            max_num_seqs=4,
            max_num_batched_tokens=16,
            block_size=8,
            kv_cache_bytes=12 * block_bytes,
        )
    )
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    questions = [
        "What is the capital of France?",  # answered in 8 tokens, eos included
        "Describe the sea.",
        "Tell me about dogs.",
        "Why is the sky blue?",
    ]
    prompts = [
        build_prompt(
            engine.tokenizer,
            GenerateRequest(request_id="q", messages=[ChatMessage(role="user", content=q)]),
            engine.vocab_size,
        ).token_ids
        for q in questions
    ]
    chunks, preemptions = trace_scheduler(engine, monkeypatch)
    check_against_hf(engine, hf, prompts, 10, eos=True)
    assert num_prefill_chunks(chunks, "r0") > 1
    assert engine.stats().prefix_cache_hits > 0
    assert engine.num_preemptions > 0
    # A request preempted while decoding came back and recomputed K/V it had computed before.
    first = preemptions[0]
    assert first.num_output_tokens > 0
    readmitted = next(c for c in chunks if c.request_id == first.request_id and c.step > first.step)
    assert readmitted.start < first.num_tokens - 1
