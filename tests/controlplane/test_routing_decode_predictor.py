from __future__ import annotations

import random

import pytest

from controlplane.routing.decode_predictor import (
    PRIOR_DECODE_TOKENS,
    DecodeLengthPredictor,
    FinishedRequest,
    PromptTokenEstimator,
    evaluate,
    prompt_bin,
)


def r(prompt: int, completion: int, max_tokens: int | None = None) -> FinishedRequest:
    return FinishedRequest(prompt, completion, max_tokens)


def test_prompt_bins_are_log2() -> None:
    assert [prompt_bin(n) for n in (0, 1, 2, 3, 4, 7, 8, 1023, 1024)] == [
        0, 1, 2, 2, 3, 3, 4, 10, 11,
    ]  # fmt: skip


def test_no_history_uses_prior() -> None:
    p = DecodeLengthPredictor.fit([])
    assert p.n_history == 0
    assert p.predict_bucket(100) is None
    assert p.predict(100) == PRIOR_DECODE_TOKENS == 256
    assert p.predict(100, max_tokens=50) == 50
    assert p.predict(100, max_tokens=1000) == 256
    assert DecodeLengthPredictor().predict(5, None) == 256


def test_majority_bucket_middle() -> None:
    history = [r(100, 300)] * 5 + [r(100, 10)] * 3  # bucket 2 wins
    p = DecodeLengthPredictor.fit(history, min_bin_samples=1)
    assert p.predict_bucket(100) == 2
    assert p.predict(100) == 2 * 128 + 64


def test_bucket_ties_go_to_shorter() -> None:
    p = DecodeLengthPredictor.fit([r(100, 300), r(100, 10)], min_bin_samples=1)
    assert p.predict(100) == 64


def test_bucket_width_is_a_parameter() -> None:
    p = DecodeLengthPredictor.fit([r(100, 70)] * 3, bucket_tokens=32, min_bin_samples=1)
    assert p.predict(100) == 2 * 32 + 16
    with pytest.raises(ValueError):
        DecodeLengthPredictor.fit([], bucket_tokens=0)


def test_thin_bin_falls_back_to_all_history() -> None:
    history = [r(1000, 900)] * 10 + [r(10, 10)] * 2  # the short-prompt bin holds only 2
    p = DecodeLengthPredictor.fit(history, min_bin_samples=3)
    assert p.predict(1000) == 7 * 128 + 64
    assert p.predict(10) == 7 * 128 + 64  # thin: the whole history's majority
    assert p.predict(50_000) == 7 * 128 + 64  # unseen bin
    p = DecodeLengthPredictor.fit(history, min_bin_samples=2)
    assert p.predict(10) == 64  # now the bin is thick enough


def test_max_tokens_caps_and_folds() -> None:
    # 4 long answers and 3 short ones; a cap of 100 tokens folds the long ones into bucket 0
    history = [r(100, 1000)] * 4 + [r(100, 200)] * 3
    p = DecodeLengthPredictor.fit(history, min_bin_samples=1)
    assert p.predict(100) == 7 * 128 + 64
    assert p.predict(100, max_tokens=100) == 64
    # a cap of 300 folds the long answers into bucket 2 (4 vs 3); its middle 320 is capped
    assert p.predict(100, max_tokens=300) == 300
    assert p.predict(100, max_tokens=0) == 0


def test_negative_counts_rejected() -> None:
    with pytest.raises(ValueError):
        DecodeLengthPredictor.fit([r(10, -1)])


def synthetic(n: int, noise: float, seed: int = 1) -> list[FinishedRequest]:
    """Output length follows the prompt's log2 bin: bin k answers about 128 * (k - 4) + 64."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = int(2 ** rng.uniform(5, 12))
        if rng.random() < noise:
            completion = rng.randrange(0, 2000)
        else:
            completion = 128 * (prompt.bit_length() - 5) + rng.randrange(10, 118)
        out.append(r(prompt, completion, 4096))
    return out


def test_evaluate_learns_prompt_dependent_lengths() -> None:
    acc = evaluate(synthetic(2000, noise=0.1))
    assert (acc.n_train, acc.n_test) == (1600, 400)
    assert acc.bucket_accuracy >= 0.85
    assert acc.mean_abs_error_tokens < 150


def test_evaluate_beats_a_global_guess() -> None:
    history = synthetic(1000, noise=0.0)
    learned = evaluate(history)
    global_only = evaluate(history, min_bin_samples=10_000)  # every bin is thin
    assert learned.bucket_accuracy > 0.95
    assert global_only.bucket_accuracy < 0.3


def test_evaluate_is_seeded() -> None:
    history = synthetic(300, noise=0.3)
    assert evaluate(history, seed=3) == evaluate(history, seed=3)


def test_evaluate_rejects_bad_split() -> None:
    with pytest.raises(ValueError):
        evaluate(synthetic(10, 0.0), train_fraction=1.0)
    with pytest.raises(ValueError, match="held-out"):
        evaluate([r(1, 1)])


def test_evaluate_with_tiny_history_scores_prior() -> None:
    acc = evaluate([r(10, 300), r(10, 300)], train_fraction=0.5)
    assert (acc.n_train, acc.n_test) == (1, 1)
    assert acc.bucket_accuracy == 1.0  # thin bin falls back to the one training request


# prompt token estimator


def test_estimator_default_and_fit() -> None:
    assert PromptTokenEstimator().estimate(400) == 100
    assert PromptTokenEstimator().estimate(0) == 0
    assert PromptTokenEstimator().estimate(1) == 1  # rounds up
    est = PromptTokenEstimator.fit([(300, 100), (300, 100), (0, 5), (10, 0)])
    assert est.chars_per_token == pytest.approx(3.0)
    assert est.estimate(30) == 10


def test_estimator_without_history_uses_default() -> None:
    assert PromptTokenEstimator.fit([]).chars_per_token == 4.0
    with pytest.raises(ValueError):
        PromptTokenEstimator(0.0)
