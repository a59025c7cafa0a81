"""semi-PD on a CUDA device (run on the GPU machine: `pytest -m gpu`): each worker's kernels and
decode graphs run on its green context's stream; greedy output equals a colocated engine's with
graphs on, while the split is switched under load."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from test_flowserve_correctness import PROMPTS, ids_of
from test_flowserve_engine import tokens

from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine, StepOutput, open_engine
from dataplane.flowserve.platform import GreenPartition
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.semipd.engine import SemiPDEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def drain(engine: Engine, switch: SemiPDEngine | None = None) -> dict[str, list[StepOutput]]:
    outputs: dict[str, list[StepOutput]] = {}
    shares = [20, 80, 50]
    deadline = time.monotonic() + 120
    n = 0
    while engine.has_unfinished():
        assert time.monotonic() < deadline
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        if switch is not None:
            switch.set_split(shares[n % len(shares)])
            n += 1
    return outputs


def test_semi_pd_on_green_contexts_equals_colocated(tiny_model_dir: Path) -> None:
    options = {"device": "cuda", "dtype": "float32", "max_num_seqs": 8}
    colocated = Engine(EngineConfig(str(tiny_model_dir), **options))  # type: ignore[arg-type]
    semi = open_engine(
        EngineConfig(str(tiny_model_dir), semi_pd=True, semi_pd_static=True, **options)  # type: ignore[arg-type]
    )
    assert isinstance(semi, SemiPDEngine)
    try:
        # The decode worker replays the decode graphs; the prefill worker never decodes.
        assert semi.decode.runner._graphs and not semi.prefill.runner._graphs
        prompts = [ids_of(colocated, p) for p in PROMPTS] * 3
        params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
        for engine in (colocated, semi):
            for i, prompt in enumerate(prompts):
                engine.add_request(f"r{i}", prompt + [i], params)
        expected = drain(colocated)
        got = drain(semi, switch=semi)
        for i in range(len(prompts)):
            assert tokens(got[f"r{i}"]) == tokens(expected[f"r{i}"]), f"request {i}"
        assert semi.wait_idle(10)
        assert semi.block_manager.num_free_blocks == semi.num_kv_blocks
        grain = semi.platform.partition_granularity
        for worker in (semi.prefill, semi.decode):
            assert isinstance(worker.bound, GreenPartition)
            assert worker.bound.num_units % grain == 0
            assert worker.num_switches > 0
    finally:
        semi.close()
