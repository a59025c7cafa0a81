"""The PD profile API's report of the decode-length predictor: numbers once the deployment has
history enough to hold some out, and only the count before."""

from __future__ import annotations

from controlplane.api.pd import MIN_HISTORY, predictor_accuracy


def test_the_predictor_is_scored_once_there_is_history_enough() -> None:
    short: list[tuple[int | None, int, int]] = [(40, 10, 8)] * (MIN_HISTORY - 1)
    early = predictor_accuracy(short)
    assert (early.bucket_accuracy, early.mean_abs_error_tokens, early.n_train) == (
        None,
        None,
        MIN_HISTORY - 1,
    )
    # Ten 8-token answers and ten 300-token ones, to prompts of different lengths.
    history = short[:1] * 10 + [(4000, 1000, 300)] * 10
    scored = predictor_accuracy(history)
    assert (scored.bucket_tokens, scored.n_train, scored.n_test) == (128, 16, 4)
    assert scored.bucket_accuracy == 1.0  # each prompt length has one answer length
    # Predictions are bucket middles: 64 for an 8-token answer, 320 for a 300-token one.
    assert scored.mean_abs_error_tokens is not None
    assert 20.0 <= scored.mean_abs_error_tokens <= 56.0
