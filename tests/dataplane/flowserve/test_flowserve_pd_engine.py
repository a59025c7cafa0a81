"""PD disaggregation in the engine: a prefill-only request exports its prompt's K/V and first token;
another engine imports them and continues. Greedy output through a prefill -> decode pair equals
one colocated engine's, under prefix-cache hits and chunked prefill on the prefill side and
preemption on either side, with exact block accounting on both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pool_checks import check_pool
from test_flowserve_correctness import PROMPTS, ids_of
from test_flowserve_engine import run, tokens

from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine, StepOutput
from dataplane.flowserve.errors import InvalidRequest
from dataplane.flowserve.kv_cache import allocate_kv_cache, bytes_per_block
from dataplane.flowserve.models import ModelConfig
from dataplane.flowserve.platform import get_platform
from dataplane.flowserve.prompt_kv import (
    KVMismatch,
    PromptKV,
    gather_kv,
    scatter_kv,
    token_slots,
)
from dataplane.flowserve.sampling_params import SamplingParams

SHORT = ["One two three", "Blue sky", "Hello", "4 5 6"]


def greedy(n: int, **options: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **options)  # type: ignore[arg-type]


def make(model_dir: Path, **options: object) -> Engine:
    return Engine(EngineConfig(str(model_dir), **{"max_num_seqs": 4, **options}))  # type: ignore[arg-type]


def pool_of(model_dir: Path, num_blocks: int, block_size: int = 4) -> int:
    return num_blocks * bytes_per_block(
        ModelConfig.from_folder(model_dir), block_size, torch.float32
    )


def assert_no_leak(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    check_pool(engine.block_manager, [])


def prefill(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[PromptKV]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, params, prefill_only=True)
    outputs = run(engine)
    exports = []
    for i, prompt in enumerate(prompts):
        (out,) = outputs[f"p{i}"]  # exactly one output: the first token, with the K/V
        assert out.finished and out.kv is not None and out.new_token_id is not None
        assert out.kv.first_token_id == out.new_token_id
        assert out.kv.num_tokens == len(prompt) and out.kv.export_s >= 0.0
        exports.append(out.kv)
    assert_no_leak(engine)
    return exports


def decode(
    engine: Engine, prompts: list[list[int]], exports: list[PromptKV], params: SamplingParams
) -> list[list[StepOutput]]:
    for i, (prompt, kv) in enumerate(zip(prompts, exports, strict=True)):
        engine.add_request(f"d{i}", prompt, params, imported=kv)
    outputs = run(engine)
    assert_no_leak(engine)
    return [outputs[f"d{i}"] for i in range(len(prompts))]


def colocated(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"c{i}", prompt, params)
    outputs = run(engine)
    assert_no_leak(engine)
    return [tokens(outputs[f"c{i}"]) for i in range(len(prompts))]


def test_gather_scatter_round_trip_across_block_sizes(tiny_model_dir: Path) -> None:
    config = ModelConfig.from_folder(tiny_model_dir)
    platform = get_platform("cpu")
    source = allocate_kv_cache(config, 6, 4, torch.float32, torch.device("cpu"))
    for k, v in source:
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
    table = [5, 0, 3]  # 11 tokens in blocks 5, 0, 3
    assert token_slots(table, 4, 0, 11)[:6] == [20, 21, 22, 23, 0, 1]
    kv = gather_kv(source, platform, token_slots(table, 4, 0, 11))
    assert kv.shape == (
        config.num_hidden_layers,
        2,
        11,
        config.num_key_value_heads,
        config.head_dim,
    )
    assert torch.equal(kv[1, 1, 9], source[1][1][3, 1])  # token 9: block 3, offset 1, V of layer 1

    target = allocate_kv_cache(config, 3, 8, torch.float32, torch.device("cpu"))
    other_table = [2, 1]
    scatter_kv(target, platform, token_slots(other_table, 8, 0, 11), kv)
    assert torch.equal(gather_kv(target, platform, token_slots(other_table, 8, 0, 11)), kv)
    assert not target[0][0][0].any()  # block 0 untouched

    with pytest.raises(ValueError):
        token_slots(table, 4, 0, 13)
    with pytest.raises(ValueError):
        PromptKV(kv[:, :1], 3)  # not [layers, 2, tokens, heads, dim]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prefill_decode_pair_equals_colocated(tiny_model_dir: Path, async_scheduling: bool) -> None:
    """Prefill: block size 4 and 8 tokens a step, so long prompts are chunked and the second
    system prompt hits the prefix cache; decode: block size 16."""
    p = make(
        tiny_model_dir, block_size=4, max_num_batched_tokens=8, async_scheduling=async_scheduling
    )
    d = make(tiny_model_dir, async_scheduling=async_scheduling)
    c = make(tiny_model_dir)
    prompts = [ids_of(c, text) for text in PROMPTS]
    assert max(len(x) for x in prompts) > 8
    params = greedy(12)
    expected = colocated(c, prompts, params)

    exports = prefill(p, prompts[:1], params)  # fills P's cache with the system prompt
    hits = p.stats().prefix_cache_hits
    exports += prefill(p, prompts[1:], params)
    assert p.stats().prefix_cache_hits > hits

    outputs = decode(d, prompts, exports, params)
    for i, outs in enumerate(outputs):
        assert tokens(outs) == expected[i], f"prompt {i}"
        assert outs[0].kv_import_s is not None and outs[0].kv_import_s >= 0.0
        assert all(o.kv_import_s is None for o in outs[1:])
        assert [o.finished for o in outs] == [False] * 11 + [True]

    # The imported prompts' full blocks serve D's prefix cache like computed ones.
    hits = d.stats().prefix_cache_hits
    assert colocated(d, prompts[:1], params) == expected[:1]
    assert d.stats().prefix_cache_hits > hits


def test_preempted_imports_recompute(tiny_model_dir: Path) -> None:
    p = make(tiny_model_dir)
    d = make(tiny_model_dir, block_size=4, kv_cache_bytes=pool_of(tiny_model_dir, 12))
    c = make(tiny_model_dir)
    prompts = [ids_of(c, text) for text in SHORT]
    params = greedy(24)
    outputs = decode(d, prompts, prefill(p, prompts, params), params)
    assert d.stats().num_preemptions > 0
    assert [tokens(outs) for outs in outputs] == colocated(c, prompts, params)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preempted_prefills_still_export(tiny_model_dir: Path, async_scheduling: bool) -> None:
    """Two decoding requests on the prefill instance outgrow its pool while prefill-only ones
    are chunked in: the latest arrived, a prefill-only one, is preempted and recomputed."""
    p = make(
        tiny_model_dir,
        block_size=4,
        max_num_batched_tokens=8,
        kv_cache_bytes=pool_of(tiny_model_dir, 20),
        async_scheduling=async_scheduling,
    )
    d, c = make(tiny_model_dir), make(tiny_model_dir)
    for i in range(2):
        p.add_request(f"busy{i}", list(range(5 + i, 15 + i)), greedy(30))
    p.step()
    p.step()
    prompts = [list(range(100, 140)), list(range(150, 190))]
    params = greedy(8)
    for i, prompt in enumerate(prompts):
        p.add_request(f"p{i}", prompt, params, prefill_only=True)
    outputs = run(p)
    assert p.stats().num_preemptions > 0
    assert_no_leak(p)
    exports = [outputs[f"p{i}"][-1].kv for i in range(2)]
    assert all(kv is not None for kv in exports)
    decoded = decode(d, prompts, exports, params)  # type: ignore[arg-type]
    assert [tokens(o) for o in decoded] == colocated(c, prompts, params)


def test_first_token_that_ends_the_request(tiny_model_dir: Path) -> None:
    """max_tokens=1 and eos as the first token end an imported request at its first output,
    as they would colocated, without taking blocks."""
    p, d, c = make(tiny_model_dir), make(tiny_model_dir), make(tiny_model_dir)
    prompt = ids_of(c, PROMPTS[2])
    (kv,) = prefill(p, [prompt], greedy(1))
    first = kv.first_token_id

    (outs,) = decode(d, [prompt], [kv], greedy(1))
    assert outs == [StepOutput("d0", first, None, True, "length")]
    assert colocated(c, [prompt], greedy(1)) == [[first]]

    d.eos_token_ids = c.eos_token_ids = frozenset({first})
    params = SamplingParams(temperature=0.0, max_tokens=10)
    (outs,) = decode(d, [prompt], [kv], params)
    assert outs == [StepOutput("d0", first, None, True, "stop")]
    assert colocated(c, [prompt], params) == [[first]]

    params = SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=(first,))
    assert decode(d, [prompt], [kv], params)[0][-1].finish_reason == "stop"


def test_seeded_sampling_continues_as_colocated(tiny_model_dir: Path) -> None:
    p, d, c = make(tiny_model_dir), make(tiny_model_dir), make(tiny_model_dir)
    prompts = [ids_of(c, text) for text in SHORT[:2]]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=16, ignore_eos=True)
    outputs = decode(d, prompts, prefill(p, prompts, params), params)
    assert [tokens(o) for o in outputs] == colocated(c, prompts, params)


def test_aborts_free_everything(tiny_model_dir: Path) -> None:
    p = make(tiny_model_dir, block_size=4, max_num_batched_tokens=8)
    d = make(tiny_model_dir, block_size=4, max_num_seqs=2)
    prompts = [ids_of(d, text) for text in PROMPTS]

    # Prefill side: abort mid-prefill (chunked) and before admission.
    for i, prompt in enumerate(prompts):
        p.add_request(f"a{i}", prompt, greedy(4), prefill_only=True)
    assert p.step() == []
    p.abort_request("a0")  # running, part of its prompt computed
    p.abort_request("a3")  # still waiting
    outputs = run(p)
    assert outputs["a0"][-1].finish_reason == "abort" and outputs["a0"][-1].kv is None
    assert outputs["a1"][-1].kv is not None
    assert_no_leak(p)
    exports = prefill(p, prompts, greedy(4))

    # Decode side: abort one running after its import, one still waiting to be admitted.
    for i, (prompt, kv) in enumerate(zip(prompts, exports, strict=True)):
        d.add_request(f"b{i}", prompt, greedy(20), imported=kv)
    first = d.step()  # b0 and b1 imported: their first tokens
    assert [o.request_id for o in first] == ["b0", "b1"]
    assert (d.num_running, d.num_waiting) == (2, 2)
    d.abort_request("b0")
    d.abort_request("b3")
    outputs = run(d)
    assert outputs["b0"] == [StepOutput("b0", None, None, True, "abort")]
    assert outputs["b3"] == [StepOutput("b3", None, None, True, "abort")]
    assert len(tokens(outputs["b2"])) == 20
    assert len(tokens(outputs["b1"])) == 19  # and its first, above
    assert_no_leak(d)


def test_imports_that_do_not_fit(tiny_model_dir: Path) -> None:
    p, d = make(tiny_model_dir), make(tiny_model_dir)
    prompt = ids_of(d, PROMPTS[2])
    (kv,) = prefill(p, [prompt], greedy(4))
    with pytest.raises(KVMismatch) as info:
        d.add_request("short", prompt[:-1], greedy(4), imported=kv)
    assert info.value.code == "kv_mismatch"
    with pytest.raises(KVMismatch):
        d.add_request("half", prompt, greedy(4), imported=PromptKV(kv.kv.half(), 1))
    with pytest.raises(KVMismatch):
        d.add_request("layers", prompt, greedy(4), imported=PromptKV(kv.kv[:1], 1))
    with pytest.raises(InvalidRequest):
        d.add_request("both", prompt, greedy(4), prefill_only=True, imported=kv)
    assert_no_leak(d)
