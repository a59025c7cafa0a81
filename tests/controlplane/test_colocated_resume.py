"""A colocated request whose instance dies mid-answer (jobs/chat.py, jobs/pd_resume.py), against
real FlowServe instances on loopback: the answer goes on on another instance from the first token
the client does not have, with the greedy answer and the usage an unbroken run gives; an answer
the client had in full before the done event was lost succeeds; a request of several choices is
not resumed and fails with every record terminal."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_instances import Instance, no_faults, running

from controlplane import wire
from controlplane.db import store
from controlplane.db.recorder import Recorder
from controlplane.db.session import Database
from controlplane.errors import UpstreamFailed
from controlplane.jobs.chat import ChatExecutor
from controlplane.jobs.chat_run import ChatSpec, new_id
from controlplane.registry import ReadyInstance, Registry
from controlplane.states import RequestKind
from dataplane.flowserve.kv_transfer import KVTransferConfig
from dataplane.modelstore import create_random

pytestmark = pytest.mark.slow

GREEDY = wire.SamplingSpec(max_tokens=20, temperature=0.0, ignore_eos=True)
PROMPT = "The lighthouse keeper climbed the stairs and"


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Instance]]:
    model = create_random(tmp_path_factory.mktemp("models") / "tiny", "tiny")
    kv = KVTransferConfig(tmp_path_factory.mktemp("kv"))
    with running({name: Instance(model, "colocated", kv) for name in ("c1", "c2")}) as started:
        yield started


@pytest.fixture
def fresh(instances: dict[str, Instance]) -> Iterator[dict[str, Instance]]:
    with no_faults(instances):
        yield instances


def request(n: int = 1) -> wire.GenerateRequest:
    sampling = GREEDY.model_copy(update={"n": n})
    return wire.GenerateRequest(request_id=new_id("cmpl"), prompt=PROMPT, sampling=sampling)


def unbroken(instance: Instance) -> tuple[list[int], str, int]:
    """Token ids, text and prompt tokens of the answer one instance gives alone."""
    body = request().model_dump_json()
    reply = httpx.post(f"{instance.url}/generate", content=body, timeout=60)
    assert reply.status_code == 200, reply.text
    events = [json.loads(line) for line in reply.text.splitlines() if line.strip()]
    deltas = [e for e in events if e["type"] == "delta"]
    assert all(len(d["token_ids"]) == 1 for d in deltas)  # one line per token
    ids = [t for d in deltas for t in d["token_ids"]]
    return ids, "".join(d["text"] for d in deltas), events[-1]["prompt_tokens"]


def run_one(
    tmp_path: Path, instances: dict[str, Instance], generate: wire.GenerateRequest
) -> tuple[list[int], str, wire.GenerateDone | None, wire.RequestInfo, Exception | None]:
    """One completion through the executor: tokens, text and usage received, the request's
    record, and the error the client got (if any)."""

    async def go() -> tuple[
        list[int], str, wire.GenerateDone | None, wire.RequestInfo, Exception | None
    ]:
        db = Database(f"sqlite:///{tmp_path / 'deepflow.db'}")
        db.migrate()
        registry = Registry()
        await registry.set_deployments({"c": "tiny"})
        ready = [ReadyInstance(name, "c", "n1", i.url) for name, i in instances.items()]
        await registry.set_ready(ready)
        recorder = Recorder(db.sessions, clock=time.time)
        http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=30.0))
        executor = ChatExecutor(
            registry=registry,
            recorder=recorder,
            http=http,
            clock=time.time,
            dispatch_timeout_s=2.0,
            max_inflight_requests=4,
        )
        ids: list[int] = []
        texts: list[str] = []
        error: Exception | None = None
        run = await executor.start(ChatSpec("c", RequestKind.COMPLETION, generate))
        try:
            async for event in run.events():
                if isinstance(event, wire.GenerateDelta):
                    ids += event.token_ids
                    texts.append(event.text)
        except UpstreamFailed as exc:
            run.fail(exc.message)
            error = exc
        finally:
            await run.close()
        await recorder.flush()
        info = await db.run(lambda s: store.get_request(s, generate.request_id))
        assert all(registry.inflight_on(name) == 0 for name in instances)
        await http.aclose()
        db.dispose()
        return ids, "".join(texts), run.usage, info, error

    return asyncio.run(go())


def test_an_instance_that_dies_mid_answer_is_replaced(
    tmp_path: Path, fresh: dict[str, Instance]
) -> None:
    expected_ids, expected_text, prompt_tokens = unbroken(fresh["c1"])
    fresh["c1"].faults.die_after_lines = 7  # c1, the first pick (ties go to the lowest id)
    ids, text, usage, info, error = run_one(tmp_path, fresh, request())
    assert error is None
    assert (ids, text) == (expected_ids, expected_text)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, len(expected_ids))
    assert (info.state, info.prompt_tokens, info.completion_tokens) == (
        "succeeded",
        prompt_tokens,
        len(expected_ids),
    )
    (job,) = info.jobs
    assert [(t.kind, t.state, t.instance_id) for t in job.tasks] == [
        ("colocated", "failed", "c1"),
        ("colocated", "succeeded", "c2"),
    ]
    assert job.tasks[0].error == "instance c1 failed mid-request: RemoteProtocolError"
    assert "resumes after 7 tokens" in job.tasks[1].events[0].reason
    assert all(inst.in_flight() == 0 for inst in fresh.values())


def test_an_answer_received_whole_before_the_done_event_was_lost_succeeds(
    tmp_path: Path, fresh: dict[str, Instance]
) -> None:
    expected_ids, _, prompt_tokens = unbroken(fresh["c1"])
    fresh["c1"].faults.die_after_lines = len(expected_ids)  # every delta, not the done event
    calls_before = fresh["c2"].faults.generate_calls
    ids, _, usage, info, error = run_one(tmp_path, fresh, request())
    assert error is None and ids == expected_ids
    assert usage is not None and usage.prompt_tokens == prompt_tokens
    assert (info.state, info.completion_tokens) == ("succeeded", len(expected_ids))
    assert [(t.kind, t.state) for t in info.jobs[0].tasks] == [("colocated", "failed")]
    assert fresh["c2"].faults.generate_calls == calls_before  # nothing was resumed


def test_a_request_of_several_choices_is_not_resumed(
    tmp_path: Path, fresh: dict[str, Instance]
) -> None:
    fresh["c1"].faults.die_after_lines = 3
    _, _, _, info, error = run_one(tmp_path, fresh, request(n=2))
    assert isinstance(error, UpstreamFailed)
    assert info.state == "failed"
    (job,) = info.jobs
    assert job.state == "failed"
    assert [(t.kind, t.state, t.instance_id) for t in job.tasks] == [("colocated", "failed", "c1")]
