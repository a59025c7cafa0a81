"""Registration and heartbeats against a fake control plane (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from agent_fakes import FakeControlPlane, async_wait_until

from controlplane.wire import InstanceReport, NodeRegister, NodeResources
from dataplane.agent.control_plane import ControlPlaneClient, Reporter
from dataplane.agent.heartbeat import NodeLink, backoff_delay

pytestmark = pytest.mark.anyio

RESOURCES = NodeResources(cpus=4, memory_bytes=2**30, gpus=0, device="cpu")


def test_backoff_delay() -> None:
    assert [backoff_delay(n, 0.5, 10.0) for n in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert backoff_delay(10_000, 0.5, 10.0) == 10.0


@pytest.fixture
async def link_for(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[FakeControlPlane, NodeLink, list[InstanceReport]]]:
    cp = FakeControlPlane(**getattr(request, "param", {}))
    client = ControlPlaneClient("http://cp.test", transport=cp.transport)
    instances = [InstanceReport(instance_id="i1", state="ready", url="http://127.0.0.1:1", pid=7)]
    registration = NodeRegister(name="n1", url="http://127.0.0.1:8481", resources=RESOURCES)
    link = NodeLink(client, registration, lambda: list(instances), backoff_s=0.01)
    task = asyncio.create_task(link.run())
    yield cp, link, instances
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.aclose()


@pytest.mark.parametrize("link_for", [{"down_for": 4}], indirect=True)
async def test_registration_retries_until_the_control_plane_answers(
    link_for: tuple[FakeControlPlane, NodeLink, list[InstanceReport]],
) -> None:
    cp, link, _ = link_for
    await asyncio.wait_for(link.registered.wait(), 5)
    assert link.node_id == "node-1"
    assert cp.down_for == 0  # every refused attempt was retried
    [body] = cp.bodies("/register")
    assert body == {
        "name": "n1",
        "url": "http://127.0.0.1:8481",
        "resources": {"cpus": 4, "memory_bytes": 2**30, "gpus": 0, "device": "cpu"},
    }


async def test_heartbeats_carry_every_instance(
    link_for: tuple[FakeControlPlane, NodeLink, list[InstanceReport]],
) -> None:
    cp, _, instances = link_for
    await async_wait_until(lambda: len(cp.bodies("/api/v1/nodes/node-1/heartbeat")) >= 1, 5)
    first = cp.bodies("/heartbeat")[0]
    assert first["resources"]["cpus"] == 4
    assert first["instances"] == [
        {
            "instance_id": "i1",
            "state": "ready",
            "url": "http://127.0.0.1:1",
            "pid": 7,
            "exit_code": None,
            "reason": None,
            "launch_path": None,
            "fallbacks": [],
            "startup": None,
            "ready_at": None,
        }
    ]
    instances.clear()
    await async_wait_until(lambda: cp.bodies("/heartbeat")[-1]["instances"] == [], 5)


async def test_forgotten_node_registers_again(
    link_for: tuple[FakeControlPlane, NodeLink, list[InstanceReport]],
) -> None:
    cp, link, _ = link_for
    await async_wait_until(lambda: len(cp.bodies("/heartbeat")) >= 1, 5)
    cp.forget = True
    await async_wait_until(lambda: link.node_id == "node-2", 5)
    await async_wait_until(lambda: len(cp.bodies("/api/v1/nodes/node-2/heartbeat")) >= 1, 5)
    assert cp.registrations == 2
    # The first heartbeat after registering again tells the control plane what runs here.
    assert cp.bodies("/api/v1/nodes/node-2/heartbeat")[0]["instances"][0]["instance_id"] == "i1"


async def test_reporter_pushes_in_order_and_survives_errors() -> None:
    cp = FakeControlPlane(down_for=1)
    client = ControlPlaneClient("http://cp.test", transport=cp.transport)
    reporter = Reporter(client)
    task = asyncio.create_task(reporter.run())
    for state in ("starting", "ready", "stopped"):
        reporter.push(InstanceReport(instance_id="i9", state=state))
    await reporter.drain(5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.aclose()
    assert cp.states("i9") == ["ready", "stopped"]  # the first push found the control plane down
