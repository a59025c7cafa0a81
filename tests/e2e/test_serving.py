"""Chat through the real platform: openai client -> control plane -> instance, and the records."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Say something about the sea."}]


def client(platform: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{platform.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_deployments(platform: Platform, chat_deployment: str) -> None:
    ids = [m.id for m in client(platform).models.list().data]
    assert chat_deployment in ids


def test_chat_non_streamed_with_usage_and_records(platform: Platform, chat_deployment: str) -> None:
    reply = client(platform).chat.completions.create(
        model=chat_deployment,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8

    record = platform.request_record(reply.id)
    assert record["state"] == "succeeded" and record["kind"] == "chat.completion"
    assert record["completion_tokens"] == 8
    (job,) = record["jobs"]
    (task,) = job["tasks"]
    assert job["kind"] == "chat" and job["state"] == "succeeded"
    assert task["kind"] == "colocated" and task["state"] == "succeeded"
    assert task["instance_id"] and task["node_id"] and task["started_at"]
    assert [e["to_state"] for e in record["events"]] == ["queued", "running", "succeeded"]
    assert [e["to_state"] for e in task["events"]] == [
        "pending",
        "dispatched",
        "running",
        "succeeded",
    ]


def test_chat_streamed_with_include_usage(platform: Platform, chat_deployment: str) -> None:
    stream = client(platform).chat.completions.create(
        model=chat_deployment,
        messages=MESSAGES,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        seed=7,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    again = client(platform).chat.completions.create(
        model=chat_deployment,
        messages=MESSAGES,
        max_tokens=6,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert again.choices[0].message.content == text  # same seed, same answer


def test_n_stop_and_completions(platform: Platform, chat_deployment: str) -> None:
    c = client(platform)
    reply = c.chat.completions.create(
        model=chat_deployment,
        messages=MESSAGES,
        max_tokens=5,
        n=3,
        seed=1,
        extra_body={"ignore_eos": True},
    )
    assert sorted(ch.index for ch in reply.choices) == [0, 1, 2]
    assert reply.usage.completion_tokens == 15
    base = c.completions.create(
        model=chat_deployment,
        prompt="The sea is",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert base.object == "text_completion" and base.choices[0].text
    text = base.choices[0].text
    stop = text.strip()[:2] if text.strip() else None
    if stop:
        cut = c.completions.create(
            model=chat_deployment,
            prompt="The sea is",
            max_tokens=12,
            temperature=0,
            stop=[stop],
            extra_body={"ignore_eos": True},
        )
        assert cut.choices[0].finish_reason == "stop"
        assert stop not in cut.choices[0].text
        assert text.startswith(cut.choices[0].text)
    streamed = c.completions.create(
        model=chat_deployment,
        prompt="The sea is",
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == text


def test_logprobs(platform: Platform, chat_deployment: str) -> None:
    reply = client(platform).chat.completions.create(
        model=chat_deployment,
        messages=MESSAGES,
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
