"""Incremental detokenization for streaming, and stop strings.

`IncrementalDecoder` turns one token at a time into text that never ends in a broken UTF-8
character: a byte-level token can hold half a character, which decodes to U+FFFD until the rest
arrives. It decodes a small window (`prefix_offset`..end, as vLLM and TGI do) so that tokenizers
which drop a word's leading space when it is decoded alone still get the space right.

`StopStringFilter` holds back any tail of the text that could still grow into a stop string, and
cuts the text just before the first stop string that appears.

`Detokenizer` chains the two. All three are pure (a tokenizer's `decode` is the only call out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# How many prompt tokens the first decode sees as context (vLLM's value).
PROMPT_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str | list[str]: ...


class IncrementalDecoder:
    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = len(self._ids)  # tokens before this are already turned into text

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
        return text if isinstance(text, str) else "".join(text)

    def add(self, token_id: int) -> str:
        """The text `token_id` completes; "" while it ends inside a character."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is left at the end, broken characters included."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str  # safe to send now
    stopped: bool = False  # a stop string appeared; `text` ends just before it


class StopStringFilter:
    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> TextDelta:
        if self.stopped:
            return TextDelta("", stopped=True)
        pending = self._held + text
        cut = min((i for i in (pending.find(s) for s in self._stop) if i >= 0), default=None)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return TextDelta(pending[:cut], stopped=True)
        keep = self._partial_match(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return TextDelta(pending[: len(pending) - keep])

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_match(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


class Detokenizer:
    """One choice's text: `add` each token, then `finish` once for the held-back tail."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._decoder = IncrementalDecoder(
            tokenizer, prompt_token_ids, skip_special_tokens=skip_special_tokens
        )
        self._filter = StopStringFilter(stop)
        self.text = ""  # everything emitted so far

    @property
    def stopped(self) -> bool:
        return self._filter.stopped

    def add(self, token_id: int) -> TextDelta:
        delta = self._filter.feed(self._decoder.add(token_id))
        self.text += delta.text
        return delta

    def finish(self) -> TextDelta:
        """The held-back tail; `stopped` if a stop string shows up only in it."""
        if self._filter.stopped:
            return TextDelta("", stopped=True)
        tail = self._filter.feed(self._decoder.flush())
        rest = tail if tail.stopped else TextDelta(tail.text + self._filter.flush())
        self.text += rest.text
        return rest
