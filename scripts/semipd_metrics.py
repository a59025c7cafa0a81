"""What `bench_semipd.py` computes from its traces (pure: no torch, no threads).

A request attains its SLOs when its TTFT (first token - arrival) and its TPOT (mean gap between
its later tokens) are both within them; a rate point's attainment is the share of its requests
that do. The rate a system sustains at an attainment level is read off its attainment-vs-rate
curve by linear interpolation between the last rate that met the level and the first that did
not (the paper's "request rate at 90% attainment").
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from semipd_systems import Trace


def poisson_arrivals(rate: float, n: int, seed: int) -> list[float]:
    """Offsets (s) from the start of `n` arrivals of a Poisson process of `rate` per second."""
    if rate <= 0:
        raise ValueError("the request rate must be positive")
    rng = random.Random(seed)
    t = 0.0
    times = []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def ttft(trace: Trace) -> float | None:
    return trace.token_times[0] - trace.arrival if trace.token_times else None


def tpot(trace: Trace) -> float | None:
    """Mean inter-token time after the first token (None for a one-token answer)."""
    times = trace.token_times
    if len(times) < 2:
        return None
    return (times[-1] - times[0]) / (len(times) - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def attains(trace: Trace, slo_ttft_s: float, slo_tpot_s: float) -> bool:
    """Within both SLOs; an unfinished request never is."""
    first, gap = ttft(trace), tpot(trace)
    if first is None or not trace.done:
        return False
    return first <= slo_ttft_s and (gap is None or gap <= slo_tpot_s)


@dataclass(frozen=True, slots=True)
class RatePoint:
    rate: float
    num_requests: int
    num_finished: int
    attainment: float
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    tpot_p90_s: float | None
    tpot_p99_s: float | None
    e2e_mean_s: float | None
    output_tok_s: float


def rate_point(
    rate: float, traces: Sequence[Trace], slo_ttft_s: float, slo_tpot_s: float, wall_s: float
) -> RatePoint:
    firsts = [v for v in map(ttft, traces) if v is not None]
    gaps = [v for v in map(tpot, traces) if v is not None]
    e2e = [t.token_times[-1] - t.arrival for t in traces if t.done and t.token_times]
    tokens = sum(len(t.token_times) for t in traces)
    return RatePoint(
        rate=rate,
        num_requests=len(traces),
        num_finished=sum(1 for t in traces if t.done),
        attainment=(
            sum(attains(t, slo_ttft_s, slo_tpot_s) for t in traces) / len(traces) if traces else 0.0
        ),
        ttft_p90_s=percentile(firsts, 90),
        ttft_p99_s=percentile(firsts, 99),
        tpot_p90_s=percentile(gaps, 90),
        tpot_p99_s=percentile(gaps, 99),
        e2e_mean_s=sum(e2e) / len(e2e) if e2e else None,
        output_tok_s=tokens / wall_s if wall_s > 0 else 0.0,
    )


def sustained_rate(points: Sequence[tuple[float, float]], level: float = 0.9) -> float | None:
    """The highest request rate at which attainment stays at `level`, from (rate, attainment)
    points: interpolated between the last rate at or above the level (counting up from the
    lowest) and the first below it; the highest rate if none falls below; None if the lowest
    already does."""
    ordered = sorted(points)
    if not ordered or ordered[0][1] < level:
        return None
    for (r0, a0), (r1, a1) in zip(ordered, ordered[1:], strict=False):
        if a1 < level:
            return r0 + (r1 - r0) * (a0 - level) / (a0 - a1)
    return ordered[-1][0]
