"""semi-PD inside one instance: a prefill worker and a decode worker, each its own thread, over
one copy of the weights and one block pool. Greedy output equals a colocated engine's and
Hugging Face's (concurrent requests, chunked prefill, prefix-cache hits, preemption that sends
a sequence back to the prefill worker), seeded sampling too; aborts in either worker and in
transit leave the pool exactly as it was; the split switches repeatedly under load without
losing or stalling a request; the SLO controller switches on misses and records why; PD
disaggregation's prefill-only and imported requests work through it."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from pool_checks import check_pool
from test_flowserve_correctness import PROMPTS as SYSTEM_PROMPTS
from test_flowserve_correctness import ids_of
from test_flowserve_engine import PROMPTS, hf_greedy, tokens
from transformers import PreTrainedModel

from controlplane.wire import ChatMessage, GenerateRequest
from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine, StepOutput, open_engine
from dataplane.flowserve.errors import ConfigError, DuplicateRequest, PromptTooLong
from dataplane.flowserve.kv_cache import bytes_per_block
from dataplane.flowserve.models import ModelConfig
from dataplane.flowserve.platform import ThreadPartition
from dataplane.flowserve.prompts import build_prompt
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.semipd.engine import SemiPDEngine

MakeSemiPD = Callable[..., SemiPDEngine]
MORE = PROMPTS + ["Once upon a time", "user: hi", "A B C D E F G", "The sea is"]
LENGTHS = [24, 7, 16, 3, 12, 20, 9, 14]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def pool_of(model_dir: Path, num_blocks: int, block_size: int = 4) -> int:
    return num_blocks * bytes_per_block(
        ModelConfig.from_folder(model_dir), block_size, torch.float32
    )


@pytest.fixture()
def semi_pd(tiny_model_dir: Path) -> Iterator[MakeSemiPD]:
    """`semi_pd(**options)`: a semi-PD engine on the tiny model, closed after the test."""
    engines: list[Engine] = []

    def make(**options: object) -> SemiPDEngine:
        settings: dict[str, object] = {
            "max_num_seqs": 4,
            "semi_pd": True,
            "slo_ttft_ms": 10_000.0,
            "slo_tpot_ms": 10_000.0,
            **options,
        }
        engine = open_engine(EngineConfig(str(tiny_model_dir), **settings))  # type: ignore[arg-type]
        engines.append(engine)
        assert isinstance(engine, SemiPDEngine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def drain(engine: Engine, timeout_s: float = 60.0) -> dict[str, list[StepOutput]]:
    outputs: dict[str, list[StepOutput]] = {}
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "the engine did not finish"
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def assert_pool_whole(engine: SemiPDEngine) -> None:
    """Both workers idle, every block free or cached, every ref count zero."""
    assert engine.wait_idle(10)
    assert not engine.has_unfinished()
    manager = engine.block_manager
    assert manager.num_free_blocks == engine.num_kv_blocks
    check_pool(manager, [])


def colocated(
    model_dir: Path, prompts: list[list[int]], params: list[SamplingParams]
) -> list[list[int]]:
    engine = Engine(EngineConfig(str(model_dir), max_num_seqs=4))
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    outputs = drain(engine)
    return [tokens(outputs[f"r{i}"]) for i in range(len(prompts))]


def submit(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> None:
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)


# --- correctness -----------------------------------------------------------------------------


def test_concurrent_greedy_equals_hf_and_colocated(
    semi_pd: MakeSemiPD, tiny_model_dir: Path, hf_model: PreTrainedModel
) -> None:
    # Eight requests, four slots: some wait, and join as others finish at different lengths.
    engine = semi_pd()
    prompts = [ids_of(engine, p) for p in MORE]
    params = [greedy(n) for n in LENGTHS]
    submit(engine, prompts, params)
    outputs = drain(engine)
    for i, (prompt, n) in enumerate(zip(prompts, LENGTHS, strict=True)):
        outs = outputs[f"r{i}"]
        assert tokens(outs) == hf_greedy(hf_model, prompt, n), f"request {i}"
        assert [o.finished for o in outs] == [False] * (n - 1) + [True]
        assert outs[-1].finish_reason == "length"
    assert [tokens(outputs[f"r{i}"]) for i in range(len(MORE))] == colocated(
        tiny_model_dir, prompts, params
    )
    assert_pool_whole(engine)


def test_chunked_prefill_equals_hf(semi_pd: MakeSemiPD, hf_model: PreTrainedModel) -> None:
    engine = semi_pd(max_num_batched_tokens=8, block_size=4)
    prompts = [ids_of(engine, p) for p in SYSTEM_PROMPTS]
    assert max(len(p) for p in prompts) > 8  # long prompts take several prefill steps
    submit(engine, prompts, [greedy(12)] * len(prompts))
    outputs = drain(engine)
    for i, prompt in enumerate(prompts):
        assert tokens(outputs[f"r{i}"]) == hf_greedy(hf_model, prompt, 12), f"request {i}"
    assert_pool_whole(engine)


def test_prefix_cache_hits_give_the_same_tokens(
    semi_pd: MakeSemiPD, hf_model: PreTrainedModel
) -> None:
    engine = semi_pd()
    first, second = (ids_of(engine, p) for p in SYSTEM_PROMPTS[:2])
    engine.add_request("warm", first, greedy(8))  # its blocks serve the system prompt
    drain(engine)
    hits = engine.stats().prefix_cache_hits
    engine.add_request("a", first, greedy(16))
    engine.add_request("b", second, greedy(16))
    outputs = drain(engine)
    assert engine.stats().prefix_cache_hits > hits
    assert tokens(outputs["a"]) == hf_greedy(hf_model, first, 16)
    assert tokens(outputs["b"]) == hf_greedy(hf_model, second, 16)
    assert_pool_whole(engine)


def test_preemption_sends_decodes_back_to_prefill(
    semi_pd: MakeSemiPD, tiny_model_dir: Path, hf_model: PreTrainedModel
) -> None:
    """A pool of 16 blocks of 4 tokens for four sequences of ~30 tokens: the decode worker runs
    out, preempts, and the prefill worker recomputes prompt and output so far."""
    engine = semi_pd(block_size=4, kv_cache_bytes=pool_of(tiny_model_dir, 16))
    assert engine.num_kv_blocks == 16
    prompts = [ids_of(engine, p) for p in PROMPTS]
    submit(engine, prompts, [greedy(24)] * 4)
    outputs = drain(engine)
    assert engine.stats().num_preemptions > 0
    assert engine.decode.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert tokens(outputs[f"r{i}"]) == hf_greedy(hf_model, prompt, 24), f"request {i}"
    assert_pool_whole(engine)


def test_seeded_sampling_and_logprobs_match_colocated(
    semi_pd: MakeSemiPD, tiny_model_dir: Path
) -> None:
    engine = semi_pd()
    prompts = [ids_of(engine, p) for p in PROMPTS]
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=7 + i, max_tokens=12, ignore_eos=True)
        for i in range(3)
    ] + [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=True)]
    submit(engine, prompts, params)
    outputs = drain(engine)
    assert [tokens(outputs[f"r{i}"]) for i in range(4)] == colocated(
        tiny_model_dir, prompts, params
    )
    assert all(o.logprob is not None for o in outputs["r3"])
    assert_pool_whole(engine)


# --- aborts and accounting -------------------------------------------------------------------


def wait_for(condition: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_aborts_in_each_worker_free_every_block(semi_pd: MakeSemiPD) -> None:
    """Each request is aborted as soon as it is seen where the test wants it: waiting in the
    prefill worker, mid-prefill (chunked), decoding; the pool ends whole."""
    engine = semi_pd(max_num_seqs=3, max_num_batched_tokens=8, block_size=4)
    long_prompt = [5 + i % 500 for i in range(1800)]  # ~225 prefill steps of 8 tokens
    engine.add_request("decoding", ids_of(engine, PROMPTS[0]), greedy(2000))
    engine.add_request("prefilling", long_prompt, greedy(4))
    engine.add_request("third", ids_of(engine, PROMPTS[1]), greedy(2000))
    engine.add_request("waiting", ids_of(engine, PROMPTS[2]), greedy(4))  # over max_num_seqs
    got: dict[str, list[StepOutput]] = {}
    where = {
        "waiting": lambda: engine.prefill.scheduler.waiting,
        "prefilling": lambda: engine.prefill.scheduler.running,
        "decoding": lambda: engine.decode.scheduler.running,
    }
    aborted: set[str] = set()

    def abort_where_seen() -> bool:
        for out in engine.step():
            got.setdefault(out.request_id, []).append(out)
        for request_id, queue in where.items():
            if request_id not in aborted and any(s.request_id == request_id for s in list(queue())):
                engine.abort_request(request_id)
                aborted.add(request_id)
        return len(aborted) == len(where)

    wait_for(abort_where_seen)
    engine.abort_request("decoding")  # twice, and unknown ids, are ignored
    engine.abort_request("nobody")
    engine.abort_request("third")
    for request_id, outs in drain(engine).items():
        got.setdefault(request_id, []).extend(outs)
    for request_id in ("prefilling", "waiting", "decoding", "third"):
        assert got[request_id][-1] == StepOutput(request_id, None, None, True, "abort")
        assert sum(o.finished for o in got[request_id]) == 1  # reported once, nothing after
    assert tokens(got["prefilling"]) == tokens(got["waiting"]) == []
    assert len(tokens(got["decoding"])) >= 1
    assert_pool_whole(engine)


def test_random_aborts_under_load_keep_the_pool_exact(
    semi_pd: MakeSemiPD, tiny_model_dir: Path
) -> None:
    """Aborts land wherever each request happens to be: waiting, prefilling, in transit,
    decoding, or just finished. The others still answer as colocated."""
    engine = semi_pd(
        block_size=4, max_num_batched_tokens=16, kv_cache_bytes=pool_of(tiny_model_dir, 40)
    )
    rng = random.Random(3)
    prompts = [ids_of(engine, MORE[i % len(MORE)]) + [i + 3] for i in range(24)]
    params = [greedy(rng.randint(4, 30)) for _ in prompts]
    submit(engine, prompts, params)
    to_abort = set(rng.sample(range(24), 10))
    outputs: dict[str, list[StepOutput]] = {}
    deadline = time.monotonic() + 60
    while engine.has_unfinished():
        assert time.monotonic() < deadline
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        if to_abort and rng.random() < 0.3:
            engine.abort_request(f"r{to_abort.pop()}")
    kept = [i for i in range(24) if outputs[f"r{i}"][-1].finish_reason != "abort"]
    assert len(kept) >= 14
    expected = colocated(tiny_model_dir, [prompts[i] for i in kept], [params[i] for i in kept])
    assert [tokens(outputs[f"r{i}"]) for i in kept] == expected
    for outs in outputs.values():
        assert sum(o.finished for o in outs) == 1 and outs[-1].finished
    assert_pool_whole(engine)


# --- the split ---------------------------------------------------------------------------------


def test_switching_the_split_under_load_loses_nothing(
    semi_pd: MakeSemiPD, tiny_model_dir: Path
) -> None:
    engine = semi_pd(semi_pd_units=4, semi_pd_static=True, max_num_batched_tokens=16)
    assert (engine.split.prefill_units, engine.split.decode_units) == (2, 2)
    prompts = [ids_of(engine, MORE[i % len(MORE)]) + [i + 3] for i in range(16)]
    params = [greedy(10 + i) for i in range(16)]
    submit(engine, prompts, params)
    shares = [10, 90, 30, 70, 50]
    outputs: dict[str, list[StepOutput]] = {}
    switches = 0
    deadline = time.monotonic() + 60
    while engine.has_unfinished():
        assert time.monotonic() < deadline
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        split = engine.set_split(shares[switches % len(shares)])
        switches += 1
        assert split.prefill_units + split.decode_units == 4
    assert switches >= 10
    assert [tokens(outputs[f"r{i}"]) for i in range(16)] == colocated(
        tiny_model_dir, prompts, params
    )
    assert_pool_whole(engine)
    # Both workers moved at their own boundaries, onto the last split's partitions.
    assert engine.prefill.num_switches > 0 and engine.decode.num_switches > 0
    engine.add_request("after", prompts[0], greedy(2))
    drain(engine)
    assert engine.prefill.bound is not None and engine.decode.bound is not None
    assert engine.prefill.bound.num_units == engine.split.prefill_units
    assert engine.decode.bound.num_units == engine.split.decode_units
    assert engine.report().num_switches == switches


@pytest.mark.skipif(not ThreadPartition.per_thread, reason="needs PyTorch's OpenMP backend")
def test_each_worker_runs_on_its_own_threads(semi_pd: MakeSemiPD) -> None:
    engine = semi_pd(semi_pd_units=4, semi_pd_split=25, semi_pd_static=True)
    seen: dict[str, int] = {}
    original = {w: w.scheduler.schedule for w in (engine.prefill, engine.decode)}

    def probe(worker: object, name: str) -> None:
        def schedule(**kwargs: int | None) -> object:
            seen[name] = torch.get_num_threads()  # on the worker's thread, at its step
            return original[worker](**kwargs)  # type: ignore[index]

        worker.scheduler.schedule = schedule  # type: ignore[attr-defined]

    probe(engine.prefill, "prefill")
    probe(engine.decode, "decode")
    engine.add_request("a", ids_of(engine, PROMPTS[0]), greedy(4))
    drain(engine)
    assert seen == {"prefill": 1, "decode": 3}
    assert threading.current_thread() is threading.main_thread()


def test_slo_misses_move_the_split_and_are_recorded(semi_pd: MakeSemiPD) -> None:
    """A TTFT SLO no request can meet: each window raises the prefill share, to the bound."""
    engine = semi_pd(semi_pd_units=4, slo_ttft_ms=0.001, slo_tpot_ms=10_000.0, semi_pd_window_s=0.3)
    assert engine.controller is not None
    deadline = time.monotonic() + 60
    n = 0
    while engine.split.prefill_share < 90 and time.monotonic() < deadline:
        for _ in range(30):  # enough TTFT samples for a window (min_samples 8)
            engine.add_request(f"r{n}", ids_of(engine, MORE[n % len(MORE)]), greedy(3))
            n += 1
        drain(engine)
        time.sleep(0.3)  # the window closes at the next step
    records = engine.report().records
    assert engine.split.prefill_share == 90
    assert [r["reason"] for r in records] == ["ttft_miss"] * len(records)
    shares = [50] + [r["new_share"] for r in records]
    assert shares[-1] == 90 and all(b > a for a, b in zip(shares, shares[1:], strict=False))
    assert [r["old_share"] for r in records] == shares[:-1]
    first = records[0]
    assert (first["old_share"], first["new_share"]) == (50, 60)  # no model yet: one step
    assert first["ttft_model"] is None
    assert first["window"]["ttft_p90"] > first["slo_ttft_s"] == 0.000001
    assert first["window"]["num_ttft"] >= 8 and first["window"]["prefill_share"] == 50
    assert engine.split.prefill_units == 3  # 90% of 4 threads, leaving decode one
    assert_pool_whole(engine)


def test_a_static_split_only_observes(semi_pd: MakeSemiPD) -> None:
    engine = semi_pd(slo_ttft_ms=0.001, semi_pd_static=True, semi_pd_window_s=0.05)
    for n in range(12):
        engine.add_request(f"r{n}", ids_of(engine, MORE[n % len(MORE)]), greedy(3))
    drain(engine)
    time.sleep(0.06)
    engine.add_request("last", ids_of(engine, MORE[0]), greedy(2))
    drain(engine)
    report = engine.report()
    assert (report.prefill_share, report.num_switches, report.records) == (50, 0, [])
    assert report.last_decision is not None and report.last_decision["reason"] == "static"


# --- the request interface ---------------------------------------------------------------------


def test_bad_requests_raise_on_the_callers_thread(semi_pd: MakeSemiPD) -> None:
    engine = semi_pd(max_model_len=64)
    with pytest.raises(PromptTooLong):
        engine.add_request("long", list(range(100)), greedy(4))
    engine.add_request("a", [1, 2, 3], greedy(2))
    with pytest.raises(DuplicateRequest):
        engine.add_request("a", [1, 2, 3], greedy(2))
    drain(engine)
    assert_pool_whole(engine)


def test_configurations(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError):
        EngineConfig(str(tiny_model_dir), semi_pd=True)  # no SLOs, not static
    with pytest.raises(ConfigError):
        EngineConfig(str(tiny_model_dir), semi_pd=True, semi_pd_static=True, semi_pd_split=100)
    config = EngineConfig(str(tiny_model_dir), semi_pd=True, semi_pd_static=True)
    with pytest.raises(ConfigError):
        Engine(config)  # open_engine() builds the right one
    assert type(open_engine(EngineConfig(str(tiny_model_dir), max_num_seqs=2))) is Engine


def test_prefill_only_and_imported_requests(semi_pd: MakeSemiPD, tiny_model_dir: Path) -> None:
    """PD disaggregation through semi-PD instances: one exports a prompt's K/V and first token,
    another imports them and continues, as one colocated engine would."""
    exporter = semi_pd(block_size=4, max_num_batched_tokens=8)
    importer = semi_pd()
    prompts = [ids_of(exporter, p) for p in SYSTEM_PROMPTS]
    params = greedy(10)
    for i, prompt in enumerate(prompts):
        exporter.add_request(f"p{i}", prompt, params, prefill_only=True)
    exported = drain(exporter)
    kvs = [exported[f"p{i}"][-1].kv for i in range(len(prompts))]
    assert all(kv is not None for kv in kvs)
    for i, (prompt, kv) in enumerate(zip(prompts, kvs, strict=True)):
        importer.add_request(f"d{i}", prompt, params, imported=kv)
    imported = drain(importer)
    expected = colocated(tiny_model_dir, prompts, [params] * len(prompts))
    for i in range(len(prompts)):
        outs = imported[f"d{i}"]
        assert tokens(outs) == expected[i], f"prompt {i}"
        assert outs[0].kv_import_s is not None
    assert_pool_whole(exporter)
    assert_pool_whole(importer)


@pytest.mark.slow
def test_a_real_model_answers_as_colocated(smollm2_dir: Path) -> None:
    """SmolLM2-135M: chunked prefill (64 tokens a step), concurrent requests, stops at eos."""
    options = {"max_num_seqs": 4, "max_num_batched_tokens": 64}
    colocated_engine = Engine(EngineConfig(str(smollm2_dir), **options))  # type: ignore[arg-type]
    semi = open_engine(
        EngineConfig(str(smollm2_dir), semi_pd=True, semi_pd_static=True, **options)  # type: ignore[arg-type]
    )
    assert isinstance(semi, SemiPDEngine)
    try:
        questions = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?"]
        prompts = [
            build_prompt(
                semi.tokenizer,
                GenerateRequest(request_id="q", messages=[ChatMessage(role="user", content=q)]),
                semi.vocab_size,
            ).token_ids
            for q in questions
        ] * 2
        params = SamplingParams(temperature=0.0, max_tokens=40)
        for engine in (colocated_engine, semi):
            submit(engine, prompts, [params] * len(prompts))
        expected, got = drain(colocated_engine), drain(semi)
        for i in range(len(prompts)):
            assert tokens(got[f"r{i}"]) == tokens(expected[f"r{i}"]), f"request {i}"
            assert got[f"r{i}"][-1].finish_reason == expected[f"r{i}"][-1].finish_reason
        assert_pool_whole(semi)
    finally:
        semi.close()
