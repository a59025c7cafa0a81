"""The driver thread against a scripted engine: routing, errors, aborts, shutdown."""

from __future__ import annotations

import queue
from typing import Any

from dataplane.flowserve.driver import EngineDriver, Event
from dataplane.flowserve.engine import EngineStats, StepOutput
from dataplane.flowserve.errors import PromptTooLong
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.stream import RequestStream
from dataplane.flowserve.token_text import TokenTexts


class LetterTokenizer:
    """Token i is the letter chr(ord('a') + i)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + t) for t in token_ids)

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.decode([token_id])


class ScriptedEngine:
    """Each running sequence emits tokens 0, 1, 2, ... and finishes with "length" after 5."""

    def __init__(self) -> None:
        self.running: dict[str, int] = {}
        self.aborted: list[str] = []
        self.pending: list[StepOutput] = []
        self.fail_next_step = False

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return 0

    def has_unfinished(self) -> bool:
        return bool(self.running or self.pending)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), 0, 0.0, 0, 0, 0)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: Any) -> None:
        if len(prompt_token_ids) > 10:
            raise PromptTooLong(len(prompt_token_ids), 10)
        self.running[request_id] = 0

    def abort_request(self, request_id: str) -> None:
        if self.running.pop(request_id, None) is not None:
            self.aborted.append(request_id)
            self.pending.append(StepOutput(request_id, None, None, True, "abort"))

    def step(self) -> list[StepOutput]:
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("device lost")
        outputs, self.pending = self.pending, []
        for request_id, n in list(self.running.items()):
            done = n == 4
            outputs.append(StepOutput(request_id, n, None, done, "length" if done else None))
            self.running[request_id] = n + 1
            if done:
                del self.running[request_id]
        return outputs


def start(engine: ScriptedEngine) -> EngineDriver:
    driver = EngineDriver(engine)  # type: ignore[arg-type]
    driver.start()
    return driver


def submit(
    driver: EngineDriver, request_id: str, prompt: list[int], *params: SamplingParams
) -> queue.SimpleQueue[Event]:
    tokenizer = LetterTokenizer()
    stream = RequestStream(
        request_id, prompt, list(params) or [SamplingParams()], tokenizer, TokenTexts(tokenizer)
    )
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    driver.submit(stream, events.put)
    return events


def drain(events: queue.SimpleQueue[Event]) -> list[Event]:
    got = [events.get(timeout=5)]
    while got[-1].type == "delta":
        got.append(events.get(timeout=5))
    return got


def test_routes_tokens_and_stops_on_a_stop_string() -> None:
    engine = ScriptedEngine()
    driver = start(engine)
    try:
        plain = submit(driver, "a", [1, 2])
        stopped = submit(driver, "b", [1], SamplingParams(), SamplingParams(stop=("cd",)))
        events = drain(plain)
        assert "".join(e.text for e in events if e.type == "delta") == "abcde"
        assert events[-1].type == "done" and events[-1].completion_tokens == 5
        events = drain(stopped)
        texts = {
            i: "".join(e.text for e in events if e.type == "delta" and e.index == i) for i in (0, 1)
        }
        assert texts == {0: "abcde", 1: "ab"}
        assert "b/1" in engine.aborted  # the stop string freed the sequence at once
        assert events[-1].type == "done" and events[-1].completion_tokens == 5 + 4
    finally:
        driver.stop()


def test_invalid_request_and_engine_failure_become_error_events() -> None:
    engine = ScriptedEngine()
    driver = start(engine)
    try:
        [error] = drain(submit(driver, "long", list(range(11))))
        assert error.type == "error" and error.code == "context_length_exceeded"
        engine.fail_next_step = True
        [error] = drain(submit(driver, "x", [1]))
        assert error.type == "error" and error.code == "engine_error"
        events = drain(submit(driver, "y", [1]))  # the thread lives on
        assert events[-1].type == "done"
    finally:
        driver.stop()


def test_abort_and_shutdown() -> None:
    engine = ScriptedEngine()
    engine.step = lambda: []  # type: ignore[method-assign]  # never progresses
    driver = start(engine)
    events = submit(driver, "stuck", [1])
    other = submit(driver, "other", [1])
    driver.abort("stuck")
    driver.abort("nobody")
    # this engine never reports the abort, so only the shutdown ends the streams
    driver.stop()
    assert not driver._thread.is_alive()
    assert engine.aborted[:1] == ["stuck/0"]
    assert drain(events)[-1].type == "error"
    error = drain(other)[-1]
    assert error.type == "error" and error.code == "shutdown"
