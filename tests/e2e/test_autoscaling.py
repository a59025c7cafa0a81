"""Autoscaling through the real processes: a burst at zero replicas loses no request, an idle
deployment goes back to zero, and scaling down drains a stream in flight before stopping it."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Say something about the sea."}]
BURST = 100


def _wait(platform: Platform, what: str, check: object, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        info = check()  # type: ignore[operator]
        if info:
            return info
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen in {timeout} s\n{platform.logs()}")


def test_a_burst_at_zero_replicas_all_succeeds_then_scales_back_to_zero(
    platform: Platform,
) -> None:
    reply = platform.api(
        "POST",
        "/api/v1/deployments",
        json={
            "name": "auto-burst",
            "model": "tiny",
            "replicas": 0,
            "max_replicas": 2,
            "downscale_delay_s": 2,
            "scale_to_zero_after_s": 2,
        },
    )
    assert reply.status_code == 201, reply.text
    assert reply.json()["replicas"] == 0 and reply.json()["ready_replicas"] == 0

    async def burst() -> list[object]:
        client = openai.AsyncOpenAI(
            base_url=f"{platform.url}/v1", api_key="unused", max_retries=0, timeout=120.0
        )
        async with client:
            calls = [
                client.chat.completions.create(
                    model="auto-burst",
                    messages=MESSAGES,  # type: ignore[arg-type]
                    max_tokens=4,
                    extra_body={"ignore_eos": True},
                )
                for _ in range(BURST)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    replies = asyncio.run(burst())
    errors = [r for r in replies if isinstance(r, BaseException)]
    assert errors == [], f"{len(errors)} of {BURST} failed: {errors[:3]}\n{platform.logs()}"
    assert all(r.usage.completion_tokens == 4 for r in replies)  # type: ignore[attr-defined]

    scaling = platform.api("GET", "/api/v1/deployments/auto-burst/scaling?limit=100").json()
    decisions = [e for e in reversed(scaling["data"]) if e["kind"] == "autoscale"]
    assert decisions[0]["from_replicas"] == 0 and decisions[0]["to_replicas"] >= 1
    assert decisions[0]["reason"].startswith("scale from zero")
    assert decisions[0]["inputs"]["waiting"] >= 1

    # Idle: down after the downscale delay, then to zero after the keep-alive, all drained.
    def at_zero() -> dict:
        info = platform.api("GET", "/api/v1/deployments/auto-burst").json()
        return info if info["replicas"] == 0 and not info["instances"] else {}

    _wait(platform, "scale to zero", at_zero)
    scaling = platform.api("GET", "/api/v1/deployments/auto-burst/scaling?limit=100").json()
    last = next(e for e in scaling["data"] if e["kind"] == "autoscale")
    assert last["to_replicas"] == 0 and "keep-alive" in last["reason"]
    platform.api("DELETE", "/api/v1/deployments/auto-burst")


def test_scale_down_drains_a_stream_in_flight(platform: Platform) -> None:
    info = platform.deploy("drain-me", replicas=1)
    (instance,) = info["instances"]
    client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="drain-me",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=1500,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = [next(chunks) for _ in range(3)]
    reply = platform.cli("scale", "drain-me", "--replicas", "0")
    assert reply.returncode == 0, reply.stderr

    def state() -> str:
        return platform.api("GET", f"/api/v1/instances/{instance['id']}").json()["state"]

    # While this stream is open the instance is draining: no new requests, not stopped.
    _wait(platform, "drain", lambda: {"ok": True} if state() == "draining" else {})
    time.sleep(1.0)
    assert state() == "draining"
    rest = list(chunks)
    usage = rest[-1].usage
    assert usage is not None and usage.completion_tokens == 1500
    finishes = [c.choices[0].finish_reason for c in first + rest if c.choices]
    assert finishes[-1] == "length"
    _wait(platform, "stop after drain", lambda: {"ok": True} if state() == "stopped" else {})
    platform.api("DELETE", "/api/v1/deployments/drain-me")
