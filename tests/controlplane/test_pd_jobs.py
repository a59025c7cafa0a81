"""The chat executor's PD helpers: the prompt text the router sees, the per-deployment policy
book (learned from the store in the background, never blocking a request), and what a decode
resumed after its instance died asks for."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from controlplane import wire
from controlplane.jobs.pd import PolicyBook, PolicyInputs, prompt_text, sched_request
from controlplane.jobs.pd_resume import (
    MAX_RESUMES,
    StreamProgress,
    completed_done,
    resumed_request,
    whole_done,
)
from controlplane.routing.dist_sched import RouterThresholds
from controlplane.routing.pd_heatmap import PDHeatmap, PDMeasurement, build


def test_prompt_text_of_each_input_kind() -> None:
    chat = wire.GenerateRequest(
        request_id="r",
        messages=[
            wire.ChatMessage(role="system", content="Be brief."),
            wire.ChatMessage(role="user", content="Hi"),
        ],
    )
    assert prompt_text(chat) == "<system>Be brief.<user>Hi"
    assert prompt_text(wire.GenerateRequest(request_id="r", prompt="abc")) == "abc"
    ids = wire.GenerateRequest(request_id="r", prompt_token_ids=[5, 6, 7])
    assert prompt_text(ids) == "5 6 7"
    request = sched_request(ids, prompt_text(ids))
    assert request.prompt_tokens == 3 and request.prompt_chars == 5 and request.n == 1


def _heatmap() -> PDHeatmap:
    runs = [
        PDMeasurement(1000, 10, "colocated", 2.0, 1.0),
        PDMeasurement(1000, 10, "disaggregated", 1.0, 1.0),
    ]
    return build(runs)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_book_learns_in_the_background_and_refreshes_when_stale() -> None:
    asyncio.run(_learns())


async def _learns() -> None:
    loads: list[str] = []
    history = [(400, 100, 30)] * 20

    async def load(deployment: str) -> PolicyInputs:
        loads.append(deployment)
        return PolicyInputs(_heatmap().to_json(), history)

    clock = FakeClock()
    book = PolicyBook(load, thresholds=RouterThresholds(), refresh_s=30.0, clock=clock)
    first = book.policy("d", "colocated")
    assert first.heatmap is None  # nothing learned yet: the request does not wait for SQL
    await asyncio.sleep(0)  # the background load runs
    await asyncio.sleep(0)
    learned = book.policy("d", "disaggregated")
    assert learned.heatmap is not None
    assert learned.heatmap.cell_value(1000, 10) == pytest.approx(1.0)
    assert learned.predictor.n_history == 20 and learned.default_mode == "disaggregated"
    assert learned.estimator.chars_per_token == pytest.approx(4.0)
    assert loads == ["d"]
    book.policy("d", "colocated")
    await asyncio.sleep(0)
    assert loads == ["d"]  # fresh: not reloaded
    clock.now = 31.0
    book.policy("d", "colocated")
    await asyncio.sleep(0)
    assert loads == ["d", "d"]


def test_a_failing_load_keeps_the_last_policy() -> None:
    asyncio.run(_keeps_last())


async def _keeps_last() -> None:
    fail = False

    async def load(deployment: str) -> PolicyInputs:
        if fail:
            raise RuntimeError("database down")
        return PolicyInputs(_heatmap().to_json(), [])

    book = PolicyBook(load, thresholds=RouterThresholds(), refresh_s=0.0, clock=FakeClock())
    await book.refresh("d")
    fail = True
    await book.refresh("d")
    assert book.policy("d", "colocated").heatmap is not None


def test_the_prefix_index_remembers_and_forgets_instances() -> None:
    book = PolicyBook(None, thresholds=RouterThresholds(), refresh_s=30.0, clock=FakeClock())
    text = "x" * 200
    assert book.matches("d", text) == {}
    book.remember("d", "i1", text)
    book.remember("d", "i2", text[:64])
    matches = book.matches("d", text)
    assert matches["i1"] > matches["i2"] > 0
    book.forget("d", keep={"i2"})
    assert set(book.matches("d", text)) == {"i2"}


def _progress(max_tokens: int | None, streamed: list[int]) -> StreamProgress:
    generate = wire.GenerateRequest(
        request_id="r",
        messages=[wire.ChatMessage(role="user", content="Hi")],
        sampling=wire.SamplingSpec(max_tokens=max_tokens, temperature=0.0, stop=["\n\n"]),
        kv_source=wire.KVHandle(
            transfer_id="t",
            transport="stream",
            location="http://p/kv/t",
            num_tokens=9,
            num_bytes=100,
            first_token_id=streamed[0] if streamed else 1,
            export_s=0.0,
        ),
    )
    progress = StreamProgress(generate, prompt_tokens=9)
    if streamed:
        progress.add(wire.GenerateDelta(index=0, text="ab", token_ids=streamed))
    return progress


def test_a_resumed_request_asks_for_what_the_client_does_not_have() -> None:
    progress = _progress(10, [4, 5, 6])
    resumed = resumed_request(progress)
    assert resumed.generated_token_ids == [4, 5, 6] and resumed.kv_source is None
    assert resumed.messages == progress.generate.messages
    assert resumed.sampling.max_tokens == 7 and resumed.sampling.stop == ["\n\n"]
    assert resumed.request_id == "r"
    wire.GenerateRequest.model_validate_json(resumed.model_dump_json())  # a valid request
    # Nothing streamed yet: the request as it came, computed from its prompt.
    again = resumed_request(_progress(None, []))
    assert again.generated_token_ids is None and again.sampling.max_tokens is None

    # Its done event counts the carried tokens as the answer's, not the prompt's.
    progress.num_in_prompt = 3
    done = whole_done(wire.GenerateDone(prompt_tokens=12, completion_tokens=7), progress)
    assert (done.prompt_tokens, done.completion_tokens) == (9, 10)


def test_an_answer_is_complete_at_its_finish_reason_or_max_tokens() -> None:
    progress = _progress(10, [4, 5, 6])
    assert not progress.complete(10) and not progress.complete(None)
    assert progress.complete(3)
    progress.add(wire.GenerateDelta(index=0, text="", token_ids=[2], finish_reason="stop"))
    assert progress.complete(10)
    done = completed_done(progress)
    assert (done.prompt_tokens, done.completion_tokens) == (9, 4)
    assert progress.resumable()
    progress.resumes = MAX_RESUMES
    assert not progress.resumable()


@pytest.mark.parametrize(
    "extra",
    [
        {"sampling": {"n": 2}},
        {"echo": True},
        {"prefill_only": {"transport": "shm"}},
        {"generated_token_ids": []},
    ],
)
def test_a_resumed_request_is_a_whole_single_choice_one(extra: dict[str, object]) -> None:
    body = {"request_id": "r", "prompt": "x", "generated_token_ids": [1, 2], **extra}
    with pytest.raises(ValidationError):
        wire.GenerateRequest.model_validate(body)
