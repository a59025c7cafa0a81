"""The block pool: accounting, prefix caching (hits, reuse of freed blocks, LRU), copy-on-write."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from pool_checks import check_pool

from dataplane.flowserve.block_manager import BlockManager
from dataplane.flowserve.errors import ConfigError
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.sequence import Sequence

BS = 4  # a small block size keeps the numbers readable


def make_seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(), torch.Generator(), 16)


def compute(manager: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """What a step does to the block state: the chunk's K/V are now in the cache."""
    seq.num_computed_tokens = seq.num_tokens if num_tokens is None else num_tokens
    manager.seal_full_blocks(seq)


def admit(manager: BlockManager, seq: Sequence) -> None:
    assert manager.can_allocate(seq, seq.num_tokens)
    manager.allocate(seq, seq.num_tokens)
    compute(manager, seq)


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        BlockManager(0, BS)
    with pytest.raises(ConfigError):
        BlockManager(4, 0)


def test_allocate_append_free_accounting() -> None:
    manager = BlockManager(8, BS)
    seq = make_seq("a", list(range(10)))
    assert manager.can_allocate(seq, 10)
    manager.allocate(seq, 6)  # a first chunk of 6 tokens: 2 blocks
    assert len(seq.block_table) == 2 and manager.num_free_blocks == 6
    assert seq.num_computed_tokens == 0 and seq.num_cached_tokens == 0
    compute(manager, seq, 6)
    assert manager.can_append(seq, 4)
    assert manager.append_slots(seq, 4) == []  # no sharing, no copies
    assert len(seq.block_table) == 3 and manager.usage == pytest.approx(3 / 8)
    compute(manager, seq, 10)
    assert manager.slot(seq, 9) == seq.block_table[2] * BS + 1
    check_pool(manager, [seq])
    manager.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert manager.num_free_blocks == 8 and manager.usage == 0.0
    check_pool(manager, [])


def test_act_without_room_raises() -> None:
    manager = BlockManager(2, BS)
    seq = make_seq("a", list(range(12)))
    assert not manager.can_allocate(seq, 12)
    with pytest.raises(RuntimeError, match="out of KV cache blocks"):
        manager.allocate(seq, 12)
    assert manager.num_free_blocks == 2 and seq.block_table == []  # all or nothing
    manager.allocate(seq, 8)
    with pytest.raises(RuntimeError, match="already holds"):
        manager.allocate(seq, 8)
    compute(manager, seq, 8)
    assert not manager.can_append(seq, 1)
    with pytest.raises(RuntimeError, match="out of KV cache blocks"):
        manager.append_slots(seq, 1)


def test_prefix_hit_shares_blocks_of_a_live_sequence() -> None:
    manager = BlockManager(16, BS)
    shared = list(range(100, 112))  # 3 full blocks
    first = make_seq("a", shared + [1, 2, 3])
    admit(manager, first)
    second = make_seq("b", shared + [7, 8, 9, 10, 11])
    assert manager.cached_prefix_len(second) == 12
    assert manager.can_allocate(second, second.num_tokens)
    free_before = manager.num_free_blocks
    manager.allocate(second, second.num_tokens)
    assert second.num_cached_tokens == second.num_computed_tokens == 12
    assert second.block_table[:3] == first.block_table[:3]
    assert second.block_table[3] != first.block_table[3]
    assert manager.num_free_blocks == free_before - 2  # only the 2 uncached blocks are new
    assert [manager.blocks[b].ref_count for b in second.block_table] == [2, 2, 2, 1, 1]
    assert manager.prefix_cache_queries == 15 + 17
    assert manager.prefix_cache_hits == 12
    check_pool(manager, [first, second])


def test_freed_cached_blocks_are_reused_then_revived() -> None:
    manager = BlockManager(8, BS)
    prompt = list(range(50, 60))  # 2 full blocks + 2 tokens
    first = make_seq("a", prompt)
    admit(manager, first)
    first_blocks = list(first.block_table)
    manager.free(first)
    assert manager.num_free_blocks == 8  # cached blocks count as allocatable
    check_pool(manager, [])

    second = make_seq("b", prompt[:8] + [1, 2, 3])
    manager.allocate(second, second.num_tokens)
    assert second.num_cached_tokens == 8
    assert second.block_table[:2] == first_blocks[:2]
    assert [manager.blocks[b].ref_count for b in second.block_table[:2]] == [1, 1]
    assert manager.num_free_blocks == 5
    check_pool(manager, [second])


def test_a_fully_cached_prompt_recomputes_its_last_block() -> None:
    manager = BlockManager(8, BS)
    prompt = list(range(16))  # exactly 4 full blocks
    first = make_seq("a", prompt)
    admit(manager, first)
    again = make_seq("b", prompt)
    assert manager.cached_prefix_len(again) == 12  # never the last token, so never the last block
    manager.allocate(again, 16)
    assert again.num_computed_tokens == 12
    assert again.block_table[:3] == first.block_table[:3]
    assert again.block_table[3] != first.block_table[3]  # a fresh block: no copy-on-write needed
    assert manager.append_slots(again, 0) == []
    check_pool(manager, [first, again])


def test_lru_eviction_takes_the_least_recently_freed_tail_first() -> None:
    manager = BlockManager(4, BS)
    a = make_seq("a", list(range(0, 8)))
    b = make_seq("b", list(range(20, 28)))
    admit(manager, a)
    admit(manager, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    manager.free(a)
    manager.free(b)
    # Eviction order: a's tail, a's head, b's tail, b's head.
    assert list(manager._evictable) == [a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]

    probe_a = make_seq("pa", list(range(0, 8)) + [99])
    probe_b = make_seq("pb", list(range(20, 28)) + [99])
    c = make_seq("c", [7, 7, 7])
    manager.allocate(c, 3)
    assert c.block_table == [a_blocks[1]]
    assert manager.cached_prefix_len(probe_a) == 4  # a's head survives
    assert manager.cached_prefix_len(probe_b) == 8
    d = make_seq("d", [8, 8, 8])
    manager.allocate(d, 3)
    assert d.block_table == [a_blocks[0]]
    assert manager.cached_prefix_len(probe_a) == 0
    assert manager.cached_prefix_len(probe_b) == 8
    check_pool(manager, [c, d])


def test_free_blocks_are_taken_before_cached_ones() -> None:
    manager = BlockManager(4, BS)
    a = make_seq("a", list(range(8)))
    admit(manager, a)
    manager.free(a)
    a_blocks = set(manager._evictable)
    b = make_seq("b", [5, 5])
    manager.allocate(b, 2)
    assert b.block_table[0] not in a_blocks
    assert manager.cached_prefix_len(make_seq("p", list(range(8)) + [1])) == 8


def test_identical_blocks_sealed_twice_keep_one_cache_entry() -> None:
    manager = BlockManager(8, BS)
    prompt = list(range(9))
    a, b = make_seq("a", prompt), make_seq("b", prompt)
    manager.allocate(a, 9)
    manager.allocate(b, 9)  # before a sealed anything: no hits
    assert b.num_cached_tokens == 0
    compute(manager, a)
    compute(manager, b)
    assert len(manager._cached) == 2
    assert set(manager._cached.values()) == set(a.block_table[:2])
    check_pool(manager, [a, b])
    manager.free(b)  # b's duplicates hold nothing the cache wants
    assert len(manager._evictable) == 0 and manager.num_free_blocks == 5
    manager.free(a)
    assert len(manager._evictable) == 2 and manager.num_free_blocks == 8
    check_pool(manager, [])


def test_fork_shares_blocks_and_copies_on_write() -> None:
    manager = BlockManager(8, BS)
    parent = make_seq("p", list(range(6)))  # a full block and a partial one
    admit(manager, parent)
    child = make_seq("c", list(range(6)))
    manager.fork(parent, child)
    assert child.block_table == parent.block_table and child.num_computed_tokens == 6
    assert [manager.blocks[b].ref_count for b in parent.block_table] == [2, 2]
    check_pool(manager, [parent, child])

    parent.output_token_ids.append(40)
    child.output_token_ids.append(41)
    shared_tail = parent.block_table[1]
    free_before = manager.num_free_blocks
    assert manager.can_append(child, 1)
    copies = manager.append_slots(child, 1)
    assert copies == [(shared_tail, child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]  # the full block stays shared
    assert manager.num_free_blocks == free_before - 1
    assert manager.append_slots(parent, 1) == []  # no longer shared: written in place
    assert parent.block_table[1] == shared_tail
    compute(manager, parent)
    compute(manager, child)
    check_pool(manager, [parent, child])
    manager.free(parent)
    manager.free(child)
    assert manager.num_free_blocks == 8
    check_pool(manager, [])


def test_fork_counts_the_copy_in_can_append() -> None:
    manager = BlockManager(2, BS)
    parent = make_seq("p", [1, 2])
    admit(manager, parent)
    child = make_seq("c", [1, 2])
    manager.fork(parent, child)
    child.output_token_ids.append(3)
    assert manager.can_append(child, 1)  # one block for the copy
    manager.append_slots(child, 1)
    parent.output_token_ids.append(4)
    child.output_token_ids.append(5)
    child.num_computed_tokens = 3
    assert manager.can_append(parent, 1) and manager.append_slots(parent, 1) == []
    assert not manager.can_append(child, 2)  # a 2nd block for positions 4.. is one too many
    check_pool(manager, [parent, child])


def test_fork_rejects_a_child_with_other_tokens() -> None:
    manager = BlockManager(4, BS)
    parent = make_seq("p", [1, 2, 3])
    admit(manager, parent)
    with pytest.raises(ValueError, match="parent's computed tokens"):
        manager.fork(parent, make_seq("c", [1, 2, 4]))
    check_pool(manager, [parent])


def test_two_threads_share_one_pool() -> None:
    manager = BlockManager(64, BS)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(300):
                prefix = [rng.randrange(3)] * 8
                seq = make_seq(f"{seed}-{i}", prefix + [rng.randrange(50) for _ in range(6)])
                with manager.lock:
                    if not manager.can_allocate(seq, seq.num_tokens):
                        continue
                    manager.allocate(seq, seq.num_tokens)
                compute(manager, seq)
                manager.free(seq)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert manager.num_free_blocks == 64
    assert manager.prefix_cache_hits > 0
    check_pool(manager, [])
