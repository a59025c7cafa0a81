"""The text and the UTF-8 bytes of single tokens, for logprobs.

A byte-level BPE token (GPT-2, Llama 3, SmolLM2) can hold part of a character, so its text alone
is lossy; its bytes come from the byte-to-unicode alphabet such tokenizers spell tokens with.
SentencePiece byte-fallback tokens look like `<0xE2>`.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's `bytes_to_unicode` table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def _uses_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder")
    except (ValueError, AttributeError):
        return False
    return '"ByteLevel"' in json.dumps(decoder)


class TokenTexts:
    """Caches each token's (text, bytes)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._byte_level = _uses_byte_level(tokenizer)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._compute(token_id)
        return found

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        text: str = self._tokenizer.decode([token_id])
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            fallback = _BYTE_FALLBACK.match(piece)
            if fallback:
                return text, [int(fallback.group(1), 16)]
            if self._byte_level:
                table = _unicode_to_byte()
                if all(ch in table for ch in piece):
                    return text, [table[ch] for ch in piece]
        return text, list(text.encode("utf-8"))
