"""What the engine's thread and the two workers share, under one lock.

- the outputs the workers produced and the engine has not collected yet (in the order they
  were produced: a sequence's first token is emitted before it is handed to the decode worker,
  so its tokens stay in order);
- the sequences to abort: the engine marks them, whichever worker holds one at its next
  iteration boundary frees it (a sequence in transit is claimed by the worker it reaches);
- how many sequences the decode worker holds, which the prefill worker's admission counts
  against the instance's max_num_seqs;
- a worker's failure, for the engine to raise from `step()`.

The lock is never taken while the block manager's is held, so the two cannot deadlock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from dataplane.flowserve.engine import StepOutput
from dataplane.flowserve.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class Timing:
    """A sequence's clock, carried with it between the workers (time.monotonic())."""

    arrived: float
    last_token: float | None = None  # None until its first token
    imported: bool = False  # its first token came with imported K/V: no TTFT of ours


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._produced = threading.Condition(self._lock)
        self._outputs: list[tuple[Sequence, StepOutput]] = []
        self._aborting: set[Sequence] = set()
        self._decode_held = 0
        self._failure: BaseException | None = None

    # --- outputs ----------------------------------------------------------------------------

    def emit(self, outputs: list[tuple[Sequence, StepOutput]]) -> None:
        if not outputs:
            return
        with self._lock:
            self._outputs.extend(outputs)
            self._produced.notify_all()

    def collect(self, wait_s: float) -> list[tuple[Sequence, StepOutput]]:
        """Everything emitted so far, waiting up to `wait_s` for something when nothing is."""
        with self._lock:
            if not self._outputs and wait_s > 0:
                self._produced.wait(wait_s)
            outputs, self._outputs = self._outputs, []
            return outputs

    # --- aborts -----------------------------------------------------------------------------

    def abort(self, seq: Sequence) -> None:
        """Mark `seq` for its worker to free, unless a worker already finished it (its status
        is set before the worker's `forget`, so one of the two always sees the other)."""
        with self._lock:
            if seq.status is not SequenceStatus.FINISHED:
                self._aborting.add(seq)

    def claim_aborts(self, holds: Callable[[Sequence], bool]) -> list[Sequence]:
        """The sequences marked for abort that the calling worker `holds`, unmarked."""
        with self._lock:
            if not self._aborting:
                return []
            claimed = [seq for seq in self._aborting if holds(seq)]
            self._aborting.difference_update(claimed)
            return claimed

    def forget(self, seq: Sequence) -> None:
        """`seq` is finished (by a worker, or reported by the engine): no abort waits for it."""
        with self._lock:
            self._aborting.discard(seq)

    @property
    def num_aborting(self) -> int:
        with self._lock:
            return len(self._aborting)

    # --- the decode side's hold -------------------------------------------------------------

    def decode_took(self) -> None:
        with self._lock:
            self._decode_held += 1

    def decode_let_go(self) -> None:
        with self._lock:
            self._decode_held -= 1

    @property
    def decode_held(self) -> int:
        with self._lock:
            return self._decode_held

    # --- failures ---------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            self._failure = exc
            self._produced.notify_all()

    def take_failure(self) -> BaseException | None:
        with self._lock:
            failure, self._failure = self._failure, None
            return failure
