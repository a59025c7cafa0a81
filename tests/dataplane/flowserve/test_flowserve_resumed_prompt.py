"""A resumed decode's request (`generated_token_ids`, docs/pd.md "Failures"): the tokens follow
the prompt's, from any kind of input, and must be in the vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from controlplane.wire import ChatMessage, GenerateRequest
from dataplane.flowserve.errors import InvalidRequest
from dataplane.flowserve.prompts import build_prompt

VOCAB = 512


@pytest.mark.parametrize(
    "given",
    [
        {"prompt": "The quick brown fox"},
        {"messages": [ChatMessage(role="user", content="Hi there")]},
        {"prompt_token_ids": [5, 6, 7]},
    ],
)
def test_generated_tokens_follow_the_prompt(tiny_model_dir: Path, given: dict[str, object]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = build_prompt(tokenizer, GenerateRequest(request_id="r", **given), VOCAB)  # type: ignore[arg-type]
    resumed = GenerateRequest(request_id="r", generated_token_ids=[9, 10], **given)  # type: ignore[arg-type]
    assert build_prompt(tokenizer, resumed, VOCAB).token_ids == [*plain.token_ids, 9, 10]


def test_generated_tokens_outside_the_vocabulary_are_refused(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    request = GenerateRequest(request_id="r", prompt="x", generated_token_ids=[3, VOCAB])
    with pytest.raises(InvalidRequest) as refused:
        build_prompt(tokenizer, request, VOCAB)
    assert refused.value.param == "generated_token_ids"
