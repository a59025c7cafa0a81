"""Progress reporting: one optional callable, so the CLI can drive a rich bar."""

from __future__ import annotations

from collections.abc import Callable

# progress(stage, done, total): stage names a phase ("download", "extract", "convert", "write",
# "tokenizer", "weights"); done and total count that phase's units (bytes or tensors).
Progress = Callable[[str, int, int], None]


def report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)
