"""Invariants of a block pool, checked by the block manager and scheduler tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from dataplane.flowserve.block_manager import BlockManager
from dataplane.flowserve.sequence import Sequence


def check_pool(manager: BlockManager, live: Iterable[Sequence]) -> None:
    """Every block is live (ref count = number of tables holding it), evictable or free, once."""
    holders: Counter[int] = Counter()
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table), "a block twice in one table"
        holders.update(seq.block_table)
    free, evictable = set(manager._free), set(manager._evictable)
    assert len(free) == len(manager._free) and not free & evictable
    for block in manager.blocks:
        assert block.ref_count == holders[block.block_id]
        if block.ref_count == 0:
            assert (block.block_id in free) != (block.block_id in evictable)
        else:
            assert block.block_id not in free and block.block_id not in evictable
    for block_id in evictable:
        block_hash = manager.blocks[block_id].hash
        assert block_hash is not None and manager._cached[block_hash] == block_id
    for block_hash, block_id in manager._cached.items():
        assert manager.blocks[block_id].hash == block_hash
    assert manager.num_free_blocks == len(free) + len(evictable)
