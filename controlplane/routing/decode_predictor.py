"""Decode-length prediction from a deployment's own finished requests.

DeepServe predicts which 128-token bucket a request's output will fall in and feeds it to the
PD-aware heatmap. Here the predictor is a frequency table learned from history rather than a
small LLM classifier: requests are grouped by prompt length in log2 bins (``[1, 2)``, ``[2, 4)``,
..., ``[2^k, 2^k+1)``), and a request's prediction is the most frequent output bucket of its bin,
or of the whole history when its bin holds fewer than ``min_bin_samples`` requests.

``max_tokens`` caps the output: history buckets past the request's cap are counted as the cap's
bucket (those requests would have been cut there), and the returned length never exceeds it.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_BUCKET_TOKENS = 128
DEFAULT_MIN_BIN_SAMPLES = 8
PRIOR_DECODE_TOKENS = 256  # with no history: min(max_tokens, 256), a typical chat reply
DEFAULT_CHARS_PER_TOKEN = 4.0  # English text under BPE tokenizers


@dataclass(slots=True, frozen=True)
class FinishedRequest:
    prompt_tokens: int
    completion_tokens: int
    max_tokens: int | None = None


def prompt_bin(prompt_tokens: int) -> int:
    """Log2 bin of a prompt length: 0 for 0 tokens, k+1 for ``[2^k, 2^(k+1))``."""
    return max(prompt_tokens, 0).bit_length()


@dataclass(slots=True, frozen=True)
class DecodeLengthPredictor:
    bucket_tokens: int = DEFAULT_BUCKET_TOKENS
    min_bin_samples: int = DEFAULT_MIN_BIN_SAMPLES
    by_bin: Mapping[int, Mapping[int, int]] = field(default_factory=dict)  # bin -> bucket -> n
    overall: Mapping[int, int] = field(default_factory=dict)  # bucket -> n

    def __post_init__(self) -> None:
        if self.bucket_tokens < 1:
            raise ValueError(f"bucket_tokens must be >= 1, got {self.bucket_tokens}")
        if self.min_bin_samples < 1:
            raise ValueError(f"min_bin_samples must be >= 1, got {self.min_bin_samples}")

    @classmethod
    def fit(
        cls,
        history: Iterable[FinishedRequest],
        *,
        bucket_tokens: int = DEFAULT_BUCKET_TOKENS,
        min_bin_samples: int = DEFAULT_MIN_BIN_SAMPLES,
    ) -> DecodeLengthPredictor:
        if bucket_tokens < 1:
            raise ValueError(f"bucket_tokens must be >= 1, got {bucket_tokens}")
        by_bin: dict[int, Counter[int]] = {}
        overall: Counter[int] = Counter()
        for r in history:
            if r.completion_tokens < 0 or r.prompt_tokens < 0:
                raise ValueError(f"token counts must be non-negative: {r}")
            bucket = r.completion_tokens // bucket_tokens
            by_bin.setdefault(prompt_bin(r.prompt_tokens), Counter())[bucket] += 1
            overall[bucket] += 1
        return cls(
            bucket_tokens,
            min_bin_samples,
            {b: dict(c) for b, c in by_bin.items()},
            dict(overall),
        )

    @property
    def n_history(self) -> int:
        return sum(self.overall.values())

    def bucket_of(self, tokens: int) -> int:
        return max(tokens, 0) // self.bucket_tokens

    def predict_bucket(self, prompt_tokens: int, max_tokens: int | None = None) -> int | None:
        """The majority output bucket for this prompt length; None with no history."""
        counts = self.by_bin.get(prompt_bin(prompt_tokens), {})
        if sum(counts.values()) < self.min_bin_samples:
            counts = self.overall
        if not counts:
            return None
        if max_tokens is not None:
            cap = self.bucket_of(max_tokens)
            folded: Counter[int] = Counter()
            for bucket, n in counts.items():
                folded[min(bucket, cap)] += n
            counts = folded
        return min(counts, key=lambda b: (-counts[b], b))  # ties: the shorter bucket

    def predict(self, prompt_tokens: int, max_tokens: int | None = None) -> int:
        """Predicted output tokens: the middle of the predicted bucket, capped by max_tokens."""
        bucket = self.predict_bucket(prompt_tokens, max_tokens)
        if bucket is None:
            guess = PRIOR_DECODE_TOKENS
        else:
            guess = bucket * self.bucket_tokens + self.bucket_tokens // 2
        return guess if max_tokens is None else max(min(guess, max_tokens), 0)


@dataclass(slots=True, frozen=True)
class PredictorAccuracy:
    bucket_accuracy: float  # share of held-out requests whose bucket was predicted exactly
    mean_abs_error_tokens: float
    n_train: int
    n_test: int


def evaluate(
    history: Sequence[FinishedRequest],
    train_fraction: float = 0.8,
    seed: int = 0,
    *,
    bucket_tokens: int = DEFAULT_BUCKET_TOKENS,
    min_bin_samples: int = DEFAULT_MIN_BIN_SAMPLES,
) -> PredictorAccuracy:
    """Fit on a seeded random ``train_fraction`` of the history and score the rest."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    shuffled = list(history)
    random.Random(seed).shuffle(shuffled)
    n_train = round(len(shuffled) * train_fraction)
    train, test = shuffled[:n_train], shuffled[n_train:]
    if not test:
        raise ValueError(f"no held-out requests: {len(shuffled)} in history")
    predictor = DecodeLengthPredictor.fit(
        train, bucket_tokens=bucket_tokens, min_bin_samples=min_bin_samples
    )
    hits = 0
    abs_error = 0
    for r in test:
        predicted = predictor.predict(r.prompt_tokens, r.max_tokens)
        hits += predictor.bucket_of(predicted) == predictor.bucket_of(r.completion_tokens)
        abs_error += abs(predicted - r.completion_tokens)
    return PredictorAccuracy(hits / len(test), abs_error / len(test), len(train), len(test))


@dataclass(slots=True, frozen=True)
class PromptTokenEstimator:
    """Prompt tokens from prompt characters, at a ratio learned from the deployment's history."""

    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN

    def __post_init__(self) -> None:
        if not self.chars_per_token > 0:
            raise ValueError(f"chars_per_token must be positive, got {self.chars_per_token}")

    @classmethod
    def fit(cls, pairs: Iterable[tuple[int, int]]) -> PromptTokenEstimator:
        """From (prompt_chars, prompt_tokens) pairs; pairs without tokens or chars are skipped."""
        chars = tokens = 0
        for c, t in pairs:
            if c > 0 and t > 0:
                chars += c
                tokens += t
        return cls(chars / tokens) if tokens else cls()

    def estimate(self, chars: int) -> int:
        return math.ceil(max(chars, 0) / self.chars_per_token)
