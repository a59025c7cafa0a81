"""The scale-out package's exception tree.

    ScaleOutError
    ├── CacheFull          the DRAM cache cannot make room for a model within its budget
    ├── PodUnavailable     a warm pod died or would not take a start command
    └── ZygoteUnavailable  a zygote is gone, or could not fork

The launcher catches the last two and falls back to the next path (docs/scaling.md).
"""

from __future__ import annotations


class ScaleOutError(Exception):
    """Base of every error this package raises on purpose."""


class CacheFull(ScaleOutError):
    def __init__(self, needed: int, budget: int, pinned: int) -> None:
        super().__init__(
            f"the DRAM cache needs {needed} bytes but its budget is {budget} bytes, "
            f"{pinned} of them held by models that live instances map"
        )
        self.needed = needed
        self.budget = budget
        self.pinned = pinned


class PodUnavailable(ScaleOutError):
    pass


class ZygoteUnavailable(ScaleOutError):
    pass
