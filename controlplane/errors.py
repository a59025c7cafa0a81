"""The control plane's exception tree. The API edge (`api/errors.py`) turns these into HTTP replies.

DeepFlowError
|- InvalidRequest      400 invalid_request_error
|- NotFound            404 not_found_error (model_not_found for an unknown model)
|- Conflict            409 conflict_error
|- Overloaded          429 rate_limit_error
|- Unavailable         503 service_unavailable (no ready instance in time)
'- UpstreamFailed      502 upstream_error (an instance failed mid-request)
"""

from __future__ import annotations


class DeepFlowError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(DeepFlowError):
    status = 400
    type = "invalid_request_error"


class NotFound(DeepFlowError):
    status = 404
    type = "not_found_error"


class Conflict(DeepFlowError):
    status = 409
    type = "conflict_error"


class Overloaded(DeepFlowError):
    status = 429
    type = "rate_limit_error"


class Unavailable(DeepFlowError):
    status = 503
    type = "service_unavailable"


class UpstreamFailed(DeepFlowError):
    status = 502
    type = "upstream_error"
