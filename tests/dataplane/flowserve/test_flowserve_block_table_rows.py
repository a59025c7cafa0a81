"""BlockTableRows: the decode graphs' block tables kept from step to step equal a rebuild."""

from __future__ import annotations

import random

import numpy as np

from dataplane.flowserve.paged_metadata import BlockTableRows, StepInputs

BLOCK_SIZE = 4
WIDTH = 16
PAD = 999


def build(
    tables: list[list[int]], context_lens: list[int], rows: BlockTableRows | None
) -> StepInputs:
    return StepInputs.build(
        token_ids=[0] * len(tables),
        query_lens=[1] * len(tables),
        context_lens=context_lens,
        block_tables=tables,
        block_size=BLOCK_SIZE,
        width=WIDTH,
        pad_to=len(tables) + 3,
        pad_block=PAD,
        table_rows=rows,
    )


def test_kept_rows_equal_a_rebuild_as_tables_grow_join_leave_and_change() -> None:
    rng = random.Random(0)
    rows = BlockTableRows(WIDTH, PAD)
    next_block = 0
    live: list[tuple[list[int], int]] = []  # (table, context length)
    for _ in range(300):
        # Leave, join, grow by a token (a block at a boundary), or change (a new list).
        live = [entry for entry in live if rng.random() > 0.05]
        while len(live) < 12 and rng.random() < 0.5:
            live.insert(rng.randrange(len(live) + 1), ([], 0))
        grown = []
        for table, ctx in live:
            if rng.random() < 0.05:
                table = list(table)  # copy-on-write: a new list
                if table:
                    table[-1], next_block = next_block, next_block + 1
            ctx = min(ctx + 1, WIDTH * BLOCK_SIZE)
            while len(table) * BLOCK_SIZE < ctx:
                table.append(next_block)
                next_block += 1
            grown.append((table, ctx))
        live = grown
        if not live:
            continue
        tables, lens = [t for t, _ in live], [c for _, c in live]
        kept, rebuilt = build(tables, lens, rows), build(tables, lens, None)
        np.testing.assert_array_equal(kept.packed, rebuilt.packed)


def test_rows_of_tables_that_left_are_reused() -> None:
    rows = BlockTableRows(WIDTH, PAD)
    for step in range(50):
        tables = [[step * 10 + i] for i in range(8)]  # new lists every step
        build(tables, [1] * 8, rows)
    assert len(rows._rows) <= 32
