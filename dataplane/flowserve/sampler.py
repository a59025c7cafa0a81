"""Sampling: pure functions on a batch of logits, one row per sequence.

The order follows vLLM: penalties, temperature, min_p, top_k/top_p, then a draw. Each row draws
its noise from its own `torch.Generator`, so a seeded sequence samples the same tokens whatever
else is in the batch. Logprobs are those of the model's unmodified distribution (vLLM's default).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from dataplane.flowserve.platform import get_platform
from dataplane.flowserve.sampling_params import SamplingParams


class SamplingRow(Protocol):
    """What the sampler needs to know about one sequence."""

    @property
    def params(self) -> SamplingParams: ...
    @property
    def generator(self) -> torch.Generator: ...
    @property
    def prompt_token_ids(self) -> list[int]: ...
    @property
    def output_token_ids(self) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class Logprob:
    """The sampled token's logprob and the `top_logprobs` most likely tokens, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[Logprob | None]


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
    """Pick the next token of every row. `logits` is [num_seqs, vocab_size]."""
    raw = logits.float()
    token_ids: list[int] = sample_tokens(raw, rows).tolist()  # the step's one host sync
    return SampleResult(token_ids, compute_logprobs(raw, token_ids, rows))


def needs_host(rows: Iterable[SamplingRow]) -> bool:
    """Whether sampling these rows reads host state beyond the logits (penalties read every
    output token, logprobs are returned to the host), so it cannot run ahead of the host."""
    return any(row.params.has_penalties or row.params.logprobs for row in rows)


def sample_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The next token of every row, `[num_seqs]` on the logits' device, without a host sync."""
    penalties = any(row.params.has_penalties for row in rows)
    greedy = [row.params.greedy for row in rows]
    if all(greedy) and not penalties:
        return greedy_argmax(logits)  # exact in the model's dtype: no float32 copy
    processed = logits.float()
    if penalties:
        processed = apply_penalties(processed, rows)
    if all(greedy):
        next_ids = processed.argmax(dim=-1)
    else:
        temperatures = _on(
            processed.device,
            [1.0 if g else row.params.temperature for g, row in zip(greedy, rows, strict=True)],
        )
        processed = processed / temperatures.unsqueeze(1)
        min_p = [row.params.min_p for row in rows]
        if any(p > 0.0 for p in min_p):
            processed = apply_min_p(processed, _on(processed.device, min_p))
        vocab_size = processed.shape[-1]
        top_k = [min(row.params.top_k or vocab_size, vocab_size) for row in rows]
        top_p = [row.params.top_p for row in rows]
        if any(k < vocab_size for k in top_k) or any(p < 1.0 for p in top_p):
            processed = apply_top_k_top_p(
                processed,
                _on(processed.device, top_k),
                _on(processed.device, top_p),
            )
        next_ids = random_sample(processed, rows, greedy)
    return next_ids


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)`. On an accelerator, over chunks of the vocabulary in two passes:
    a plain argmax reduces a row in one program, which left an H100 27 us per step at batch 1
    (128K vocabulary); the chunked passes spread it over the device."""
    vocab = logits.shape[-1]
    chunk = _argmax_chunk(vocab)
    if logits.device.type == "cpu" or chunk is None:
        return logits.argmax(dim=-1)
    return chunked_argmax(logits, chunk)


def chunked_argmax(logits: torch.Tensor, chunk: int) -> torch.Tensor:
    """Row-wise argmax (the first index of the maximum) of `[num_rows, vocab]`, `chunk` dividing
    vocab: each chunk's max and its first index, then the first chunk holding the row's max."""
    num_rows, vocab = logits.shape
    values, index = logits.view(num_rows, vocab // chunk, chunk).max(dim=-1)  # [rows, chunks]
    best = values.argmax(dim=-1, keepdim=True)  # [rows, 1]
    return (best * chunk + index.gather(1, best)).squeeze(1)


@functools.cache
def _argmax_chunk(vocab: int) -> int | None:
    """A divisor of `vocab` near sqrt(vocab), so that both passes have enough rows."""
    target = max(64, math.isqrt(vocab))
    divisors = [d for d in range(64, 4097) if vocab % d == 0]
    return min(divisors, key=lambda d: abs(d - target)) if divisors else None


def _on(
    device: torch.device, values: Sequence[object], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`values` as a tensor on `device`, copied without waiting for the device (no host sync)."""
    return get_platform(device).to_device(torch.tensor(values, dtype=dtype))


def token_counts(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """How often each vocabulary entry occurs in each row: [num_seqs, vocab_size] int64."""
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.int64, device=device)
    for i, ids in enumerate(token_ids):
        if ids:
            index = _on(device, ids, torch.int64)
            counts[i].index_add_(0, index, torch.ones_like(index))
    return counts


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens; presence/frequency over output only."""
    vocab_size, device = logits.shape[-1], logits.device
    output_counts = token_counts([row.output_token_ids for row in rows], vocab_size, device)
    prompt_seen = token_counts([row.prompt_token_ids for row in rows], vocab_size, device) > 0
    seen = prompt_seen | (output_counts > 0)

    def column(values: list[float]) -> torch.Tensor:
        return _on(device, values, logits.dtype).unsqueeze(1)

    repetition = column([row.params.repetition_penalty for row in rows]).expand_as(logits)
    # Divide positive logits and multiply negative ones, so a seen token always gets less likely.
    scale = torch.where(logits > 0, 1.0 / repetition, repetition)
    logits = torch.where(seen, logits * scale, logits)
    frequency = column([row.params.frequency_penalty for row in rows])
    presence = column([row.params.presence_penalty for row in rows])
    logits = logits - frequency * output_counts.to(logits.dtype)
    return logits - presence * (output_counts > 0).to(logits.dtype)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one. `min_p` is [num_seqs]."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Keep each row's `top_k` best tokens, then the smallest set whose mass reaches `top_p`.
    `top_k` is [num_seqs] int (vocab_size for none), `top_p` [num_seqs] float (1.0 for none)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # [num_seqs, vocab_size]
    vocab_size = logits.shape[-1]
    kth = sorted_logits.gather(1, (vocab_size - top_k).clamp(min=0).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    outside_p = cumulative <= (1.0 - top_p).unsqueeze(1)
    outside_p[:, -1] = False  # the best token always survives
    sorted_logits = sorted_logits.masked_fill(outside_p, float("-inf"))
    return sorted_logits.scatter(-1, order, sorted_logits)


def random_sample(
    logits: torch.Tensor, rows: Sequence[SamplingRow], greedy: Sequence[bool]
) -> torch.Tensor:
    """Draw by the exponential race (argmax of p / Exp(1)), which equals sampling from p and lets
    every row use its own generator; greedy rows take the argmax and draw no noise."""
    probs = logits.softmax(dim=-1)
    noise = torch.ones_like(probs)
    for i, row in enumerate(rows):
        if not greedy[i]:
            noise[i].exponential_(generator=row.generator)
    drawn = (probs / noise).argmax(dim=-1)
    greedy_mask = _on(logits.device, greedy)
    return torch.where(greedy_mask, logits.argmax(dim=-1), drawn)


def compute_logprobs(
    raw_logits: torch.Tensor, token_ids: Sequence[int], rows: Sequence[SamplingRow]
) -> list[Logprob | None]:
    """Logprobs of the sampled tokens under the unmodified distribution, for rows that ask."""
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs]
    if not wanted:
        return [None] * len(rows)
    logprobs = raw_logits[wanted].log_softmax(dim=-1)  # [num_wanted, vocab_size]
    chosen_ids = _on(logprobs.device, [token_ids[i] for i in wanted])
    chosen = logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()
    num_top = max(rows[i].params.top_logprobs for i in wanted)
    top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (None, None)
    top_values_list = top_values.tolist() if top_values is not None else []
    top_ids_list = top_ids.tolist() if top_ids is not None else []
    result: list[Logprob | None] = [None] * len(rows)
    for j, i in enumerate(wanted):
        k = rows[i].params.top_logprobs
        top = tuple(zip(top_ids_list[j][:k], top_values_list[j][:k], strict=True)) if k else ()
        result[i] = Logprob(token_ids[i], chosen[j], top)
    return result
