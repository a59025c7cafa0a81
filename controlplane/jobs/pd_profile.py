"""`deepflow profile pd NAME`: measure a PD deployment's JCT colocated and disaggregated over the
heatmap's cells and build the heatmap the scheduler routes by (docs/pd.md, "Profiling").

Each cell is probed at its midpoint shape (`pd_heatmap.probe_points`): `repeats` requests of
that many prompt tokens (random ids, seeded, so no two share a cached prefix) generating exactly
that many tokens (greedy, EOS ignored), sent `concurrency` at a time, once forced colocated and
once forced disaggregated, through the same executor as live traffic.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from controlplane import wire
from controlplane.jobs.chat import ChatExecutor
from controlplane.jobs.chat_run import ChatSpec, new_id
from controlplane.routing.pd_heatmap import (
    DEFAULT_PROMPT_EDGES,
    DEFAULT_RATIO_EDGES,
    Mode,
    PDHeatmap,
    PDMeasurement,
    build,
    probe_points,
)
from controlplane.states import RequestKind

MODES: tuple[Mode, ...] = ("colocated", "disaggregated")
# Token ids every vocabulary we serve has (the smallest random preset has 512).
TOKEN_IDS = range(10, 500)

Progress = Callable[[int, int], None]


@dataclass(slots=True, frozen=True)
class ProfileSettings:
    prompt_edges: tuple[float, ...] = DEFAULT_PROMPT_EDGES
    ratio_edges: tuple[float, ...] = DEFAULT_RATIO_EDGES
    repeats: int = 2
    concurrency: int = 2
    max_total_tokens: int | None = None  # probes longer than this (prompt + decode) are skipped
    seed: int = 0


async def profile_pd(
    executor: ChatExecutor,
    deployment: str,
    settings: ProfileSettings,
    progress: Progress | None = None,
) -> tuple[PDHeatmap, list[PDMeasurement]]:
    probes = probe_points(
        settings.prompt_edges, settings.ratio_edges, max_total_tokens=settings.max_total_tokens
    )
    rng = random.Random(settings.seed)
    measurements: list[PDMeasurement] = []
    total, done = len(probes) * len(MODES), 0
    for probe in probes:
        for mode in MODES:
            prompts = [
                [rng.choice(TOKEN_IDS) for _ in range(probe.prompt_tokens)]
                for _ in range(settings.repeats)
            ]
            jcts, rps = await _run_batch(
                executor, deployment, mode, prompts, probe.decode_tokens, settings.concurrency
            )
            measurements += [
                PDMeasurement(probe.prompt_tokens, probe.decode_tokens, mode, jct, rps)
                for jct in jcts
            ]
            done += 1
            if progress is not None:
                progress(done, total)
    heatmap = build(
        measurements, prompt_edges=settings.prompt_edges, ratio_edges=settings.ratio_edges
    )
    return heatmap, measurements


async def _run_batch(
    executor: ChatExecutor,
    deployment: str,
    mode: Mode,
    prompts: list[list[int]],
    decode_tokens: int,
    concurrency: int,
) -> tuple[list[float], float]:
    """The JCTs of the batch's requests, and its load level for the heatmap's per-RPS maps: the
    offered concurrency, the same for both modes and every cell of one profile."""
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: list[int]) -> float:
        async with gate:
            generate = wire.GenerateRequest(
                request_id=new_id("prof"),
                prompt_token_ids=prompt,
                sampling=wire.SamplingSpec(
                    max_tokens=decode_tokens, temperature=0.0, ignore_eos=True
                ),
            )
            started = time.perf_counter()
            run = await executor.start(
                ChatSpec(deployment, RequestKind.COMPLETION, generate, pd_mode=mode)
            )
            try:
                async for _ in run.events():
                    pass
            finally:
                await run.close()
            return time.perf_counter() - started

    jcts = await asyncio.gather(*(one(p) for p in prompts))
    return list(jcts), float(concurrency)
