"""Chat JSONL -> token ids and labels (loss on assistant tokens only) -> padded batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # what torch's cross_entropy skips

Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on assistant tokens

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    labels: torch.Tensor  # [batch, seq]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum().item())


def read_conversations(path: str | Path) -> list[list[Message]]:
    """One `{"messages": [{"role", "content"}, ...]}` per non-blank line."""
    conversations: list[list[Message]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON: {e.msg}") from e
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ValueError(f"{path}:{number}: expected a non-empty 'messages' list")
            for m in messages:
                if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content"), str)):
                    raise ValueError(f"{path}:{number}: each message needs a role and content")
            conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not conversations:
        raise ValueError(f"{path}: no examples")
    return conversations


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    assert isinstance(text, str)
    return text


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies.

    A reply's span runs from the end of the conversation before it (with the generation prompt)
    to the end of the conversation through it, so it covers the reply and its end-of-turn marker:
    what the model has to produce, and nothing that the template puts around it.
    """
    text = _render(tokenizer, messages, prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], prompt=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        spans.append((len(before), len(through)))
    return text, spans


def encode(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_seq_len: int
) -> Example:
    text, spans = assistant_spans(tokenizer, messages)
    # The template writes any BOS itself, so the tokenizer must not add another.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(enc["input_ids"])[:max_seq_len]
    offsets: list[tuple[int, int]] = list(enc["offset_mapping"])[:max_seq_len]
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, _end) in zip(input_ids, offsets, strict=True)
    ]
    return Example(input_ids, labels)


def load_examples(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> list[Example]:
    return [encode(tokenizer, c, max_seq_len) for c in read_conversations(path)]


def collate(examples: list[Example], pad_token_id: int) -> Batch:
    """Right padding: pads are masked out of attention and of the loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return Batch(ids, mask, labels)


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The same permutation for the same seed and epoch, so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return [int(i) for i in torch.randperm(num_examples, generator=generator)]
