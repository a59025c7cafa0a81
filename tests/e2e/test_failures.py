"""Cancellation, a killed instance and bad input: nothing is left in flight; serving goes on."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e

LONG = {
    "messages": [{"role": "user", "content": "Tell a long story."}],
    "max_tokens": 4000,
    "stream": True,
    "ignore_eos": True,
}


def _instance_health(platform: Platform, deployment: str) -> list[dict]:
    instances = platform.api("GET", f"/api/v1/instances?deployment={deployment}").json()["data"]
    return [httpx.get(f"{i['url']}/health").json() for i in instances if i["state"] == "ready"]


def test_client_disconnect_cancels_the_task(platform: Platform, chat_deployment: str) -> None:
    with httpx.Client(base_url=platform.url, timeout=30) as c:
        with c.stream(
            "POST", "/v1/chat/completions", json={**LONG, "model": chat_deployment}
        ) as reply:
            assert reply.status_code == 200
            request_id = reply.headers["x-request-id"]
            lines = reply.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
    record = platform.request_record(request_id)
    assert record["state"] == "cancelled"
    task = record["jobs"][0]["tasks"][0]
    assert task["state"] == "cancelled" and record["jobs"][0]["state"] == "cancelled"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(h["num_requests_running"] == 0 for h in _instance_health(platform, chat_deployment)):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the instance kept generating after the client left")


def _kill_mid_stream(stream: openai.Stream, pid: int) -> tuple[str | None, int]:
    """Read the stream, SIGKILLing `pid` after its fourth chunk: the request id and the
    number of content chunks received."""
    request_id, received = None, 0
    for i, chunk in enumerate(stream):
        request_id = chunk.id
        received += sum(1 for c in chunk.choices if c.delta.content)
        if i == 3:
            os.kill(pid, signal.SIGKILL)
    return request_id, received


def _replaced(platform: Platform, instance: dict) -> dict:
    """The node agent notices the death, the control plane records it and starts a replacement;
    the replacement, once ready."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        dead = platform.api("GET", f"/api/v1/instances/{instance['id']}").json()
        if dead["state"] == "failed":
            break
        time.sleep(0.3)
    assert dead["state"] == "failed", dead
    info = platform.wait_ready("victim")
    (replacement,) = [i for i in info["instances"] if i["state"] == "ready"]
    assert replacement["id"] != instance["id"]
    return replacement


def test_instance_killed_mid_stream(platform: Platform) -> None:
    """A request of two choices fails with its instance; one of one choice goes on, on the
    replacement, from the first token the client does not have."""
    info = platform.deploy("victim", replicas=1)
    (instance,) = info["instances"]
    c = openai.OpenAI(base_url=f"{platform.url}/v1", api_key="x", max_retries=0)
    two = c.chat.completions.create(
        model="victim",
        messages=LONG["messages"],
        max_tokens=4000,
        n=2,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    with pytest.raises(openai.APIError):
        _kill_mid_stream(two, instance["pid"])
    record = platform.request_record(two.response.headers["x-request-id"])
    assert record["state"] == "failed" and record["error"]
    assert record["jobs"][0]["state"] == "failed"
    assert record["jobs"][0]["tasks"][0]["state"] == "failed"
    instance = _replaced(platform, instance)

    one = c.chat.completions.create(
        model="victim",
        messages=LONG["messages"],
        max_tokens=2000,  # still generating when the kill lands
        stream=True,
        extra_body={"ignore_eos": True},
    )
    request_id, received = _kill_mid_stream(one, instance["pid"])
    assert request_id is not None and received > 4
    record = platform.request_record(request_id)
    assert (record["state"], record["completion_tokens"]) == ("succeeded", 2000), record
    tasks = [(t["kind"], t["state"], t["instance_id"]) for t in record["jobs"][0]["tasks"]]
    assert tasks[0] == ("colocated", "failed", instance["id"])
    assert [kind_state for *kind_state, _ in tasks[1:]] == [["colocated", "succeeded"]]
    replacement = _replaced(platform, instance)
    assert tasks[1][2] == replacement["id"]
    reply = c.chat.completions.create(model="victim", messages=LONG["messages"], max_tokens=3)
    assert reply.choices[0].message.content is not None
    platform.api("DELETE", "/api/v1/deployments/victim")


BAD = [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), 400),
    (json.dumps({"model": "M", "messages": []}).encode(), 400),
    (json.dumps({"model": "M", "messages": [{"role": "user", "content": ""}]}).encode(), 400),
    (json.dumps({"model": "M", "messages": "hello"}).encode(), 400),
    (json.dumps({"model": "M", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    (
        json.dumps(
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": 3}
        ).encode(),
        400,
    ),
    (
        json.dumps(
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}
        ).encode(),
        400,
    ),
    (
        json.dumps(
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}
        ).encode(),
        400,
    ),
    (
        json.dumps(
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "n": 1000}
        ).encode(),
        400,
    ),
    (
        json.dumps(
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "bogus_field": 1}
        ).encode(),
        400,
    ),
    (
        json.dumps(
            {
                "model": "M",
                "messages": [{"role": "user", "content": "x"}],
                "stop": ["a", "b", "c", "d", "e"],
            }
        ).encode(),
        400,
    ),
    (
        json.dumps(
            {"model": "M", "messages": [{"role": "user", "content": "x"}], "top_p": 0}
        ).encode(),
        400,
    ),
    (
        json.dumps(
            {"model": "M", "messages": [{"role": "user", "content": "x" * 100_000}]}
        ).encode(),
        400,
    ),
    (
        json.dumps(
            {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
        ).encode(),
        404,
    ),
    (b"{" + b'"model": "M", "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}', 400),
]


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(
    platform: Platform, chat_deployment: str
) -> None:
    with httpx.Client(base_url=platform.url, timeout=60) as c:
        for body, status in BAD:
            body = body.replace(b'"M"', json.dumps(chat_deployment).encode())
            reply = c.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
            assert reply.status_code == status, (body[:80], reply.text)
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
        ok = c.post(
            "/v1/chat/completions",
            json={
                "model": chat_deployment,
                "max_tokens": 3,
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["role"] == "assistant"
    # Nothing the bad requests touched is left in flight.
    for state in ("queued", "running"):
        left = platform.api("GET", f"/api/v1/requests?state={state}").json()["data"]
        assert left == []


def test_non_streamed_client_that_gives_up_cancels_the_task(
    platform: Platform, chat_deployment: str
) -> None:
    body = {**LONG, "stream": False, "model": chat_deployment}
    with httpx.Client(base_url=platform.url, timeout=1.5) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=body)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        (latest,) = platform.api("GET", "/api/v1/requests?limit=1").json()["data"]
        if latest["state"] == "cancelled":
            break
        time.sleep(0.2)
    assert latest["state"] == "cancelled", latest
    record = platform.request_record(latest["id"])
    assert record["jobs"][0]["tasks"][0]["state"] == "cancelled"
