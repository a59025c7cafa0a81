"""The KV cache's block pool: ref-counted blocks of `block_size` tokens, with a prefix cache.

A block is in exactly one of three places:

    live        ref_count > 0: in the block tables of that many sequences
    evictable   ref_count 0 but its content is cached (registered under its hash): a prefix-cache
                hit revives it; a fresh allocation takes it, least recently freed first
    free        ref_count 0 and nothing worth keeping

A full block's hash chains over the previous block's hash and its own token ids (blake2b, so a
crafted prompt cannot collide with another tenant's prefix), hence equal hashes mean equal prefixes.

The last token of a sequence is never served from the cache: its logits are needed. As in vLLM,
hits are looked up over the full blocks of `all_token_ids[:num_tokens - 1]`, so when a prompt is
entirely cached and a multiple of `block_size` long, its last block is recomputed into a fresh block
(at most `block_size` tokens of work) rather than shared and written, which would need a copy.
Copy-on-write therefore only happens after `fork`, to the shared partial last block.

A sequence's `block_table` list only ever grows in place (`append_slots`); every other change
(allocation, copy-on-write, free) gives it a new list, so that a list's identity and length tell
whether it changed (the runner keeps the decode batch's tables on that basis: BlockTableRows).

Every public method takes `lock` (re-entrant). Check/act pairs (`can_allocate`/`allocate`,
`can_append`/`append_slots`) are atomic against another worker sharing the pool only when the
caller holds `lock` around both, as `Scheduler.schedule` does.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from dataplane.flowserve.errors import ConfigError
from dataplane.flowserve.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and sealed


def block_hash(prev_hash: bytes, token_ids: list[int]) -> bytes:
    """The hash of a full block: of its tokens and, through `prev_hash`, of every token before."""
    return hashlib.blake2b(prev_hash + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks < 1:
            raise ConfigError("the KV cache needs at least one block")
        if block_size < 1:
            raise ConfigError("block_size must be at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self._cached: dict[bytes, int] = {}  # hash -> the one block registered under it
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens found in the cache
        self.lock = threading.RLock()

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free ones plus evictable cached ones."""
        with self.lock:
            return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """The fraction of blocks held by live sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slot(self, seq: Sequence, position: int) -> int:
        """Where the K/V of token `position` of `seq` lives in the flattened cache."""
        block_id = seq.block_table[position // self.block_size]
        return block_id * self.block_size + position % self.block_size

    # --- admission: the first allocation of a waiting sequence ---------------------------------

    def cached_prefix_len(self, seq: Sequence) -> int:
        """How many leading tokens of `seq` the cache holds now (whole blocks, never the last
        token). A look-up only: takes nothing and counts nothing."""
        with self.lock:
            return len(self._prefix_hits(seq, seq.num_tokens)) * self.block_size

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `allocate(seq, num_tokens)` would find its blocks. Live hits cost nothing;
        evictable hits cost a block like a fresh one: reviving them takes them off the pool."""
        with self.lock:
            hits = self._prefix_hits(seq, num_tokens)
            live_hits = sum(1 for b in hits if self.blocks[b].ref_count > 0)
            return self.blocks_needed(num_tokens) - live_hits <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Give a waiting `seq` the blocks for its first `num_tokens` tokens: cached blocks for the
        prefix hits (setting `num_cached_tokens` and `num_computed_tokens`), fresh ones after."""
        with self.lock:
            if seq.block_table:
                raise RuntimeError(f"sequence {seq.request_id} already holds KV blocks")
            if not 1 <= num_tokens <= seq.num_tokens:
                raise ValueError(f"cannot allocate {num_tokens} of {seq.num_tokens} tokens")
            if not self.can_allocate(seq, num_tokens):
                raise RuntimeError("out of KV cache blocks: check can_allocate first")
            hits = self._prefix_hits(seq, num_tokens)
            for block_id in hits:  # before any fresh block, so that no eviction takes a hit
                self._take_cached(block_id)
            fresh = [self._take_fresh() for _ in range(self.blocks_needed(num_tokens) - len(hits))]
            seq.block_table = hits + fresh
            seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_cached_tokens

    # --- growth: the next chunk or decode token of a running sequence --------------------------

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        with self.lock:
            shared, fresh = self._blocks_to_take(seq, num_new_tokens)
            return len(shared) + fresh <= len(self._free) + len(self._evictable)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for the K/V of `num_new_tokens` more tokens after `num_computed_tokens`.
        Returns copy-on-write pairs `(src, dst)`: a shared block about to be written is replaced
        in this table by a fresh copy. Apply the copies in order (or gather every source before
        scattering) before the forward pass."""
        with self.lock:
            shared, fresh = self._blocks_to_take(seq, num_new_tokens)
            if len(shared) + fresh > len(self._free) + len(self._evictable):
                raise RuntimeError("out of KV cache blocks: check can_append first")
            copies = []
            if shared:
                # A new list: a table's list otherwise only grows, which is how the runner's
                # BlockTableRows tells what changed in it.
                seq.block_table = list(seq.block_table)
            for index in shared:
                src = seq.block_table[index]
                dst = self._take_fresh()
                self.blocks[src].ref_count -= 1  # stays above 0: another sequence holds it
                seq.block_table[index] = dst
                copies.append((src, dst))
            for _ in range(fresh):
                seq.block_table.append(self._take_fresh())
            return copies

    def try_append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """`append_slots` if `can_append`, else None: the check and the act in one call under
        one lock. The scheduler makes this call for every running sequence every step, so a
        decode token that lands in its own block's free slot returns at once."""
        with self.lock:
            computed = seq.num_computed_tokens
            table = seq.block_table
            index = computed // self.block_size
            if (
                num_new_tokens == 1
                and index < len(table)
                and self.blocks[table[index]].ref_count == 1
            ):
                return []
            if not self.can_append(seq, num_new_tokens):
                return None
            return self.append_slots(seq, num_new_tokens)

    def seal_full_blocks(self, seq: Sequence) -> None:
        """Hash and register the blocks that `num_computed_tokens` has filled since last time. When
        another block already holds the same hash, that one stays the cached copy."""
        with self.lock:
            # Only blocks whose every token id is known: a pending token's block waits.
            num_known = len(seq.prompt_token_ids) + len(seq.output_token_ids)
            num_full = min(
                min(seq.num_computed_tokens, num_known) // self.block_size, len(seq.block_table)
            )
            if num_full == 0 or self.blocks[seq.block_table[num_full - 1]].hash is not None:
                return  # sealed blocks are a prefix of the table: nothing new is full
            first = num_full
            while first > 0 and self.blocks[seq.block_table[first - 1]].hash is None:
                first -= 1
            hashes = self._hashes(seq, num_full)
            for index in range(first, num_full):
                block = self.blocks[seq.block_table[index]]
                block.hash = hashes[index]
                self._cached.setdefault(block.hash, block.block_id)

    # --- release and sharing --------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s blocks; its K/V are gone (`num_cached_tokens` stays, for usage reports).
        The tail is released first, so that it is evicted before the head, which other sequences
        are likelier to share."""
        with self.lock:
            for block_id in reversed(seq.block_table):
                self._release(block_id)
            seq.block_table = []
            seq.num_computed_tokens = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share every block of `parent` (between steps): its first
        `parent.num_computed_tokens` tokens must be the parent's. The first write into the shared
        partial last block copies it."""
        with self.lock:
            num_computed = parent.num_computed_tokens
            if child.block_table:
                raise RuntimeError(f"sequence {child.request_id} already holds KV blocks")
            if child.all_token_ids[:num_computed] != parent.all_token_ids[:num_computed]:
                raise ValueError("a forked sequence must start with its parent's computed tokens")
            for block_id in parent.block_table:
                self.blocks[block_id].ref_count += 1
            child.block_table = list(parent.block_table)
            child.num_computed_tokens = num_computed
            child.num_cached_tokens = parent.num_cached_tokens
            child.block_hashes = parent.block_hashes[: num_computed // self.block_size]

    # --- internals (callers hold the lock) -------------------------------------------------------

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """`seq.block_hashes`, extended to cover its first `num_blocks` (full) blocks."""
        have = len(seq.block_hashes)
        if have < num_blocks:
            tokens = seq.all_token_ids
            size = self.block_size
            prev = seq.block_hashes[-1] if have else b""
            for index in range(have, num_blocks):
                prev = block_hash(prev, tokens[index * size : (index + 1) * size])
                seq.block_hashes.append(prev)
        return seq.block_hashes

    def _prefix_hits(self, seq: Sequence, num_tokens: int) -> list[int]:
        """The cached blocks matching `seq`'s leading full blocks within `num_tokens`, stopping at
        the first miss, and leaving out the sequence's last token."""
        num_blocks = max(0, min(num_tokens, seq.num_tokens - 1)) // self.block_size
        hits = []
        for block_hash_ in self._hashes(seq, num_blocks)[:num_blocks]:
            block_id = self._cached.get(block_hash_)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _blocks_to_take(self, seq: Sequence, num_new_tokens: int) -> tuple[list[int], int]:
        """(table indices of the shared blocks that the next `num_new_tokens` would write, how
        many fresh blocks they need at the end of the table). Runs per sequence per step."""
        table, blocks, size = seq.block_table, self.blocks, self.block_size
        computed = seq.num_computed_tokens
        needed = -(-(computed + num_new_tokens) // size)
        last = min(len(table), needed)
        shared = [i for i in range(computed // size, last) if blocks[table[i]].ref_count > 1]
        return shared, max(0, needed - len(table))

    def _take_cached(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            evicted = self.blocks[block_id]
            assert evicted.hash is not None and self._cached[evicted.hash] == block_id
            del self._cached[evicted.hash]
            evicted.hash = None
        else:
            raise RuntimeError("out of KV cache blocks")
        self.blocks[block_id].ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.hash is not None and self._cached.get(block.hash) == block_id:
            self._evictable[block_id] = None
        else:
            block.hash = None  # a duplicate of a cached block, or never full: nothing to keep
            self._free.append(block_id)
