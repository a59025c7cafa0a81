"""Which tokens each step computes: continuous batching with chunked prefill and preemption.

The whole state is two deques. `waiting` is kept ordered by (priority, arrival): lower priority
values first, as in vLLM, and first come first served among equals. `running` is in admission order.

Each `schedule()`, under `max_num_batched_tokens` tokens and `max_num_seqs` sequences:

1. running sequences that decode get one token each;
2. running sequences still (re)prefilling get their next chunk, as much as the budget leaves;
3. if nobody had to be preempted, waiting sequences are admitted in order, each with a first
   chunk (prefix-cache hits are free: they reduce what is left to compute). The head of `waiting`
   that does not fit blocks the ones behind it, so that a long prompt is not starved by short ones.
   A sequence that arrives with its prompt's K/V (PD disaggregation) is admitted with blocks for
   its prompt and computes nothing this step: the batch lists it in `imports`, for the engine to
   write the K/V in; it decodes from the next step on.

When a running sequence cannot get its blocks, the running sequence with the largest
(priority, arrival) - the least important, latest arrived, possibly itself - is preempted by
recompute: its blocks are freed and it waits again, keeping its output; readmitted, it re-prefills
prompt + output so far (mostly prefix-cache hits if its blocks were not evicted meanwhile).

The scheduler is owned by one thread; it holds the block manager's lock during each call so that
another worker sharing the pool cannot slip between a check and its act.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from itertools import count

from dataplane.flowserve.block_manager import BlockManager
from dataplane.flowserve.errors import ConfigError, InvalidRequest, PromptTooLong
from dataplane.flowserve.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    """Compute the K/V of `seq.all_token_ids[start:start + num_new_tokens]`; when `samples`, that
    chunk reaches the sequence's last token and a token is sampled from its logits.

    Not frozen, though nothing changes it: a frozen dataclass's `__init__` costs ~0.8 us against
    ~0.2 us, and every step makes one per running sequence."""

    seq: Sequence
    start: int
    num_new_tokens: int
    samples: bool


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks, in order
    preempted: list[Sequence] = field(default_factory=list)  # back in waiting, blocks freed
    rejected: list[tuple[Sequence, str]] = field(default_factory=list)  # finished: can never fit
    num_batched_tokens: int = 0
    # Admitted with imported K/V: write each one's `imported_kv` into its blocks (past its
    # prefix-cache hits) before this batch's forward pass. They compute nothing this step.
    imports: list[Sequence] = field(default_factory=list)

    @property
    def sampling_seqs(self) -> list[Sequence]:
        """The sequences that sample this step, in the order `postprocess` wants their tokens."""
        return [s.seq for s in self.seqs if s.samples]


def _outgrew(num_tokens: int) -> str:
    return f"the sequence outgrew the KV cache at {num_tokens} tokens"


def _rank(seq: Sequence) -> tuple[int, int]:
    """Smaller is served first and preempted last."""
    return seq.priority, seq.arrival


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        if max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be at least 1")
        if max_num_batched_tokens < max_num_seqs:
            # Otherwise some running sequences could not even decode each step.
            raise ConfigError("max_num_batched_tokens must be at least max_num_seqs")
        if max_model_len < 1:
            raise ConfigError("max_model_len must be at least 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self._arrivals = count()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises InvalidRequest for a prompt that can never run."""
        self.check(seq)
        seq.arrival = next(self._arrivals)
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq)

    def check(self, seq: Sequence) -> None:
        """Raise InvalidRequest if `seq` can never run here. Reads only the limits, which never
        change: any thread may ask (semi-PD checks a request before handing it to its worker)."""
        num_tokens = seq.num_tokens
        if num_tokens == 0:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if num_tokens > self.max_model_len:
            raise PromptTooLong(num_tokens, self.max_model_len)
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if num_tokens > capacity:
            raise InvalidRequest(
                f"The prompt has {num_tokens} tokens but this instance's KV cache holds at most "
                f"{capacity} tokens. Please shorten it.",
                param="messages",
                code="context_length_exceeded",
            )

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start `child` (a new choice whose first tokens are `parent`'s computed ones) sharing
        `parent`'s blocks, between steps. With no room in `running` it waits instead, and the
        prefix cache serves it what `parent` has sealed."""
        child.arrival = next(self._arrivals)
        if parent.status is not SequenceStatus.RUNNING or len(self.running) >= self.max_num_seqs:
            child.status = SequenceStatus.WAITING
            self._enqueue(child)
            return
        self.block_manager.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove the sequence of `request_id` and free its blocks now; None if it is not here."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    self.finish(seq)
                    seq.finish_reason = "abort"
                    return seq
        return None

    def adopt(self, seq: Sequence) -> None:
        """Take over a sequence from another scheduler sharing the block manager (semi-PD's
        other worker): a running one joins `running` with the blocks it holds, a waiting one
        (preempted there: no blocks) rejoins `waiting` at its rank."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.append(seq)
        elif seq.status is SequenceStatus.WAITING:
            self._enqueue(seq)
        else:
            raise ValueError(f"sequence {seq.request_id} is {seq.status}: nothing to adopt")

    def release(self, seq: Sequence) -> None:
        """Hand `seq` over to another scheduler sharing the block manager: it leaves this one
        as it is, with its blocks and status."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)

    def finish(self, seq: Sequence) -> None:
        """Retire `seq` (the engine decides when, and sets `finish_reason`) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.imported_kv = None

    def schedule(self, *, max_running: int | None = None) -> ScheduledBatch:
        """`max_running`: admit no sequence past this many running, when lower than
        max_num_seqs (semi-PD's prefill worker: the instance's max_num_seqs less the sequences
        its decode worker holds)."""
        limit = self.max_num_seqs if max_running is None else min(max_running, self.max_num_seqs)
        with self.block_manager.lock:
            plan = _Plan(self.max_num_batched_tokens)
            self._schedule_running(plan)
            if not plan.preempted:
                self._admit_waiting(plan, limit)
            return plan.batch()

    def postprocess(self, batch: ScheduledBatch, sampled: Seq[int]) -> None:
        """Record a step: each scheduled chunk is now computed, and each sampling sequence gets its
        token (`sampled` is aligned with `batch.sampling_seqs`). Finishing is the caller's call."""
        num_sampling = sum(1 for s in batch.seqs if s.samples)
        if len(sampled) != num_sampling:
            raise ValueError(f"{len(sampled)} sampled tokens for {num_sampling} sampling sequences")
        tokens = iter(sampled)
        with self.block_manager.lock:
            for item in batch.seqs:
                token_id = next(tokens) if item.samples else None
                seq = item.seq
                if seq.status is not SequenceStatus.RUNNING:
                    continue  # aborted since it was scheduled
                seq.num_computed_tokens = item.start + item.num_new_tokens
                if token_id is not None:
                    seq.output_token_ids.append(token_id)
                self.block_manager.seal_full_blocks(seq)

    def advance(self, batch: ScheduledBatch) -> None:
        """Async scheduling, at launch: each scheduled chunk counts as computed (the device runs
        it before anything scheduled later), and each sampling sequence has one more pending
        token, so the next `schedule()` can already decode it. `record` lands the tokens."""
        manager = self.block_manager
        size = manager.block_size
        with manager.lock:
            for item in batch.seqs:
                seq = item.seq
                end = item.start + item.num_new_tokens
                seq.num_computed_tokens = end
                if item.samples:
                    seq.num_pending_tokens += 1
                known = len(seq.prompt_token_ids) + len(seq.output_token_ids)
                if min(end, known) // size > item.start // size:  # a block may have filled
                    manager.seal_full_blocks(seq)

    def record(self, seqs: Seq[Sequence], token_ids: Seq[int]) -> None:
        """Async scheduling, once read: each sequence's oldest pending token is its token in
        `token_ids`. Finished (aborted) sequences drop it; preempted ones keep it for their
        recompute. One call per landed batch: it runs for every sequence every step."""
        manager = self.block_manager
        size = manager.block_size
        finished, running = SequenceStatus.FINISHED, SequenceStatus.RUNNING
        for seq, token_id in zip(seqs, token_ids, strict=True):
            seq.num_pending_tokens -= 1
            status = seq.status
            if status is finished:
                continue
            output = seq.output_token_ids
            output.append(token_id)
            # Only a token that completes a block can make one sealable.
            if status is running and (len(seq.prompt_token_ids) + len(output)) % size == 0:
                with manager.lock:
                    manager.seal_full_blocks(seq)

    # --- internals -------------------------------------------------------------------------------

    def _schedule_running(self, plan: _Plan) -> None:
        # Decodes first, in running order, then the prefills' chunks. This runs for every running
        # sequence every step: one pass, each count read once. Over a snapshot of `running`,
        # which a preemption changes; a preempted sequence is no longer RUNNING and is skipped.
        prefills: list[tuple[Sequence, int]] = []
        running = SequenceStatus.RUNNING
        schedule_one = self._schedule_one
        for seq in tuple(self.running):
            if seq.status is not running:
                continue  # preempted as a victim earlier in this loop
            uncomputed = (
                len(seq.prompt_token_ids)
                + len(seq.output_token_ids)
                + seq.num_pending_tokens
                - seq.num_computed_tokens
            )
            if uncomputed == 1:
                if not schedule_one(seq, 1, plan):
                    return
            elif uncomputed > 1:
                prefills.append((seq, uncomputed))
        for seq, uncomputed in prefills:
            if seq.status is running and not schedule_one(seq, uncomputed, plan):
                return

    def _schedule_one(self, seq: Sequence, uncomputed: int, plan: _Plan) -> bool:
        """Schedule the next `uncomputed` tokens of running `seq`, or as many as the budget leaves,
        preempting when its blocks do not fit; False once the budget is spent."""
        pending = seq.num_pending_tokens
        if pending and (
            len(seq.output_token_ids) + pending >= seq.max_tokens
            or uncomputed + seq.num_computed_tokens >= self.max_model_len
        ):
            return True  # its pending token is its last: it finishes when that is read
        num_new = min(uncomputed, plan.budget)
        if num_new == 0:
            return False
        manager = self.block_manager
        start = seq.num_computed_tokens
        if manager.blocks_needed(start + num_new) > manager.num_blocks:
            self._reject(seq, plan, _outgrew(start + num_new))
            return True
        copies = manager.try_append_slots(seq, num_new)
        while copies is None:
            victim = max(self.running, key=_rank)
            self._preempt(victim, plan)
            if victim is seq:
                return True
            copies = manager.try_append_slots(seq, num_new)
        plan.add(seq, start, num_new, copies, samples=num_new == uncomputed)
        return True

    def _admit_waiting(self, plan: _Plan, max_running: int) -> None:
        manager = self.block_manager
        while self.waiting and plan.budget > 0 and len(self.running) < max_running:
            seq = self.waiting[0]
            if manager.blocks_needed(seq.num_tokens) > manager.num_blocks:
                self._reject(seq, plan, _outgrew(seq.num_tokens))  # e.g. a fork at the limit
                continue
            if seq.imported_kv is not None:
                if not self._admit_imported(seq, plan):
                    break
                continue
            num_cached = manager.cached_prefix_len(seq)
            num_tokens = num_cached + min(seq.num_tokens - num_cached, plan.budget)
            if not manager.can_allocate(seq, num_tokens):
                break
            self.waiting.popleft()
            manager.allocate(seq, num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            start = seq.num_computed_tokens
            plan.add(seq, start, num_tokens - start, [], samples=num_tokens == seq.num_tokens)

    def _admit_imported(self, seq: Sequence, plan: _Plan) -> bool:
        """Admit the head of `waiting`, whose prompt's K/V arrived ready, with blocks for its
        prompt (prefix-cache hits included); False when they do not fit now."""
        manager = self.block_manager
        num_prompt = seq.num_prompt_tokens
        if not manager.can_allocate(seq, num_prompt):
            return False
        self.waiting.popleft()
        manager.allocate(seq, num_prompt)
        seq.num_computed_tokens = num_prompt  # once the engine has written the K/V in
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        plan.imports.append(seq)
        return True

    def _preempt(self, seq: Sequence, plan: _Plan) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        plan.remove(seq)
        plan.preempted.append(seq)
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq)

    def _reject(self, seq: Sequence, plan: _Plan, reason: str) -> None:
        self.finish(seq)
        plan.remove(seq)
        plan.rejected.append((seq, reason))

    def _enqueue(self, seq: Sequence) -> None:
        """Insert into `waiting` by rank; new arrivals land at the end in O(1)."""
        key = _rank(seq)
        index = len(self.waiting)
        while index > 0 and _rank(self.waiting[index - 1]) > key:
            index -= 1
        self.waiting.insert(index, seq)


@dataclass(slots=True)
class _Plan:
    """A batch under construction; a sequence preempted later in the same step leaves it again."""

    budget: int
    items: dict[Sequence, ScheduledSeq] = field(default_factory=dict)
    copies: dict[Sequence, list[tuple[int, int]]] = field(default_factory=dict)  # the non-empty
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    rejected: list[tuple[Sequence, str]] = field(default_factory=list)
    imports: list[Sequence] = field(default_factory=list)

    def add(
        self,
        seq: Sequence,
        start: int,
        num_new: int,
        copies: list[tuple[int, int]],
        *,
        samples: bool,  # the chunk reaches the sequence's last token
    ) -> None:
        self.items[seq] = ScheduledSeq(seq, start, num_new, samples)
        if copies:
            self.copies[seq] = copies
        self.budget -= num_new
        self.num_batched_tokens += num_new

    def remove(self, seq: Sequence) -> None:
        """Unschedule `seq`, refunding its tokens; its copies go too, since its blocks are freed."""
        found = self.items.pop(seq, None)
        if found is not None:
            self.budget += found.num_new_tokens
            self.num_batched_tokens -= found.num_new_tokens
            self.copies.pop(seq, None)

    def batch(self) -> ScheduledBatch:
        # A sequence joins the plan once per step, so `copies` is in the order of `items`.
        copies = [pair for pairs in self.copies.values() for pair in pairs]
        return ScheduledBatch(
            list(self.items.values()),
            copies,
            self.preempted,
            self.rejected,
            self.num_batched_tokens,
            self.imports,
        )
