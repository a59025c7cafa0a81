"""Checking a fine-tune file: chat-format JSONL, one conversation per line.

Each non-blank line is `{"messages": [{"role": "system" | "user" | "assistant", "content": str},
...]}` with at least one assistant message (the loss is on assistant tokens only, so a conversation
without one teaches nothing). Other keys (OpenAI's `weight`, `name`) are allowed and ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = frozenset({"system", "user", "assistant"})
MAX_PROBLEMS = 5  # reported per file; the rest are counted


@dataclass(slots=True, frozen=True)
class LineProblem:
    line: int  # 1-based
    message: str


@dataclass(slots=True, frozen=True)
class ChatFileCheck:
    num_examples: int
    problems: tuple[LineProblem, ...]
    num_problems: int

    @property
    def ok(self) -> bool:
        return self.num_problems == 0 and self.num_examples > 0

    def describe(self) -> str:
        """One message for an API error: the first problems by line, and how many more."""
        if self.num_problems == 0:
            return "the file has no examples"
        parts = [f"line {p.line}: {p.message}" for p in self.problems]
        more = self.num_problems - len(self.problems)
        if more:
            parts.append(f"and {more} more problem{'s' if more > 1 else ''}")
        return "; ".join(parts)


def check_line(raw: bytes) -> str | None:
    """What is wrong with one non-blank line, or None if it is a valid example."""
    try:
        record: Any = json.loads(raw)
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg})"
    if not isinstance(record, dict):
        return "expected a JSON object with a 'messages' list"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty 'messages' list"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{index}] is not an object"
        role = message.get("role")
        if role not in ROLES:
            return f"messages[{index}].role must be one of system, user, assistant (got {role!r})"
        if not isinstance(message.get("content"), str):
            return f"messages[{index}].content must be a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message to learn from"
    return None


def check_chat_jsonl(lines: Iterable[bytes], max_problems: int = MAX_PROBLEMS) -> ChatFileCheck:
    examples = 0
    problems: list[LineProblem] = []
    count = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        problem = check_line(raw)
        if problem is None:
            examples += 1
            continue
        count += 1
        if len(problems) < max_problems:
            problems.append(LineProblem(number, problem))
    return ChatFileCheck(examples, tuple(problems), count)


def check_file(path: Path) -> ChatFileCheck:
    with path.open("rb") as f:
        return check_chat_jsonl(f)
