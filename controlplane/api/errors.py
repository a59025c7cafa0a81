"""The API edge: every error becomes an OpenAI-shaped body with the right status code."""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from controlplane import wire
from controlplane.errors import DeepFlowError, InvalidRequest
from controlplane.states import IllegalTransition

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = wire.ErrorBody(
        error=wire.ErrorDetail(message=message, type=type_, param=param, code=code)
    )
    return JSONResponse(body.model_dump(), status_code=status)


def from_exception(exc: DeepFlowError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)


def from_validation(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ())]
    param = ".".join(loc) if loc else None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        text = first.get("msg", "invalid value").removeprefix("Value error, ")
        message = f"Invalid value for '{param}': {text}" if param else text
    return InvalidRequest(message, param=param, code="invalid_value" if param else None)


async def parse_body(request: Request, model: type[M], max_bytes: int) -> M:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidRequest(f"request body larger than {max_bytes} bytes", code="body_too_large")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise InvalidRequest(
                f"request body larger than {max_bytes} bytes", code="body_too_large"
            )
    try:
        data: Any = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from exc
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from exc


async def handle_deepflow_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DeepFlowError)
    return from_exception(exc)


async def handle_http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), type_)


async def handle_illegal(_request: Request, exc: Exception) -> Response:
    return error_response(409, str(exc), "conflict_error", code="illegal_transition")


async def handle_unexpected(_request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal error; see the control plane log", "internal_error")


EXCEPTION_HANDLERS = {
    DeepFlowError: handle_deepflow_error,
    HTTPException: handle_http_error,
    IllegalTransition: handle_illegal,
    Exception: handle_unexpected,
}
