"""OpenAI's cursor pages over the store's tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pydantic import BaseModel
from sqlalchemy import and_, or_

from controlplane import wire


class Timed(Protocol):
    id: Any
    created_at: Any


def page(items: Sequence[BaseModel], limit: int, id_of: Callable[[Any], str]) -> wire.Page:
    """`items` were read with `limit + 1` rows: one more than fits says that more follow."""
    shown = list(items[:limit])
    return wire.Page(
        data=[i.model_dump(mode="json") for i in shown],
        has_more=len(items) > limit,
        first_id=id_of(shown[0]) if shown else None,
        last_id=id_of(shown[-1]) if shown else None,
    )


def after(table: Any, cursor: Timed, descending: bool) -> Any:
    """Rows after `cursor` in (created_at, id) order: ids break ties between equal times."""
    at, rid = cursor.created_at, cursor.id
    if descending:
        return or_(table.created_at < at, and_(table.created_at == at, table.id < rid))
    return or_(table.created_at > at, and_(table.created_at == at, table.id > rid))
