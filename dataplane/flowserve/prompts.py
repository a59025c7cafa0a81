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
    tokenizer with its default special tokens; `prompt_token_ids` are checked against the vocab.
    A resumed decode's `generated_token_ids` follow the prompt's tokens (`text` stays the
    prompt's)."""
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
        ids = _in_vocab(list(request.prompt_token_ids or []), vocab_size, "prompt_token_ids")
        text = tokenizer.decode(ids) if request.echo else None
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if request.generated_token_ids:  # a resumed decode: computed as part of the prompt
        ids += _in_vocab(request.generated_token_ids, vocab_size, "generated_token_ids")
    return Prompt(ids, text)


def _in_vocab(ids: list[int], vocab_size: int, param: str) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(
            f"token id {bad[0]} is out of the vocabulary [0, {vocab_size})", param=param
        )
    return ids
