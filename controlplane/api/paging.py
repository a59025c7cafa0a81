"""Query parameters of OpenAI's cursor-paged lists: `after` and `limit`."""

from __future__ import annotations

from starlette.requests import Request

from controlplane.errors import InvalidRequest


def limit_of(request: Request, *, default: int, maximum: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise InvalidRequest(
            f"Invalid value for 'limit': expected an integer in 1..{maximum}", param="limit"
        )
    return int(raw)


def after_of(request: Request) -> str | None:
    return request.query_params.get("after") or None
