"""A `GenerateRequest`'s input turned into prompt token ids (and its text, for echo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controlplane.wire import GenerateRequest
from dataplane.flowserve.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class Prompt:
    token_ids: list[int]
    text: str | None  # None for token ids when echo was not asked for: decoding them costs time


def build_prompt(tokenizer: Any, request: GenerateRequest, vocab_size: int) -> Prompt:
    """`messages` go through the chat template (with the generation prompt), `prompt` through the
    tokenizer with its default special tokens; `prompt_token_ids` are checked against the vocab."""
    text: str | None
    if request.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest("this model has no chat template; send a prompt", param="messages")
        conversation = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # a template may raise anything (jinja errors, its own checks)
            raise InvalidRequest(f"the chat template failed: {exc}", param="messages") from exc
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    elif request.prompt is not None:
        text = request.prompt
        ids = list(tokenizer(text)["input_ids"])
    else:
        ids = list(request.prompt_token_ids or [])
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(
                f"token id {bad[0]} is out of the vocabulary [0, {vocab_size})",
                param="prompt_token_ids",
            )
        text = tokenizer.decode(ids) if request.echo else None
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return Prompt(ids, text)
