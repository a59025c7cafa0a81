"""Seeded, ShareGPT-like synthetic workloads for the benchmarks (pure: no torch, no I/O).

Prompt and output lengths are lognormal, clipped to their ranges (ShareGPT's shape: most requests
short, a long tail). A share of the prompts start with one of a few shared system prompts, so that
an engine with a prefix cache has something to find. Token ids are drawn uniformly from the
vocabulary minus the ids to avoid (special tokens: bos/eos/pad), so every system sees valid,
ordinary tokens; requests run with ignore_eos, so every one produces exactly `max_tokens`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from dataclasses import dataclass

# Medians and spreads of the lognormals: a prompt median of 200 with sigma 0.7 has a mean of ~255
# before clipping; an output median of 150 with sigma 0.5 has a mean of ~170.
PROMPT_MEDIAN = 200.0
PROMPT_SIGMA = 0.7
OUTPUT_MEDIAN = 150.0
OUTPUT_SIGMA = 0.5


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One request. `shared_prefix_len` tokens at the start of the prompt are a system prompt
    other requests share (0 when the prompt is all its own)."""

    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    shared_prefix_len: int = 0


@dataclass(frozen=True, slots=True)
class WorkloadSummary:
    num_requests: int
    mean_prompt_len: float
    mean_output_len: float
    num_shared_prefix: int
    total_output_tokens: int


def make_workload(
    n: int,
    seed: int,
    vocab_size: int,
    *,
    avoid_token_ids: Collection[int] = (),
    min_prompt: int = 16,
    max_prompt: int = 1024,
    min_out: int = 16,
    max_out: int = 256,
    shared_prefix_fraction: float = 0.3,
    num_system_prompts: int = 4,
    system_prompt_len: int = 128,
) -> list[WorkItem]:
    """`n` requests; the same arguments give the same list."""
    if n < 0:
        raise ValueError("n must not be negative")
    if not 1 <= min_prompt <= max_prompt:
        raise ValueError("need 1 <= min_prompt <= max_prompt")
    if not 1 <= min_out <= max_out:
        raise ValueError("need 1 <= min_out <= max_out")
    if not 0.0 <= shared_prefix_fraction <= 1.0:
        raise ValueError("shared_prefix_fraction must be in [0, 1]")
    if shared_prefix_fraction > 0 and num_system_prompts < 1:
        raise ValueError("shared prefixes need at least one system prompt")
    if shared_prefix_fraction > 0 and not 1 <= system_prompt_len < max_prompt:
        raise ValueError("system_prompt_len must be in [1, max_prompt)")
    avoid = set(avoid_token_ids)
    pool = [t for t in range(vocab_size) if t not in avoid]
    if not pool:
        raise ValueError("no token ids are left to draw from")

    rng = random.Random(seed)

    def tokens(count: int) -> tuple[int, ...]:
        return tuple(rng.choice(pool) for _ in range(count))

    system_prompts = [tokens(system_prompt_len) for _ in range(num_system_prompts)]
    items = []
    for _ in range(n):
        prompt_len = _lognormal_int(rng, PROMPT_MEDIAN, PROMPT_SIGMA, min_prompt, max_prompt)
        max_tokens = _lognormal_int(rng, OUTPUT_MEDIAN, OUTPUT_SIGMA, min_out, max_out)
        if system_prompts and rng.random() < shared_prefix_fraction:
            prefix = rng.choice(system_prompts)
            # At least one token of its own after the system prompt, as a user turn would add.
            suffix_len = max(prompt_len, len(prefix) + 1) - len(prefix)
            items.append(WorkItem(prefix + tokens(suffix_len), max_tokens, len(prefix)))
        else:
            items.append(WorkItem(tokens(prompt_len), max_tokens))
    return items


def summarize(items: list[WorkItem]) -> WorkloadSummary:
    n = len(items)
    return WorkloadSummary(
        num_requests=n,
        mean_prompt_len=sum(len(i.prompt_token_ids) for i in items) / n if n else 0.0,
        mean_output_len=sum(i.max_tokens for i in items) / n if n else 0.0,
        num_shared_prefix=sum(1 for i in items if i.shared_prefix_len),
        total_output_tokens=sum(i.max_tokens for i in items),
    )


def spread_subset(items: list[WorkItem], k: int) -> list[WorkItem]:
    """`k` items taken evenly across the list (the whole list when k >= its length), so a subset
    keeps the mix of lengths of the whole rather than only its first requests'."""
    if k >= len(items):
        return list(items)
    if k <= 0:
        return []
    return [items[(i * len(items)) // k] for i in range(k)]


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    value = rng.lognormvariate(math.log(median), sigma)
    return min(hi, max(lo, round(value)))
