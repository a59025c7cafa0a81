"""The LoRA trainer process: `python -m dataplane.training --spec SPEC.json`.

SPEC.json is a `controlplane.wire.TrainingStart`. The trainer writes JSON lines to stdout, one
object per line, each with a "type":

- "progress": a `TrainingProgress`, after every step
- "checkpoint": a `TrainingCheckpoint`, every `checkpoint_every` steps and at each epoch end
- "result": a `TrainingResult`, once, after validation and merging; then exit 0
- "error": {"message"}; then exit 1

SIGTERM stops the run between steps (exit 143) without writing a checkpoint.
"""

from __future__ import annotations

from .trainer import run

__all__ = ["run"]
