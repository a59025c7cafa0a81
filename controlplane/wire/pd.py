"""PD profiling (/api/v1/deployments/{name}/pd-profile): the heatmap the scheduler routes by and
the accuracy of the deployment's decode-length predictor (docs/pd.md)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from controlplane.wire.base import Open, Strict


class PDProfileCreate(Strict):
    """What to measure. Bin edges in tokens (prompt) and decode/prompt ratio; the last edge of
    each may be null for an open bin. None keeps the defaults (docs/pd.md)."""

    prompt_edges: list[float | None] | None = Field(default=None, min_length=2, max_length=16)
    ratio_edges: list[float | None] | None = Field(default=None, min_length=2, max_length=16)
    repeats: int = Field(default=2, ge=1, le=64)
    concurrency: int = Field(default=2, ge=1, le=64)
    max_total_tokens: int | None = Field(default=None, ge=2)
    seed: int = 0


class PredictorAccuracyInfo(Open):
    """The decode-length predictor on a held-out share of the deployment's own history."""

    bucket_tokens: int
    bucket_accuracy: float | None = None  # None until there is history enough to test on
    mean_abs_error_tokens: float | None = None
    n_train: int = 0
    n_test: int = 0


class PDProfileInfo(Open):
    deployment: str
    heatmap: dict[str, Any] | None = None  # PDHeatmap.to_json(); None before any profile
    num_measurements: int = 0
    created_at: float | None = None
    duration_s: float | None = None
    predictor: PredictorAccuracyInfo
