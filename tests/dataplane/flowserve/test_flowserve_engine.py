from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine, StepOutput
from dataplane.flowserve.errors import ConfigError, DuplicateRequest, InvalidRequest, PromptTooLong
from dataplane.flowserve.sampling_params import SamplingParams

PROMPTS = [
    "The quick brown fox",
    "Hello",
    "héllo wörld, this is a somewhat longer prompt with 你好 in it",
    "1 2 3 4",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def run(engine: Engine) -> dict[str, list[StepOutput]]:
    outputs: dict[str, list[StepOutput]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not finish")


def tokens(outs: list[StepOutput]) -> list[int]:
    return [o.new_token_id for o in outs if o.new_token_id is not None]


def hf_greedy(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,  # like ignore_eos
    )
    return list(out[0, ids.shape[1] :].tolist())


def test_greedy_matches_hf_generate_one_at_a_time(
    engine: Engine, hf_model: PreTrainedModel
) -> None:
    for i, prompt in enumerate(PROMPTS[:2]):
        ids = engine.tokenizer(prompt)["input_ids"]
        engine.add_request(f"r{i}", ids, GREEDY)
        outs = run(engine)[f"r{i}"]
        assert tokens(outs) == hf_greedy(hf_model, ids, 24)
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert not any(o.finished for o in outs[:-1])


def test_greedy_matches_hf_generate_when_concurrent(
    engine: Engine, hf_model: PreTrainedModel
) -> None:
    # Six requests, four slots: two wait, and join as others finish at different lengths.
    prompts = PROMPTS + ["Once upon a time", "user: hi"]
    lengths = [24, 7, 16, 3, 12, 20]
    ids = [engine.tokenizer(p)["input_ids"] for p in prompts]
    for i, (prompt_ids, n) in enumerate(zip(ids, lengths, strict=True)):
        engine.add_request(
            f"r{i}", prompt_ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        )
    assert engine.num_waiting == 6
    first = engine.step()
    assert (engine.num_running, engine.num_waiting) == (4, 2)
    outputs = run(engine)
    assert engine.num_running == engine.num_waiting == 0
    for out in first:
        outputs[out.request_id].insert(0, out)
    for i, (prompt_ids, n) in enumerate(zip(ids, lengths, strict=True)):
        assert tokens(outputs[f"r{i}"]) == hf_greedy(hf_model, prompt_ids, n)


def test_seeded_sampling_is_reproducible_whatever_else_runs(engine: Engine) -> None:
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    params = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True
    )
    engine.add_request("alone", ids, params)
    alone = tokens(run(engine)["alone"])

    engine.add_request(
        "noise-1", ids, SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    )
    engine.add_request("crowded", ids, params)
    other_prompt = engine.tokenizer(PROMPTS[2])["input_ids"]
    engine.add_request(
        "noise-2", other_prompt, SamplingParams(temperature=0.7, max_tokens=5, ignore_eos=True)
    )
    crowded = tokens(run(engine)["crowded"])
    assert crowded == alone

    engine.add_request(
        "other-seed", ids, SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True)
    )
    assert tokens(run(engine)["other-seed"]) != alone


def test_stop_token_ids_and_eos(engine: Engine) -> None:
    ids = engine.tokenizer(PROMPTS[1])["input_ids"]
    engine.add_request("free", ids, GREEDY)
    free = tokens(run(engine)["free"])
    stop_at = free[5]
    first = free.index(stop_at)
    engine.add_request(
        "stopped",
        ids,
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=(stop_at,)),
    )
    outs = run(engine)["stopped"]
    assert tokens(outs) == free[: first + 1]
    assert outs[-1].finish_reason == "stop"

    # The same token as eos stops too, unless ignore_eos.
    engine.eos_token_ids = frozenset({stop_at})
    engine.add_request("eos", ids, SamplingParams(temperature=0, max_tokens=24))
    assert tokens(run(engine)["eos"]) == free[: first + 1]
    engine.add_request("ignored", ids, GREEDY)
    assert tokens(run(engine)["ignored"]) == free


def test_max_tokens_and_max_model_len(tiny_model_dir: Path) -> None:
    engine = Engine(EngineConfig(str(tiny_model_dir), max_model_len=20))
    assert engine.max_model_len == 20
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    engine.add_request("a", ids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.add_request("b", ids, SamplingParams(temperature=0, ignore_eos=True))
    outputs = run(engine)
    assert len(tokens(outputs["a"])) == 3
    assert len(ids) + len(tokens(outputs["b"])) == 20
    assert outputs["b"][-1].finish_reason == "length"

    with pytest.raises(PromptTooLong) as info:
        engine.add_request("long", list(range(21)), GREEDY)
    assert info.value.code == "context_length_exceeded"
    engine.add_request("full", list(range(20)), GREEDY)  # fits; one token, then length
    assert [o.finish_reason for o in run(engine)["full"]] == ["length"]


def test_bad_requests(engine: Engine) -> None:
    engine.add_request("x", [1, 2, 3], GREEDY)
    with pytest.raises(DuplicateRequest):
        engine.add_request("x", [1, 2, 3], GREEDY)
    with pytest.raises(InvalidRequest):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(InvalidRequest):
        engine.add_request("oov", [engine.vocab_size], GREEDY)
    with pytest.raises(InvalidRequest):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError):
        EngineConfig("unused", max_num_seqs=0)
    with pytest.raises(ConfigError):
        Engine(EngineConfig("/nonexistent/model/folder"))


def test_abort_frees_at_once_and_is_reported(engine: Engine) -> None:
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    for name in ("keep", "drop", "queued"):
        engine.add_request(name, ids, GREEDY)
    assert engine.config.max_num_seqs >= 3
    engine.step()
    engine.abort_request("drop")
    engine.abort_request("unknown")  # ignored
    assert engine.num_running == 2
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "drop"]
    assert aborted == [StepOutput("drop", None, None, True, "abort")]
    assert {o.request_id for o in outs} == {"keep", "queued", "drop"}
    engine.abort_request("keep")
    engine.abort_request("queued")
    assert engine.num_running == 0
    assert engine.has_unfinished()  # until the aborts are reported
    assert {o.finish_reason for o in engine.step()} == {"abort"}
    assert not engine.has_unfinished()
    engine.add_request("drop", ids, GREEDY)  # the id is free again


def test_abort_of_a_waiting_request(tiny_model_dir: Path) -> None:
    engine = Engine(EngineConfig(str(tiny_model_dir), max_num_seqs=1))
    engine.add_request("a", [1, 2], GREEDY)
    engine.add_request("b", [1, 2], GREEDY)
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (1, 1)
    engine.abort_request("b")
    assert engine.num_waiting == 0
    outputs = run(engine)
    assert outputs["b"][-1].finish_reason == "abort"
    assert len(tokens(outputs["a"])) == 23


def test_logprobs_are_of_the_raw_distribution(engine: Engine, hf_model: PreTrainedModel) -> None:
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    params = SamplingParams(
        temperature=0.5, top_k=3, seed=7, max_tokens=1, logprobs=True, top_logprobs=4
    )
    engine.add_request("lp", ids, params)
    [out] = run(engine)["lp"]
    assert out.logprob is not None and out.new_token_id is not None
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0, -1]
    expected = logits.log_softmax(-1)
    assert out.logprob.token_id == out.new_token_id
    assert out.logprob.logprob == pytest.approx(expected[out.new_token_id].item(), abs=1e-5)
    top_ids = [t for t, _ in out.logprob.top]
    assert top_ids == expected.topk(4).indices.tolist()
    assert out.new_token_id in expected.topk(3).indices.tolist()


def test_kv_cache_budget_by_bytes_or_fraction_is_reported(tiny_model_dir: Path) -> None:
    from dataplane.flowserve.kv_cache import bytes_per_block
    from dataplane.flowserve.models import ModelConfig

    block = bytes_per_block(ModelConfig.from_folder(tiny_model_dir), 16, torch.float32)
    fixed = Engine(EngineConfig(str(tiny_model_dir), kv_cache_bytes=64 * block + 7))
    assert fixed.num_kv_blocks == 64
    assert "64 blocks of 16 tokens (1024 tokens)" in fixed.describe_kv_cache()
    share = Engine(EngineConfig(str(tiny_model_dir), kv_cache_fraction=0.001))
    assert share.kv_budget.fraction == 0.001 and "0.001 of" in share.describe_kv_cache()
    with pytest.raises(ConfigError):
        EngineConfig(str(tiny_model_dir), kv_cache_bytes=1, kv_cache_fraction=0.5)
