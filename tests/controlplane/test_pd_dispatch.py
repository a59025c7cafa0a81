"""The chat executor's PD dispatch (jobs/chat.py) against real FlowServe instances: uvicorn on
loopback in this process, each behind `Faults`, which breaks it the ways a process breaks.

A decode instance whose stream breaks mid-answer is resumed on another instance with no token
repeated and the greedy answer unchanged, at most `MAX_RESUMES` times; K/V whose fetch
times out are recomputed on the decode instance; a prefill that never answers hits the
executor's prefill timeout and the request still succeeds; a cancel during the prefill leaves
every record terminal and nothing claimed or running."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_instances import Instance, no_faults, running

from controlplane import wire
from controlplane.db import store
from controlplane.db.recorder import Recorder
from controlplane.db.session import Database
from controlplane.errors import UpstreamFailed
from controlplane.jobs.chat import ChatExecutor
from controlplane.jobs.chat_run import ChatRun, ChatSpec, new_id
from controlplane.jobs.pd_resume import MAX_RESUMES
from controlplane.registry import ReadyInstance, Registry
from controlplane.states import RequestKind
from dataplane.flowserve.kv_transfer import KVTransferConfig
from dataplane.modelstore import create_random

pytestmark = pytest.mark.slow

GREEDY = wire.SamplingSpec(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPT = "Once upon a time, in a land far away, there lived"
KV_FETCH_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Instance]]:
    """A prefill instance on node n1 and two decode instances on node n2 (K/V over `stream`,
    which a hung server can hold), the decode side fetching with a short timeout."""
    model = create_random(tmp_path_factory.mktemp("models") / "tiny", "tiny")
    kv = KVTransferConfig(tmp_path_factory.mktemp("kv"), fetch_timeout_s=KV_FETCH_TIMEOUT_S)
    started = {
        "p1": Instance(model, "prefill", kv),
        "d1": Instance(model, "decode", kv),
        "d2": Instance(model, "decode", kv),
    }
    with running(started):
        yield started


@pytest.fixture
def fresh(instances: dict[str, Instance]) -> Iterator[dict[str, Instance]]:
    with no_faults(instances):
        yield instances


NODES = {"p1": "n1", "d1": "n2", "d2": "n2"}


@dataclass
class Platform:
    """The executor as the control plane builds it, routing one disaggregated deployment."""

    executor: ChatExecutor
    registry: Registry
    recorder: Recorder
    db: Database

    async def request(
        self, generate: wire.GenerateRequest | None = None
    ) -> tuple[ChatRun, list[int], str]:
        """Run one greedy completion to its end: the run, the token ids and text received."""
        generate = generate or greedy_request()
        run = await self.executor.start(ChatSpec("d", RequestKind.COMPLETION, generate))
        token_ids: list[int] = []
        texts: list[str] = []
        try:
            async for event in run.events():
                if isinstance(event, wire.GenerateDelta):
                    token_ids += event.token_ids
                    texts.append(event.text)
        except UpstreamFailed as exc:
            run.fail(exc.message)
            raise
        finally:
            await run.close()
        return run, token_ids, "".join(texts)

    async def record(self, request_id: str) -> wire.RequestInfo:
        await self.recorder.flush()
        return await self.db.run(lambda s: store.get_request(s, request_id))


async def _platform(
    tmp_path: Path, instances: dict[str, Instance], **executor: Any
) -> tuple[Platform, httpx.AsyncClient]:
    db = Database(f"sqlite:///{tmp_path / 'deepflow.db'}")
    db.migrate()
    registry = Registry()
    await registry.set_deployments({"d": "tiny"}, {"d": "disaggregated"})
    await registry.set_ready(
        [
            ReadyInstance(name, "d", NODES[name], inst.url, role=name_role(name))
            for name, inst in instances.items()
        ]
    )
    recorder = Recorder(db.sessions, clock=time.time)
    http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=30.0))
    settings: dict[str, Any] = {"dispatch_timeout_s": 2.0, "max_inflight_requests": 16}
    chat = ChatExecutor(
        registry=registry, recorder=recorder, http=http, clock=time.time, **settings | executor
    )
    return Platform(chat, registry, recorder, db), http


def name_role(name: str) -> str:
    return "prefill" if name.startswith("p") else "decode"


def greedy_request() -> wire.GenerateRequest:
    return wire.GenerateRequest(request_id=new_id("cmpl"), prompt=PROMPT, sampling=GREEDY)


def colocated_answer(instance: Instance) -> tuple[list[int], str]:
    """The greedy answer of one instance running the whole request. Each of its deltas holds
    one token (the tests count tokens by the lines the instance sends)."""
    body = greedy_request().model_dump_json()
    reply = httpx.post(f"{instance.url}/generate", content=body, timeout=60)
    assert reply.status_code == 200, reply.text
    deltas = [json.loads(line) for line in reply.text.splitlines() if '"delta"' in line]
    assert all(len(d["token_ids"]) == 1 for d in deltas)
    return [t for d in deltas for t in d["token_ids"]], "".join(d["text"] for d in deltas)


def scenario(
    tmp_path: Path,
    instances: dict[str, Instance],
    body: Callable[[Platform], Awaitable[None]],
    **executor: Any,
) -> None:
    async def run() -> None:
        platform, http = await _platform(tmp_path, instances, **executor)
        try:
            await body(platform)
            assert all(platform.registry.inflight_on(name) == 0 for name in instances)
        finally:
            await http.aclose()
            platform.db.dispose()

    asyncio.run(run())


def test_a_decode_that_dies_mid_stream_is_resumed_on_another_instance(
    tmp_path: Path, fresh: dict[str, Instance]
) -> None:
    expected_ids, expected_text = colocated_answer(fresh["d1"])
    fresh["d1"].faults.die_after_lines = 5
    fresh["d2"].faults.die_after_lines = 5

    async def body(platform: Platform) -> None:
        run, token_ids, text = await platform.request()
        # d1 (the least loaded decode instance) died after 5 tokens, d2 after 5 more, and the
        # prefill instance, the last one left that can decode, finished the answer.
        assert (token_ids, text) == (expected_ids, expected_text)
        assert run.usage is not None
        assert run.usage.completion_tokens == len(expected_ids) == GREEDY.max_tokens
        info = await platform.record(run.id)
        assert (info.state, info.completion_tokens) == ("succeeded", GREEDY.max_tokens)
        assert info.prompt_tokens == run.usage.prompt_tokens
        (job,) = info.jobs
        tasks = [(t.kind, t.state, t.instance_id) for t in job.tasks]
        assert tasks == [
            ("prefill", "succeeded", "p1"),
            ("decode", "failed", "d1"),
            ("decode", "failed", "d2"),
            ("decode", "succeeded", "p1"),
        ]
        first, second, third = job.tasks[1:]
        assert first.error == "instance d1 failed mid-request: RemoteProtocolError"
        assert second.kv_bytes is None and third.kv_bytes is None  # recomputed, no K/V
        assert "resumes after 5 tokens" in second.events[0].reason
        assert "the 10 tokens streamed" in third.events[1].reason

    scenario(tmp_path, fresh, body)
    assert all(inst.in_flight() == 0 for inst in fresh.values())


def test_a_decode_that_dies_before_its_first_token_is_run_again(
    tmp_path: Path, fresh: dict[str, Instance]
) -> None:
    expected = colocated_answer(fresh["d1"])
    fresh["d1"].faults.die_after_lines = 0

    async def body(platform: Platform) -> None:
        run, token_ids, text = await platform.request()
        assert (token_ids, text) == expected
        info = await platform.record(run.id)
        tasks = [(t.kind, t.state, t.instance_id) for t in info.jobs[0].tasks]
        assert tasks == [
            ("prefill", "succeeded", "p1"),
            ("decode", "failed", "d1"),
            ("decode", "succeeded", "d2"),
        ]

    scenario(tmp_path, fresh, body)


def test_resumes_are_bounded(tmp_path: Path, fresh: dict[str, Instance]) -> None:
    for inst in fresh.values():
        inst.faults.die_after_lines = 3

    async def body(platform: Platform) -> None:
        generate = greedy_request()
        with pytest.raises(UpstreamFailed) as failed:
            await platform.request(generate)
        assert failed.value.code == "instance_failed"
        info = await platform.record(generate.request_id)
        assert info.state == "failed" and info.completion_tokens == 3 * (1 + MAX_RESUMES)
        (job,) = info.jobs
        assert job.state == "failed"
        assert [(t.kind, t.state) for t in job.tasks] == [("prefill", "succeeded")] + [
            ("decode", "failed")
        ] * (1 + MAX_RESUMES)

    scenario(tmp_path, fresh, body)


def test_a_decode_that_dies_after_its_last_token_succeeds(
    tmp_path: Path, fresh: dict[str, Instance]
) -> None:
    expected_ids, _ = colocated_answer(fresh["d1"])
    fresh["d1"].faults.die_after_lines = len(expected_ids)  # every delta, not the done event

    async def body(platform: Platform) -> None:
        run, token_ids, _ = await platform.request()
        assert token_ids == expected_ids
        info = await platform.record(run.id)
        assert (info.state, info.completion_tokens) == ("succeeded", len(expected_ids))
        decode = info.jobs[0].tasks[-1]
        assert (decode.kind, decode.state, len(info.jobs[0].tasks)) == ("decode", "failed", 2)

    scenario(tmp_path, fresh, body)


def test_kv_whose_fetch_times_out_are_recomputed_on_the_decode_instance(
    tmp_path: Path, fresh: dict[str, Instance]
) -> None:
    expected = colocated_answer(fresh["d1"])
    fresh["p1"].faults.hang_kv = True

    async def body(platform: Platform) -> None:
        started = time.monotonic()
        run, token_ids, text = await platform.request()
        assert (token_ids, text) == expected
        assert time.monotonic() - started >= KV_FETCH_TIMEOUT_S
        info = await platform.record(run.id)
        prefill, decode = info.jobs[0].tasks
        assert (prefill.state, prefill.kv_transport) == ("succeeded", "stream")
        assert (decode.state, decode.kv_bytes) == ("succeeded", None)
        dispatched = [e.reason for e in decode.events if e.to_state == "dispatched"]
        assert "recomputes the prompt" in dispatched[0] and "took over" in dispatched[0]

    scenario(tmp_path, fresh, body)


def test_a_hung_prefill_hits_the_prefill_timeout_and_the_request_succeeds(
    tmp_path: Path, fresh: dict[str, Instance]
) -> None:
    expected = colocated_answer(fresh["d1"])
    fresh["p1"].faults.hang_generate = True

    async def body(platform: Platform) -> None:
        run, token_ids, text = await platform.request()
        assert (token_ids, text) == expected
        info = await platform.record(run.id)
        assert info.state == "succeeded"
        prefill, whole = info.jobs[0].tasks
        assert (prefill.kind, prefill.state) == ("prefill", "failed")
        assert prefill.error is not None and "took longer than 0.5 s" in prefill.error
        # No prefill instance left for it: a decode instance runs the request whole.
        assert (whole.kind, whole.state, whole.instance_id) == ("colocated", "succeeded", "d1")

    scenario(tmp_path, fresh, body, prefill_timeout_s=0.5)
    assert fresh["p1"].in_flight() == 0  # the timeout dropped the stream: the prefill aborted


def test_a_cancel_during_the_prefill_ends_every_record(
    tmp_path: Path, fresh: dict[str, Instance]
) -> None:
    fresh["p1"].faults.hang_generate = True

    async def body(platform: Platform) -> None:
        generate = greedy_request()
        spec = ChatSpec("d", RequestKind.COMPLETION, generate)
        start = asyncio.create_task(platform.executor.start(spec))
        while fresh["p1"].faults.generate_calls == 0:
            await asyncio.sleep(0.01)
        assert platform.registry.inflight_on("p1") == platform.registry.inflight_on("d1") == 1
        start.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await start
        info = await platform.record(generate.request_id)
        assert (info.state, info.jobs[0].state) == ("cancelled", "cancelled")
        assert [(t.kind, t.state) for t in info.jobs[0].tasks] == [("prefill", "cancelled")]
        assert platform.registry.inflight_requests == 0

    fresh["p1"].faults.generate_calls = 0
    scenario(tmp_path, fresh, body, prefill_timeout_s=30.0)
    assert fresh["p1"].in_flight() == 0
