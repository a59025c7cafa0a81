"""The scheduler: chunked prefill, prefix-cache hits, preemption by recompute, priorities,
rejection, and a randomized run whose block accounting and KV contents are checked every step."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from pool_checks import check_pool

from dataplane.flowserve.block_manager import BlockManager
from dataplane.flowserve.errors import ConfigError, InvalidRequest, PromptTooLong
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.scheduler import ScheduledBatch, Scheduler
from dataplane.flowserve.sequence import Sequence, SequenceStatus


def make_seq(
    request_id: str, tokens: list[int], *, priority: int = 0, max_tokens: int = 16
) -> Sequence:
    seq = Sequence(request_id, list(tokens), SamplingParams(), torch.Generator(), max_tokens)
    seq.priority = priority
    return seq


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 16,
    *,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 256,
    max_model_len: int = 1024,
) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, block_size),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
    )


def step(
    scheduler: Scheduler, next_token: Callable[[Sequence], int] = lambda seq: 7
) -> ScheduledBatch:
    """One engine step without a model: schedule, 'sample', postprocess, finish at max_tokens."""
    batch = scheduler.schedule()
    sampled = [next_token(seq) for seq in batch.sampling_seqs]
    scheduler.postprocess(batch, sampled)
    for seq in batch.sampling_seqs:
        if seq.num_output_tokens >= seq.max_tokens:
            scheduler.finish(seq)
    return batch


def chunks(batch: ScheduledBatch) -> list[tuple[str, int, int, bool]]:
    return [(s.seq.request_id, s.start, s.num_new_tokens, s.samples) for s in batch.seqs]


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        make_scheduler(max_num_seqs=0)
    with pytest.raises(ConfigError, match="at least max_num_seqs"):
        make_scheduler(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ConfigError):
        make_scheduler(max_model_len=0)


def test_chunked_prefill_splits_under_the_budget_and_samples_on_the_last_chunk() -> None:
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=32)
    seq = make_seq("a", list(range(100)), max_tokens=3)
    scheduler.add(seq)
    expected = [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True)]
    for start, num_new, samples in expected:
        batch = step(scheduler)
        assert chunks(batch) == [("a", start, num_new, samples)]
        assert batch.num_batched_tokens == num_new
    assert seq.output_token_ids == [7] and seq.num_computed_tokens == 100
    assert chunks(step(scheduler)) == [("a", 100, 1, True)]  # then decode, one token a step
    assert len(seq.block_table) == 7


def test_decodes_come_first_and_prefills_share_the_rest_of_the_budget() -> None:
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=32)
    scheduler.add(make_seq("short", list(range(10))))
    step(scheduler)
    scheduler.add(make_seq("long", list(range(100, 200))))
    scheduler.add(make_seq("next", list(range(5))))
    assert chunks(step(scheduler)) == [("short", 10, 1, True), ("long", 0, 31, False)]
    assert chunks(step(scheduler)) == [("short", 11, 1, True), ("long", 31, 31, False)]


def test_prefix_cache_hit_reduces_the_tokens_to_compute() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=256)
    shared = list(range(1000, 1064))  # 4 blocks of 16
    first = make_seq("a", shared + list(range(16)), max_tokens=1)
    scheduler.add(first)
    step(scheduler)
    assert first.status is SequenceStatus.FINISHED  # its blocks stay cached, evictable

    second = make_seq("b", shared + list(range(50, 70)), max_tokens=1)
    scheduler.add(second)
    assert chunks(step(scheduler)) == [("b", 64, 20, True)]
    assert second.num_cached_tokens == 64
    manager = scheduler.block_manager
    assert manager.prefix_cache_hits == 64
    assert manager.prefix_cache_queries == 80 + 84
    assert manager.num_free_blocks == manager.num_blocks


def test_prefix_hits_do_not_count_against_the_budget() -> None:
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=16)
    prompt = list(range(64))
    scheduler.add(make_seq("a", prompt, max_tokens=1))
    for _ in range(4):
        step(scheduler)
    scheduler.add(make_seq("b", prompt + [1, 2], max_tokens=1))
    assert chunks(step(scheduler)) == [("b", 64, 2, True)]


def test_preemption_by_recompute_and_the_preempted_sequence_completes() -> None:
    # 4 blocks of 4 tokens; two 7-token prompts take 2 blocks each, the pool is full.
    scheduler = make_scheduler(4, 4, max_num_seqs=2, max_num_batched_tokens=16)
    early = make_seq("early", list(range(7)), max_tokens=4)
    late = make_seq("late", list(range(50, 57)), max_tokens=4)
    scheduler.add(early)
    scheduler.add(late)
    assert chunks(step(scheduler)) == [("early", 0, 7, True), ("late", 0, 7, True)]
    step(scheduler)  # both write position 7, the last slot of their second block
    assert late.num_output_tokens == 2

    batch = step(scheduler)  # both need a third block: the later arrival gives way
    assert batch.preempted == [late]
    assert chunks(batch) == [("early", 8, 1, True)]
    assert late.status is SequenceStatus.WAITING and list(scheduler.waiting) == [late]
    assert late.block_table == [] and late.num_computed_tokens == 0
    assert late.output_token_ids == [7, 7]  # output is kept: it is recomputed, not lost

    step(scheduler)
    assert early.status is SequenceStatus.FINISHED
    # Prompt + output are re-prefilled. Of late's two sealed blocks the tail was evicted for
    # early's third block; the head is still cached.
    batch = step(scheduler)
    assert chunks(batch) == [("late", 4, 5, True)]
    assert late.num_cached_tokens == 4
    while scheduler.has_unfinished():
        step(scheduler)
    assert late.status is SequenceStatus.FINISHED and late.num_output_tokens == 4
    assert scheduler.block_manager.num_free_blocks == 4


def test_no_admission_in_a_step_that_preempted() -> None:
    scheduler = make_scheduler(4, 4, max_num_seqs=4, max_num_batched_tokens=16)
    a = make_seq("a", list(range(7)))
    b = make_seq("b", list(range(20, 27)))
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    step(scheduler)
    scheduler.add(make_seq("c", [1]))
    batch = step(scheduler)
    assert batch.preempted == [b] and chunks(batch) == [("a", 8, 1, True)]
    assert [s.request_id for s in scheduler.waiting] == ["b", "c"]


def test_a_sequence_can_preempt_itself() -> None:
    scheduler = make_scheduler(3, 4, max_num_seqs=2, max_num_batched_tokens=16)
    first = make_seq("first", list(range(7)), priority=0)
    second = make_seq("second", [1, 2, 3], priority=0)
    scheduler.add(first)
    scheduler.add(second)
    step(scheduler)
    step(scheduler)  # first: 8 tokens computed, 2 blocks; second: 4 tokens, 1 block
    batch = step(scheduler)  # first needs a 3rd block while second's decode fits
    assert batch.preempted == [second] and chunks(batch) == [("first", 8, 1, True)]


def test_waiting_order_is_priority_then_arrival() -> None:
    scheduler = make_scheduler(max_num_seqs=1, max_num_batched_tokens=64)
    for request_id, priority in [("p2", 2), ("p0", 0), ("p1-early", 1), ("p1-late", 1)]:
        scheduler.add(make_seq(request_id, [1, 2, 3], priority=priority, max_tokens=1))
    order = [step(scheduler).seqs[0].seq.request_id for _ in range(4)]
    assert order == ["p0", "p1-early", "p1-late", "p2"]


def test_the_least_important_running_sequence_is_preempted_first() -> None:
    scheduler = make_scheduler(4, 4, max_num_seqs=2, max_num_batched_tokens=16)
    background = make_seq("background", list(range(7)), priority=5)
    scheduler.add(background)
    step(scheduler)
    urgent = make_seq("urgent", list(range(50, 57)), priority=0)
    scheduler.add(urgent)
    step(scheduler)  # background decodes, urgent prefills: pool full
    batch = step(scheduler)  # background needs a third block
    assert batch.preempted == [background]  # despite arriving first
    assert [s.seq.request_id for s in batch.seqs] == ["urgent"]


def test_prompts_that_can_never_fit_are_rejected_at_add() -> None:
    scheduler = make_scheduler(4, 4, max_model_len=20)
    with pytest.raises(PromptTooLong, match="maximum context length is 20 tokens"):
        scheduler.add(make_seq("long", list(range(21))))
    with pytest.raises(InvalidRequest, match="KV cache holds at most 16 tokens") as info:
        scheduler.add(make_seq("big", list(range(17))))
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest, match="empty"):
        scheduler.add(make_seq("empty", []))
    assert not scheduler.has_unfinished()


def test_a_sequence_that_outgrows_the_pool_is_rejected() -> None:
    scheduler = make_scheduler(2, 4, max_model_len=100, max_num_batched_tokens=16)
    seq = make_seq("grows", list(range(6)), max_tokens=50)
    scheduler.add(seq)
    for _ in range(3):
        assert not step(scheduler).rejected
    batch = step(scheduler)  # position 8 would need a third block
    assert batch.rejected == [(seq, "the sequence outgrew the KV cache at 9 tokens")]
    assert batch.seqs == [] and seq.status is SequenceStatus.FINISHED
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == 2


def test_a_waiting_sequence_that_can_no_longer_fit_is_rejected() -> None:
    scheduler = make_scheduler(2, 4, max_num_seqs=1, max_num_batched_tokens=16)
    parent = make_seq("parent", list(range(8)), max_tokens=4)
    scheduler.add(parent)
    step(scheduler)  # 8 tokens computed, 9 held: the pool's limit
    child = make_seq("child", parent.prompt_token_ids)
    child.output_token_ids = list(parent.output_token_ids)
    scheduler.fork(parent, child)  # no room to run: it waits
    assert child.status is SequenceStatus.WAITING
    batch = step(scheduler)
    assert [(s.request_id, reason) for s, reason in batch.rejected] == [
        ("parent", "the sequence outgrew the KV cache at 9 tokens"),
        ("child", "the sequence outgrew the KV cache at 9 tokens"),
    ]
    assert not scheduler.has_unfinished() and scheduler.block_manager.num_free_blocks == 2


def test_max_num_seqs_is_respected() -> None:
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(5):
        scheduler.add(make_seq(f"s{i}", [i, i + 1], max_tokens=2))
    batch = step(scheduler)
    assert [s.seq.request_id for s in batch.seqs] == ["s0", "s1"]
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 3
    assert [s.seq.request_id for s in step(scheduler).seqs] == ["s0", "s1"]
    assert [s.seq.request_id for s in step(scheduler).seqs] == ["s2", "s3"]


def test_abort_frees_blocks_at_once() -> None:
    scheduler = make_scheduler(8, 4, max_num_seqs=1)
    running = make_seq("running", list(range(9)))
    waiting = make_seq("waiting", [1, 2])
    scheduler.add(running)
    scheduler.add(waiting)
    batch = scheduler.schedule()
    assert scheduler.block_manager.num_free_blocks == 5
    assert scheduler.abort("running") is running
    assert running.status is SequenceStatus.FINISHED and running.finish_reason == "abort"
    assert scheduler.block_manager.num_free_blocks == 8
    scheduler.postprocess(batch, [3])  # a step that was in flight ignores the aborted sequence
    assert running.output_token_ids == [] and running.block_table == []
    assert scheduler.abort("waiting") is waiting
    assert scheduler.abort("unknown") is None
    assert not scheduler.has_unfinished()


def test_postprocess_wants_one_token_per_sampling_sequence() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_seq("a", [1, 2, 3]))
    batch = scheduler.schedule()
    with pytest.raises(ValueError, match="2 sampled tokens for 1 sampling sequences"):
        scheduler.postprocess(batch, [1, 2])


def test_fork_shares_the_prompt_and_copies_the_partial_block() -> None:
    scheduler = make_scheduler(8, 4)
    parent = make_seq("parent", list(range(6)), max_tokens=2)
    scheduler.add(parent)
    step(scheduler, lambda seq: 40)
    child = make_seq("child", list(range(6)), max_tokens=2)
    child.output_token_ids.append(41)  # the child's own first sample
    scheduler.fork(parent, child)
    assert child.status is SequenceStatus.RUNNING and child.block_table == parent.block_table
    shared_tail = parent.block_table[1]
    batch = scheduler.schedule()
    assert chunks(batch) == [("parent", 6, 1, True), ("child", 6, 1, True)]
    # The parent writes first, into a copy; the child then owns the original alone.
    assert batch.copies == [(shared_tail, parent.block_table[1])]
    assert child.block_table[1] == shared_tail and parent.block_table[0] == child.block_table[0]
    scheduler.postprocess(batch, [42, 43])
    scheduler.finish(parent)
    scheduler.finish(child)
    assert scheduler.block_manager.num_free_blocks == 8


# --- a randomized run -----------------------------------------------------------------------------


class FakeKV:
    """The KV cache as token ids: a forward writes each new token at its slot, and the test reads
    back every scheduled sequence's whole context through its block table."""

    def __init__(self, manager: BlockManager) -> None:
        self.manager = manager
        self.slots: list[int | None] = [None] * (manager.num_blocks * manager.block_size)

    def run(self, batch: ScheduledBatch) -> None:
        size = self.manager.block_size
        sources = [self.slots[src * size : (src + 1) * size] for src, _ in batch.copies]
        dsts = [dst for _, dst in batch.copies]
        assert len(set(dsts)) == len(dsts)
        for dst, content in zip(dsts, sources, strict=True):  # gather all, then scatter
            self.slots[dst * size : (dst + 1) * size] = content
        written: set[int] = set()
        for item in batch.seqs:
            tokens = item.seq.all_token_ids
            for position in range(item.start, item.start + item.num_new_tokens):
                slot = self.manager.slot(item.seq, position)
                assert slot not in written, "two sequences write one slot"
                written.add(slot)
                self.slots[slot] = tokens[position]
        for item in batch.seqs:
            tokens = item.seq.all_token_ids
            context = item.start + item.num_new_tokens
            seen = [self.slots[self.manager.slot(item.seq, p)] for p in range(context)]
            assert seen == tokens[:context], f"{item.seq.request_id} reads a wrong context"


def check_batch(scheduler: Scheduler, batch: ScheduledBatch) -> None:
    manager = scheduler.block_manager
    assert batch.num_batched_tokens == sum(s.num_new_tokens for s in batch.seqs)
    assert batch.num_batched_tokens <= scheduler.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.max_num_seqs
    assert len({id(s.seq) for s in batch.seqs}) == len(batch.seqs)
    for item in batch.seqs:
        seq = item.seq
        assert seq.status is SequenceStatus.RUNNING and seq in scheduler.running
        assert item.start == seq.num_computed_tokens and item.num_new_tokens >= 1
        assert item.samples == (item.start + item.num_new_tokens == seq.num_tokens)
        assert len(seq.block_table) == manager.blocks_needed(item.start + item.num_new_tokens)
    for seq in batch.preempted:
        assert seq in scheduler.waiting and seq.block_table == [] and seq.num_computed_tokens == 0
    for seq, _ in batch.rejected:
        assert seq.status is SequenceStatus.FINISHED and seq.block_table == []
    ranks = [(s.priority, s.arrival) for s in scheduler.waiting]
    assert ranks == sorted(ranks)
    for seq in scheduler.waiting:
        assert seq.block_table == [] and seq.status is SequenceStatus.WAITING
    check_pool(manager, list(scheduler.running) + list(scheduler.waiting))


def simulate(seed: int) -> tuple[int, int, int, int]:
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    num_blocks = rng.randint(4, 24)
    max_num_seqs = rng.randint(1, 6)
    scheduler = Scheduler(
        BlockManager(num_blocks, block_size),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=rng.randint(max_num_seqs, 48),
        max_model_len=rng.randint(8, 80),  # sometimes past what the pool holds
    )
    kv = FakeKV(scheduler.block_manager)
    prefixes = [[rng.randrange(5) for _ in range(rng.randint(0, 24))] for _ in range(3)]
    live: dict[str, Sequence] = {}
    preemptions = copies = rejections = 0
    for number in range(5000):  # arrivals for 250 steps, then a drain that must end
        arriving = number < 250
        if arriving and rng.random() < 0.3:
            prompt = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randint(1, 20))]
            seq = make_seq(
                f"r{number}", prompt, priority=rng.randrange(3), max_tokens=rng.randint(1, 12)
            )
            try:
                scheduler.add(seq)
                live[seq.request_id] = seq
            except InvalidRequest:
                pass
        if arriving and live and rng.random() < 0.04:
            aborted = scheduler.abort(rng.choice(sorted(live)))
            if aborted is not None:
                del live[aborted.request_id]
        decoding = [s for s in scheduler.running if s.num_uncomputed_tokens == 1]
        if arriving and decoding and rng.random() < 0.1:
            parent = rng.choice(decoding)
            child = make_seq(f"r{number}-fork", parent.prompt_token_ids, max_tokens=4)
            child.output_token_ids = list(parent.output_token_ids)
            child.priority = parent.priority
            scheduler.fork(parent, child)
            live[child.request_id] = child

        batch = scheduler.schedule()
        check_batch(scheduler, batch)
        preemptions += len(batch.preempted)
        copies += len(batch.copies)
        rejections += len(batch.rejected)
        for seq, _ in batch.rejected:
            del live[seq.request_id]
        kv.run(batch)
        sampled = [rng.randrange(5) for _ in batch.sampling_seqs]
        scheduler.postprocess(batch, sampled)
        for seq in batch.sampling_seqs:
            if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= 80:
                scheduler.finish(seq)
                del live[seq.request_id]
        check_pool(scheduler.block_manager, list(scheduler.running) + list(scheduler.waiting))
        if not arriving and not scheduler.has_unfinished():
            break
    assert not scheduler.has_unfinished() and not live, "the run did not drain"
    manager = scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks and manager.usage == 0.0
    assert all(block.ref_count == 0 for block in manager.blocks)
    check_pool(manager, [])
    return preemptions, manager.prefix_cache_hits, copies, rejections


def test_randomized_runs_keep_exact_block_accounting() -> None:
    totals = [sum(counts) for counts in zip(*(simulate(seed) for seed in range(60)), strict=True)]
    preemptions, prefix_cache_hits, copies, rejections = totals
    # The runs must exercise what they check.
    assert preemptions > 100 and prefix_cache_hits > 5000 and copies > 50 and rejections > 20
