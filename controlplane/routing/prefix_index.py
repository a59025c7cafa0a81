"""Approximate per-instance prefix index over prompt text, for locality-aware routing.

Like the SGLang router's approximate tree, it remembers the prompt text routed to each instance
rather than asking the instance what its KV cache holds, so it can be wrong after the instance
evicts; routing only needs a good guess.

The text is cut into fixed chunks of ``chunk_chars`` characters and each full chunk is keyed by a
chained hash of every chunk up to it (as a paged prefix cache keys its blocks), so one key stands
for a whole prefix. A match is therefore exact at chunk granularity: ``matched_chars`` is a
multiple of ``chunk_chars``, a trailing partial chunk never matches, and two texts match over
``k`` chunks exactly when their first ``k * chunk_chars`` characters are equal (up to a 64-bit
hash collision). Insert and match must see the same rendering of the prompt.

Memory is bounded per instance: each instance keeps at most ``max_chars_per_instance //
chunk_chars`` chunks, evicting its least recently inserted ones. A prompt's chunks are refreshed
last-to-first, so a shared prefix outlives the tails that hang off it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

DEFAULT_CHUNK_CHARS = 64
DEFAULT_MAX_CHARS_PER_INSTANCE = 1 << 22  # 4 Mi chars, about 1 M tokens of prompt per instance


def chunk_keys(text: str, chunk_chars: int) -> list[int]:
    """One chained key per full chunk: key i identifies ``text[: (i + 1) * chunk_chars]``."""
    keys = []
    prev = b""
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        digest = hashlib.blake2b(
            prev + text[start : start + chunk_chars].encode("utf-8", "surrogatepass"),
            digest_size=8,
        ).digest()
        keys.append(int.from_bytes(digest, "big"))
        prev = digest
    return keys


class PrefixIndex:
    """Which instances have seen which prompt prefixes.

    ``insert`` after routing a prompt to an instance, ``match`` before routing the next one,
    ``remove_instance`` when an instance leaves the group.
    """

    def __init__(
        self,
        *,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        max_chars_per_instance: int = DEFAULT_MAX_CHARS_PER_INSTANCE,
    ) -> None:
        if chunk_chars < 1:
            raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
        if max_chars_per_instance < chunk_chars:
            raise ValueError(
                f"max_chars_per_instance ({max_chars_per_instance}) must hold one chunk "
                f"({chunk_chars} chars)"
            )
        self.chunk_chars = chunk_chars
        self.max_chunks_per_instance = max_chars_per_instance // chunk_chars
        self._chunks: dict[str, OrderedDict[int, None]] = {}  # instance -> keys, oldest first
        self._holders: dict[int, set[str]] = {}  # key -> instances holding it

    def insert(self, instance_id: str, text: str) -> None:
        chunks = self._chunks.setdefault(instance_id, OrderedDict())
        for key in reversed(chunk_keys(text, self.chunk_chars)):
            if key in chunks:
                chunks.move_to_end(key)
            else:
                chunks[key] = None
                self._holders.setdefault(key, set()).add(instance_id)
        while len(chunks) > self.max_chunks_per_instance:
            key, _ = chunks.popitem(last=False)
            self._drop_holder(key, instance_id)

    def match(self, text: str) -> dict[str, int]:
        """Matched prefix length in characters per instance; instances with no match are absent.

        Reading does not refresh recency: only routing a prompt (``insert``) does.
        """
        keys = chunk_keys(text, self.chunk_chars)
        matched: dict[str, int] = {}
        alive = set(self._holders.get(keys[0], ())) if keys else set()
        depth = 0
        while alive:  # alive: the instances holding the first depth + 1 chunks
            depth += 1
            holders = self._holders.get(keys[depth], set()) if depth < len(keys) else set()
            still = alive & holders
            for instance_id in alive - still:
                matched[instance_id] = depth * self.chunk_chars
            alive = still
        return matched

    def remove_instance(self, instance_id: str) -> None:
        for key in self._chunks.pop(instance_id, OrderedDict()):
            self._drop_holder(key, instance_id)

    def instances(self) -> list[str]:
        return sorted(self._chunks)

    def chars(self, instance_id: str) -> int:
        """Characters of prompt text remembered for an instance (whole chunks)."""
        return len(self._chunks.get(instance_id, ())) * self.chunk_chars

    def _drop_holder(self, key: int, instance_id: str) -> None:
        holders = self._holders.get(key)
        if holders is None:
            return
        holders.discard(instance_id)
        if not holders:
            del self._holders[key]
