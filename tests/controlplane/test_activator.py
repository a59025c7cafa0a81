"""The activator: a request to a deployment with no ready instance waits while one starts, tells
the autoscaler at once, and gets OpenAI's 503 only when the timeout passes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from controlplane.app import create_app
from controlplane.registry import ReadyInstance, Registry
from controlplane.settings import Settings
from dataplane.modelstore import create_random


def test_a_waiting_request_is_counted_announced_and_served_once_an_instance_is_ready() -> None:
    async def scenario() -> None:
        registry = Registry()
        announced: list[str] = []
        registry.on_waiting = announced.append
        await registry.set_deployments({"d": "m"})
        waiters = [asyncio.create_task(registry.acquire("d", timeout=5.0)) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert registry.load_of("d") == (0, 0, 3)
        assert announced == ["d", "d", "d"]
        await registry.set_ready([ReadyInstance("i1", "d", None, "http://i1")])
        chosen = await asyncio.gather(*waiters)
        assert [c.id for c in chosen if c is not None] == ["i1"] * 3
        assert registry.load_of("d") == (1, 3, 0)

    asyncio.run(scenario())


def test_a_draining_instance_takes_no_new_request() -> None:
    async def scenario() -> None:
        registry = Registry()
        await registry.set_deployments({"d": "m"})
        await registry.set_ready([ReadyInstance("i1", "d", None, "http://i1", accepting=False)])
        assert await registry.acquire("d", timeout=0.05) is None
        assert registry.load_of("d") == (0, 0, 0)  # no longer waiting once it gave up

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    settings = dataclasses.replace(
        Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'deepflow.db'}"),
        dispatch_timeout_s=0.5,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_request_at_zero_scales_up_at_once_then_503_after_the_timeout(
    client: TestClient, tiny_model: Path
) -> None:
    client.post("/api/v1/models", json={"name": "tiny", "path": str(tiny_model)})
    reply = client.post(
        "/api/v1/deployments",
        json={"name": "d", "model": "tiny", "replicas": 0, "max_replicas": 2},
    )
    assert reply.status_code == 201, reply.text
    assert reply.json()["autoscaling"]["min_replicas"] == 0
    for _ in range(50):
        if client.get("/v1/models").json()["data"]:
            break
        time.sleep(0.05)
    started = time.monotonic()
    body = {"model": "d", "messages": [{"role": "user", "content": "hi"}]}
    reply = client.post("/v1/chat/completions", json=body)
    waited = time.monotonic() - started
    # No node can start the instance here: the request waited the whole timeout, then got 503.
    assert reply.status_code == 503, reply.text
    assert waited >= 0.5
    error = reply.json()["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "no_ready_instance"
    # ... but the autoscaler had raised the desired replicas at once, not after 30 s.
    assert client.get("/api/v1/deployments/d").json()["replicas"] == 1
    scaling = client.get("/api/v1/deployments/d/scaling").json()["data"]
    (decision,) = [e for e in scaling if e["kind"] == "autoscale"]
    assert (decision["from_replicas"], decision["to_replicas"]) == (0, 1)
    assert decision["reason"] == "scale from zero: 1 requests waiting"
    assert decision["inputs"]["waiting"] == 1


def test_scale_of_an_autoscaled_deployment_is_bounded(client: TestClient, tiny_model: Path) -> None:
    client.post("/api/v1/models", json={"name": "tiny", "path": str(tiny_model)})
    client.post(
        "/api/v1/deployments",
        json={"name": "d", "model": "tiny", "replicas": 0, "max_replicas": 2},
    )
    refused = client.patch("/api/v1/deployments/d", json={"replicas": 3})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "replicas_out_of_bounds"
    off = client.patch("/api/v1/deployments/d", json={"autoscaling": False, "replicas": 0})
    assert off.status_code == 200 and off.json()["autoscaling"] is None
    scaling = client.get("/api/v1/deployments/d/scaling?limit=5").json()["data"]
    assert scaling[0]["kind"] == "manual" and scaling[0]["inputs"]["autoscaling"] is False
    assert client.get("/api/v1/deployments/zz/scaling").status_code == 404
