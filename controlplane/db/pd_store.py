"""SQL for PD scheduling: stored PD heatmaps and the request history the decode-length
predictor and the prompt-token estimator learn from (docs/pd.md)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane.db import tables as t
from controlplane.states import RequestState

HISTORY_LIMIT = 2000  # the most recent finished requests a policy learns from


def save_profile(
    session: Session,
    deployment: str,
    heatmap: dict[str, Any],
    *,
    num_measurements: int,
    duration_s: float,
    at: float,
) -> t.PDProfile:
    row = t.PDProfile(
        deployment=deployment,
        heatmap=heatmap,
        num_measurements=num_measurements,
        duration_s=duration_s,
        created_at=at,
    )
    session.add(row)
    session.flush()
    return row


def latest_profile(session: Session, deployment: str) -> t.PDProfile | None:
    return session.scalars(
        select(t.PDProfile)
        .where(t.PDProfile.deployment == deployment)
        .order_by(t.PDProfile.created_at.desc(), t.PDProfile.id.desc())
        .limit(1)
    ).first()


def request_history(
    session: Session, deployment: str, limit: int = HISTORY_LIMIT
) -> list[tuple[int | None, int, int]]:
    """(prompt_chars, prompt_tokens, completion_tokens) of the deployment's latest succeeded
    requests, newest first."""
    rows = session.execute(
        select(t.Request.prompt_chars, t.Request.prompt_tokens, t.Request.completion_tokens)
        .where(
            t.Request.deployment == deployment,
            t.Request.state == RequestState.SUCCEEDED.value,
            t.Request.prompt_tokens.is_not(None),
            t.Request.completion_tokens.is_not(None),
        )
        .order_by(t.Request.created_at.desc())
        .limit(limit)
    ).all()
    return [
        (chars, prompt, completion)
        for chars, prompt, completion in rows
        if prompt is not None and completion is not None
    ]
