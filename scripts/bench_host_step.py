"""The host's work per decode step at N running sequences, phase by phase, on any machine.

    python scripts/bench_host_step.py                 # 256 sequences, 400 timed steps
    python scripts/bench_host_step.py --seqs 64 --steps 200

An Engine on a tiny random model decodes `--seqs` requests (ignore_eos, long max_tokens) with
async scheduling, as on a GPU. The model's forward pass is replaced, here only, by the kernel
path's host work for a decode graph (the batch's inputs, padded to the graph's size and packed,
as `ModelRunner._replay` builds them before its upload) returning precomputed logits. Each step
is timed whole and by phase (median over the steps, microseconds):

    schedule   Scheduler.schedule: which tokens each sequence computes, blocks for them
    prepare    the runner's inputs: _HostBatch.of, StepInputs (block tables, slots), packing
    sample     sample_tokens on the precomputed logits (a CPU argmax; a launch on a GPU)
    advance    Scheduler.advance: the launched chunks count as computed
    land       Engine._finish_in_flight: the sampled tokens recorded, outputs built
    other      the rest of Engine.step (the in-flight record, bookkeeping)
    step       the whole Engine.step
    sum        the phases' medians added up: steadier than step's on a shared machine

The model's max_model_len is raised to 4096 (the tiny preset says 2048) so that the decode
graph's block table has the width a Llama-1B run on the GPU has (256 columns of 16 tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataplane.flowserve import engine as engine_module
from dataplane.flowserve import model_runner, sampler
from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.modelstore import create_random

PHASES = ("schedule", "prepare", "sample", "advance", "land")
MAX_MODEL_LEN = 4096


class _Clock:
    """Seconds spent in each phase during the current step."""

    def __init__(self) -> None:
        self.spent = dict.fromkeys(PHASES, 0.0)

    def timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        spent = self.spent

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - start

        return wrapper

    def reset(self) -> None:
        for phase in PHASES:
            self.spent[phase] = 0.0


def _fake_forward(engine: Engine, clock: _Clock) -> None:
    """Keep the kernel path's host work for a decode graph, drop the model (see the docstring)."""
    runner = engine._runner
    logits = torch.randn(engine.config.max_num_seqs, engine.vocab_size)
    width = -(-engine.max_model_len // engine.config.block_size)
    sizes = model_runner.graph_batch_sizes(engine.config.max_num_seqs)

    def run(batch: Any, pending: Any = None) -> torch.Tensor:
        host = model_runner._HostBatch.of(batch, pending)
        num_seqs = len(host.query_lens)
        size = next((s for s in sizes if s >= num_seqs), num_seqs)
        inputs = runner._pad_decode(host, size, width)
        fill = np.asarray(host.fill_rows + host.fill_from, dtype=np.int64)
        runner._staging.upload(np.concatenate([inputs.packed, fill]))
        return logits[: len(batch.sampling_seqs)]

    runner.run = clock.timed("prepare", run)  # type: ignore[method-assign]
    scheduler = engine._scheduler
    scheduler.schedule = clock.timed("schedule", scheduler.schedule)  # type: ignore[method-assign]
    scheduler.advance = clock.timed("advance", scheduler.advance)  # type: ignore[method-assign]
    engine._finish_in_flight = clock.timed(  # type: ignore[method-assign]
        "land", engine._finish_in_flight
    )
    # The engine calls the sampler by its module-level name.
    engine_module.sample_tokens = clock.timed("sample", sampler.sample_tokens)  # type: ignore[attr-defined]


def _write_model(path: Path) -> Path:
    create_random(path, "tiny", seed=0)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = MAX_MODEL_LEN
    config_path.write_text(json.dumps(config))
    return path


def measure(model: Path, num_seqs: int, steps: int) -> dict[str, float]:
    """Median microseconds per decode step, by phase and whole ("step")."""
    torch.set_num_threads(1)  # the host's own work, not a thread pool's contention
    block_size = 16
    engine = Engine(
        EngineConfig(
            str(model),
            device="cpu",
            max_num_seqs=num_seqs,
            max_num_batched_tokens=max(4096, num_seqs),
            max_model_len=MAX_MODEL_LEN,
            block_size=block_size,
            kv_cache_bytes=256 << 20,
            async_scheduling=True,
            seed=0,
        )
    )
    clock = _Clock()
    _fake_forward(engine, clock)
    params = SamplingParams(max_tokens=MAX_MODEL_LEN, temperature=0.0, ignore_eos=True)
    for i in range(num_seqs):
        # Lengths spread over a block, so that each step a few sequences start a new block.
        prompt = [1 + (i * 7 + j) % 50 for j in range(48 + i % block_size)]
        engine.add_request(f"r{i}", prompt, params)
    scheduler = engine._scheduler
    while scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in scheduler.running):
        engine.step()
    for _ in range(10):
        engine.step()
    samples: dict[str, list[float]] = {phase: [] for phase in (*PHASES, "other", "step")}
    for _ in range(steps):
        clock.reset()
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
        for phase in PHASES:
            samples[phase].append(clock.spent[phase])
        samples["other"].append(wall - sum(clock.spent.values()))
        samples["step"].append(wall)
    if len(scheduler.running) != num_seqs:
        raise RuntimeError(f"{len(scheduler.running)} sequences running, not {num_seqs}")
    return {phase: statistics.median(values) * 1e6 for phase, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--json", type=Path, default=None, help="also write the medians here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = _write_model(Path(tmp) / "tiny")
        result = measure(model, args.seqs, args.steps)
    print(f"host work per decode step at {args.seqs} sequences, median of {args.steps} steps:")
    for phase, us in result.items():
        print(f"  {phase:<9}{us:9.1f} us")
    # The machine may be shared: a step that another process interrupts is long in one of its
    # phases, so the phases' medians add up to a steadier figure than the steps' median.
    print(f"  {'sum':<9}{sum(result[p] for p in (*PHASES, 'other')):9.1f} us (of the medians)")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
