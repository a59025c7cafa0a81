"""FlowServe's one exception tree.

    FlowServeError                 anything FlowServe raises on purpose
     ├── ConfigError               a bad engine configuration or model folder (fatal at start-up)
     └── InvalidRequest            a request the engine cannot take (HTTP 400 at the server edge)
          ├── PromptTooLong        the prompt does not fit in max_model_len
          └── DuplicateRequest     a request id that is already in flight

Errors turn into HTTP bodies only in `server.py`.
"""

from __future__ import annotations


class FlowServeError(Exception):
    """Base of every error FlowServe raises on purpose."""


class ConfigError(FlowServeError):
    """The engine configuration or the model folder is unusable."""


class InvalidRequest(FlowServeError):
    """A request the engine cannot take. `param` names the offending field, `code` is OpenAI's."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class PromptTooLong(InvalidRequest):
    def __init__(self, num_prompt_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"has {num_prompt_tokens} tokens. Please shorten it.",
            param="messages",
            code="context_length_exceeded",
        )
        self.num_prompt_tokens = num_prompt_tokens
        self.max_model_len = max_model_len


class DuplicateRequest(InvalidRequest):
    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"request id {request_id!r} is already in flight",
            param="request_id",
            code="duplicate_request_id",
        )
        self.request_id = request_id
