"""semi-PD's two workers: each a thread with its own inbox, scheduler, model runner and compute
partition, stepping on its own, over one model's weights and one block manager.

    prefill worker: admits requests (chunked prefill under the token budget), computes prompts
                    (and recomputes preempted sequences), samples each one's next token, and
                    hands every sequence that goes on to the decode worker: the sequence moves
                    with its block table, no K/V is copied
    decode worker:  adopts handed-off sequences and decodes them in continuous batches; one it
                    must preempt (out of blocks) goes back to the prefill worker, which
                    recomputes it as the colocated engine does

Each iteration: take the partition assigned since the last one (`assign`), take what the inbox
holds, free the sequences the engine aborted, then one step. Every step ends with the device
idle for this worker (the sampled tokens are read, or the stream is synchronized), so whatever
it then frees, seals into the prefix cache or hands over has been written: the other worker,
on its own stream, can never read a block before it is complete or write one still being read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch

from dataplane.flowserve.engine import StepOutput
from dataplane.flowserve.model_runner import ModelRunner
from dataplane.flowserve.platform import ComputePartition, Platform
from dataplane.flowserve.prompt_kv import PendingExport, start_export
from dataplane.flowserve.sampler import Logprob, sample
from dataplane.flowserve.scheduler import ScheduledBatch, Scheduler
from dataplane.flowserve.semipd.controller import SLOController
from dataplane.flowserve.semipd.ledger import Ledger, Timing
from dataplane.flowserve.sequence import FinishReason, Sequence

log = logging.getLogger(__name__)

# An idle worker waits for its inbox or a nudge (the other worker freed blocks or slots); this
# bounds the wait should a nudge be missed.
IDLE_WAIT_S = 0.05

Outputs = list[tuple[Sequence, StepOutput]]
FinishRule = Callable[[Sequence, int], FinishReason | None]


class Phase(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class _Arrival:
    """A sequence for this worker: `new` from the engine (queued by `Scheduler.add`), else from
    the other worker (`Scheduler.adopt`: running with its blocks, or preempted)."""

    seq: Sequence
    timing: Timing
    new: bool


class Worker:
    phase: Phase

    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        *,
        ledger: Ledger,
        platform: Platform,
        partition: ComputePartition,
        finish_reason: FinishRule,
        controller: SLOController | None,
        max_num_seqs: int,
    ) -> None:
        """`max_num_seqs`: the instance's cap on running sequences, both workers together (the
        prefill worker admits against it)."""
        self.scheduler = scheduler
        self.runner = runner
        self.peer: Worker | None = None  # set once both exist
        self.num_preemptions = 0
        self.bound: ComputePartition | None = None  # the partition its iterations run on
        self.num_switches = 0
        self._ledger = ledger
        self._platform = platform
        self._finish_reason = finish_reason
        self._controller = controller
        self._max_num_seqs = max_num_seqs
        self._timing: dict[Sequence, Timing] = {}
        self._assigned = partition
        self._cond = threading.Condition()
        self._inbox: deque[_Arrival] = deque()
        self._nudged = False
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"flowserve-{self.phase}", daemon=True
        )

    # --- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def post(self, seq: Sequence, timing: Timing, *, new: bool = False) -> None:
        with self._cond:
            self._inbox.append(_Arrival(seq, timing, new))
            self._cond.notify()

    def nudge(self) -> None:
        """Something this worker waits for may have changed (blocks freed, an abort)."""
        with self._cond:
            self._nudged = True
            self._cond.notify()

    def assign(self, partition: ComputePartition) -> None:
        """Run on `partition` from the next iteration boundary on."""
        self._assigned = partition
        self.nudge()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        with self._cond:
            return len(self.scheduler.waiting) + len(self._inbox)

    @property
    def idle(self) -> bool:
        """Nothing queued, held or arriving."""
        with self._cond:
            return not self._inbox and not self.scheduler.has_unfinished()

    # --- the worker's thread ------------------------------------------------------------------

    def _run(self) -> None:
        threads_before = torch.get_num_threads()
        try:
            while True:
                try:
                    if not self._boundary():
                        return
                    assert self.bound is not None
                    with self.bound.active():
                        busy = self._step()
                except Exception as exc:  # a broken step must not take the worker down
                    log.exception("semi-PD %s worker: step failed", self.phase)
                    self._fail(exc)
                    busy = False
                if not busy:
                    self._wait()
        finally:
            # torch.set_num_threads on this thread also set the process's default for threads
            # that never set their own; give it back.
            torch.set_num_threads(threads_before)

    def _boundary(self) -> bool:
        """Between two iterations: the partition, the inbox, the aborts. False once stopping."""
        assigned = self._assigned
        if assigned is not self.bound:
            assigned.bind(self.bound)
            if self.bound is not None:
                self.num_switches += 1
            self.bound = assigned
        with self._cond:
            if self._stopping:
                return False
            arrivals, self._inbox = self._inbox, deque()
        for arrival in arrivals:
            self._timing[arrival.seq] = arrival.timing
            if arrival.new:
                self.scheduler.add(arrival.seq)
            else:
                self.scheduler.adopt(arrival.seq)
        aborted = self._ledger.claim_aborts(self._holds)
        for seq in aborted:
            self._retire(seq, "abort")
        if aborted and self.peer is not None:
            self.peer.nudge()  # their blocks (and slots) are free
        return True

    def _wait(self) -> None:
        with self._cond:
            if not self._inbox and not self._nudged and not self._stopping:
                self._cond.wait(IDLE_WAIT_S)
            self._nudged = False

    def _holds(self, seq: Sequence) -> bool:
        return seq in self._timing

    def _step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        raise NotImplementedError

    def _run_batch(
        self, batch: ScheduledBatch, exports: dict[Sequence, PendingExport] | None = None
    ) -> tuple[list[Sequence], list[int], list[Logprob | None]]:
        """Forward and sample: (the sampling sequences, their tokens, their logprobs). With
        `exports`, the prompt K/V of each prefill-only sequence that samples (PD
        disaggregation) are gathered behind the forward pass and copied to the host (or left on
        the device: `export_on_device`), into it."""
        self.runner.copy_blocks(batch.copies)
        logits = self.runner.run(batch)  # [num_sampling_seqs, vocab_size]
        sampling = batch.sampling_seqs
        if exports is not None:
            for seq in sampling:
                if seq.prefill_only:
                    started = time.perf_counter()
                    gathered = self.runner.gather_kv(seq.block_table, seq.num_prompt_tokens)
                    on_device = seq.export_on_device
                    kv, event = start_export(gathered, self._platform, on_device=on_device)
                    exports[seq] = PendingExport(kv, event, time.perf_counter() - started)
        if not sampling:
            self._sync()  # nothing was read back: wait for the chunk's K/V all the same
            self.scheduler.postprocess(batch, [])
            return [], [], []
        result = sample(logits, sampling)  # reads the tokens back: the step's host sync
        self.scheduler.postprocess(batch, result.token_ids)
        return sampling, result.token_ids, result.logprobs

    def _observe(self, seq: Sequence, now: float) -> None:
        """A token of `seq` came out at `now`: a TTFT or an inter-token sample."""
        timing = self._timing[seq]
        if self._controller is not None:
            if timing.last_token is None:
                self._controller.observe_ttft(now - timing.arrived)
            else:
                self._controller.observe_tpot([now - timing.last_token])
        timing.last_token = now

    def _rejects(self, batch: ScheduledBatch) -> Outputs:
        outputs: Outputs = []
        for seq, why in batch.rejected:
            log.warning("request %s ends early: %s", seq.request_id, why)
            self._retire(seq, "length")
            outputs.append((seq, StepOutput(seq.request_id, None, None, True, "length")))
        return outputs

    def _retire(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish `seq` here and free its blocks."""
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        self._timing.pop(seq, None)
        self._ledger.forget(seq)

    def _hand_over(self, seq: Sequence) -> None:
        """Move `seq` to the other worker, its blocks (and their K/V) with it."""
        assert self.peer is not None
        self.scheduler.release(seq)
        self.peer.post(seq, self._timing.pop(seq))

    def _sync(self) -> None:
        """Wait until what this thread launched on its stream has run."""
        event = self._platform.event()
        if event is not None:
            event.record()
            event.synchronize()

    def _fail(self, exc: Exception) -> None:
        """Free everything this worker holds; the engine raises `exc` from its next step (and
        the driver fails the requests)."""
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._retire(seq, "abort")
        self._ledger.fail(exc)


class PrefillWorker(Worker):
    phase = Phase.PREFILL

    def _step(self) -> bool:
        # The instance's max_num_seqs counts the sequences the decode worker holds.
        room = self._max_num_seqs - self._ledger.decode_held
        batch = self.scheduler.schedule(max_running=room)
        self.num_preemptions += len(batch.preempted)
        outputs = self._rejects(batch)
        handovers = self._imports(batch, outputs)
        if batch.seqs:
            exports: dict[Sequence, PendingExport] = {}
            sampling, token_ids, logprobs = self._run_batch(batch, exports)
            now = time.monotonic()
            for seq, token_id, logprob in zip(sampling, token_ids, logprobs, strict=True):
                self._observe(seq, now)
                reason = self._finish_reason(seq, token_id)
                if reason is None:
                    outputs.append((seq, StepOutput(seq.request_id, token_id, logprob)))
                    handovers.append(seq)
                    continue
                export = exports.get(seq)
                # Waited for before the blocks are freed: the other worker may take them.
                kv = export.finish(token_id, seq.prompt_token_ids) if export else None
                self._retire(seq, reason)
                out = StepOutput(seq.request_id, token_id, logprob, True, reason, kv)
                outputs.append((seq, out))
        # Emitted before the hand-over: a sequence's next tokens come from the decode worker.
        self._ledger.emit(outputs)
        for seq in handovers:
            self._ledger.decode_took()
            self._hand_over(seq)
        return bool(batch.seqs or outputs or batch.preempted)

    def _imports(self, batch: ScheduledBatch, outputs: Outputs) -> list[Sequence]:
        """Write imported K/V (PD disaggregation) into the blocks of the sequences admitted
        with them, report the token each brought, and return them for the decode worker."""
        if not batch.imports:
            return []
        took: dict[Sequence, float] = {}
        for seq in batch.imports:
            imported, seq.imported_kv = seq.imported_kv, None
            assert imported is not None
            started = time.perf_counter()
            self.runner.scatter_kv(seq.block_table, seq.num_cached_tokens, imported.kv)
            took[seq] = time.perf_counter() - started
        self._sync()  # written before the blocks are sealed or handed over
        now = time.monotonic()
        for seq, seconds in took.items():
            self.scheduler.block_manager.seal_full_blocks(seq)
            timing = self._timing[seq]
            timing.imported, timing.last_token = True, now
            token_id = seq.output_token_ids[-1]
            outputs.append((seq, StepOutput(seq.request_id, token_id, None, kv_import_s=seconds)))
        return list(batch.imports)


class DecodeWorker(Worker):
    phase = Phase.DECODE

    def _step(self) -> bool:
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        for seq in batch.preempted:  # back to the prefill worker, to recompute
            assert self.peer is not None
            self._hand_over(seq)
            self._ledger.decode_let_go()
        outputs = self._rejects(batch)
        finished = bool(batch.rejected)
        if batch.seqs:
            sampling, token_ids, logprobs = self._run_batch(batch)
            now = time.monotonic()
            intervals = []
            for seq, token_id, logprob in zip(sampling, token_ids, logprobs, strict=True):
                timing = self._timing[seq]
                if timing.last_token is not None:
                    intervals.append(now - timing.last_token)
                timing.last_token = now
                reason = self._finish_reason(seq, token_id)
                if reason is not None:
                    self._retire(seq, reason)
                    finished = True
                out = StepOutput(seq.request_id, token_id, logprob, reason is not None, reason)
                outputs.append((seq, out))
            if self._controller is not None and intervals:
                self._controller.observe_tpot(intervals)
        self._ledger.emit(outputs)
        if (finished or batch.preempted) and self.peer is not None:
            self.peer.nudge()  # blocks and slots for the prefill worker's admissions
        return bool(batch.seqs or outputs or batch.preempted)

    def _retire(self, seq: Sequence, reason: FinishReason) -> None:
        super()._retire(seq, reason)
        self._ledger.decode_let_go()
