"""What each system of `bench_engine.py` runs, and the per-request timings it records.

Hugging Face `generate` (one request at a time, or left-padded static batches) and the FlowServe
Engine in this process (every request added at t0). Times are `time.perf_counter()` seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer
from workload import WorkItem

from dataplane.flowserve.engine import Engine
from dataplane.flowserve.sampling_params import SamplingParams


class BenchError(Exception):
    pass


@dataclass(slots=True)
class Trace:
    """One request: when it arrived and when each of its output tokens came (perf_counter s)."""

    arrival: float
    token_times: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Run:
    system: str
    traces: list[Trace]
    wall_s: float
    prefix_hit_rate: float | None = None
    failures: int = 0

    def summary(self) -> dict[str, Any]:
        done = [t for t in self.traces if t.token_times]
        ttft = [t.token_times[0] - t.arrival for t in done]
        e2e = [t.token_times[-1] - t.arrival for t in done]
        itl = [b - a for t in done for a, b in zip(t.token_times, t.token_times[1:], strict=False)]
        output_tokens = sum(len(t.token_times) for t in self.traces)
        return {
            "system": self.system,
            "num_requests": len(self.traces),
            "failures": self.failures,
            "output_tokens": output_tokens,
            "wall_s": self.wall_s,
            "output_tok_s": output_tokens / self.wall_s if self.wall_s > 0 else 0.0,
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p90_s": percentile(ttft, 90),
            "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50),
            "itl_p90_s": percentile(itl, 90),
            "itl_p99_s": percentile(itl, 99),
            "e2e_p50_s": percentile(e2e, 50),
            "e2e_p90_s": percentile(e2e, 90),
            "e2e_p99_s": percentile(e2e, 99),
            "prefix_hit_rate": self.prefix_hit_rate,
        }


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# ------------------------------------------------------------------------------------------------
# Hugging Face generate
# ------------------------------------------------------------------------------------------------


class TokenClock(BaseStreamer):
    """Timestamps each decoding step; `generate` first puts the prompt, which is skipped."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def hf_generate(model: Any, batch: list[WorkItem], pad_id: int) -> TokenClock:
    """One `generate` call on a left-padded batch, until its longest request is done."""
    width = max(len(i.prompt_token_ids) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.prompt_token_ids)
        ids[row, width - n :] = torch.tensor(item.prompt_token_ids)
        mask[row, width - n :] = 1
    new_tokens = max(i.max_tokens for i in batch)
    clock = TokenClock()
    model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # the eos is masked until then: the same work as ignore_eos
        do_sample=False,
        pad_token_id=pad_id,
        streamer=clock,
    )
    if len(clock.times) != new_tokens:
        raise BenchError(f"generate produced {len(clock.times)} steps, not {new_tokens}")
    return clock


def run_hf_sequential(model: Any, items: list[WorkItem], pad_id: int) -> Run:
    traces = []
    start = time.perf_counter()
    for item in items:
        arrival = time.perf_counter()
        traces.append(Trace(arrival, hf_generate(model, [item], pad_id).times))
    return Run("hf-seq", traces, time.perf_counter() - start)


def run_hf_static(model: Any, items: list[WorkItem], batch_size: int, pad_id: int) -> Run:
    traces: list[Trace] = []
    t0 = time.perf_counter()
    for first in range(0, len(items), batch_size):
        batch = items[first : first + batch_size]
        clock = hf_generate(model, batch, pad_id)
        traces.extend(Trace(t0, clock.times[: item.max_tokens]) for item in batch)
    return Run(f"hf-static-{batch_size}", traces, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# FlowServe offline
# ------------------------------------------------------------------------------------------------


def engine_prefix_counts(engine: Engine) -> tuple[float, float] | None:
    """(hits, queries) if the engine exposes prefix-cache counters: `engine.stats()` first, then
    a `block_manager` or `metrics` attribute; None when it has none (older engines)."""
    stats = getattr(engine, "stats", None)
    holders = [
        stats() if callable(stats) else None,
        getattr(engine, "block_manager", None),
        getattr(engine, "metrics", None),
    ]
    for holder in holders:
        hits = getattr(holder, "prefix_cache_hits", None)
        queries = getattr(holder, "prefix_cache_queries", None)
        if isinstance(hits, int | float) and isinstance(queries, int | float):
            return float(hits), float(queries)
    return None


def hit_rate(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    if before is None or after is None or after[1] - before[1] <= 0:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def run_offline(engine: Engine, items: list[WorkItem]) -> Run:
    drain(engine, {"warmup": warmup_prompt(items)})
    before = engine_prefix_counts(engine)
    t0 = time.perf_counter()
    traces = {f"r{i}": Trace(t0) for i in range(len(items))}
    drain(engine, {f"r{i}": item for i, item in enumerate(items)}, traces)
    wall = time.perf_counter() - t0
    return Run(
        "flowserve-offline",
        list(traces.values()),
        wall,
        hit_rate(before, engine_prefix_counts(engine)),
    )


def drain(
    engine: Engine, requests: dict[str, WorkItem], traces: dict[str, Trace] | None = None
) -> None:
    for request_id, item in requests.items():
        params = SamplingParams(max_tokens=item.max_tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(request_id, list(item.prompt_token_ids), params)
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if traces is not None and out.new_token_id is not None:
                traces[out.request_id].token_times.append(now)


def warmup_prompt(items: list[WorkItem]) -> WorkItem:
    """A short request that shares no prefix with the workload (a run of one token)."""
    token = items[0].prompt_token_ids[-1]
    return WorkItem((token,) * 16, 4)


def run_closed_loop(engine: Engine, items: list[WorkItem], concurrency: int) -> Run:
    """`concurrency` requests in flight in this process: each finished one is replaced by the
    next at once (a closed loop, like flowserve-server@C without the HTTP hop). A request arrives
    when it is added; its tokens are stamped when `step()` returns them."""
    drain(engine, {"warmup": warmup_prompt(items)})
    before = engine_prefix_counts(engine)
    traces: dict[str, Trace] = {}
    pending = iter(enumerate(items))
    in_flight = 0

    def admit() -> None:
        nonlocal in_flight
        for i, item in pending:
            params = SamplingParams(max_tokens=item.max_tokens, temperature=0.0, ignore_eos=True)
            engine.add_request(f"c{i}", list(item.prompt_token_ids), params)
            traces[f"c{i}"] = Trace(time.perf_counter())
            in_flight += 1
            if in_flight >= concurrency:
                return

    t0 = time.perf_counter()
    admit()
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.new_token_id is not None:
                traces[out.request_id].token_times.append(now)
            if out.finished:
                in_flight -= 1
        admit()
    wall = time.perf_counter() - t0
    return Run(
        f"flowserve@{concurrency}",
        list(traces.values()),
        wall,
        hit_rate(before, engine_prefix_counts(engine)),
    )
