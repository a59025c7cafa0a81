"""The agent's HTTP API on real uvicorn, with real child processes and a fake control plane."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_fakes import FakeControlPlane, pid_alive, serve, wait_until

from controlplane.wire import InstanceStart, NodeResources
from dataplane.agent.app import create_app
from dataplane.agent.settings import AgentSettings

CommandFor = Callable[[InstanceStart, int], list[str]]
RESOURCES = NodeResources(cpus=2, memory_bytes=2**30)


def settings(home: Path) -> AgentSettings:
    return AgentSettings(
        control_plane_url="http://cp.test",
        url="http://127.0.0.1:1",
        name="test-node",
        home=home,
        start_timeout_s=10.0,
        stop_grace_s=2.0,
        poll_interval_s=0.05,
        register_backoff_s=0.01,
    )


@pytest.fixture
def cp() -> FakeControlPlane:
    return FakeControlPlane()


@pytest.fixture
def agent(
    tmp_path: Path, cp: FakeControlPlane, fake_instance_command: CommandFor
) -> Iterator[httpx.Client]:
    app = create_app(
        settings(tmp_path),
        transport=cp.transport,
        command_for=fake_instance_command,
        resources=RESOURCES,
    )
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


def start_body(instance_id: str, mode: str = "ok") -> dict[str, Any]:
    return {"instance_id": instance_id, "model": mode, "model_path": "/models/m"}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code


def state_of(client: httpx.Client, instance_id: str) -> str:
    state: str = client.get(f"/instances/{instance_id}").json()["state"]
    return state


def test_instance_lifecycle(agent: httpx.Client, cp: FakeControlPlane) -> None:
    wait_until(lambda: agent.get("/health").json()["node_id"] == "node-1", 5)
    assert agent.get("/health").json() == {"status": "ok", "node_id": "node-1"}

    started = agent.post("/instances", json=start_body("a"))
    assert started.status_code == 202
    assert started.json()["state"] == "starting"
    pid = started.json()["pid"]

    wait_until(lambda: state_of(agent, "a") == "ready", 10)
    [listed] = agent.get("/instances").json()
    assert listed["instance_id"] == "a" and listed["url"].startswith("http://127.0.0.1:")
    wait_until(lambda: cp.states("a") == ["starting", "ready"], 5)

    stopped = agent.delete("/instances/a")
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopped"
    assert not pid_alive(pid)
    assert agent.get("/instances").json() == []
    wait_until(lambda: cp.states("a") == ["starting", "ready", "stopped"], 5)

    assert_error(agent.delete("/instances/a"), 404, "instance_not_found")


def test_failed_instance_is_pushed(agent: httpx.Client, cp: FakeControlPlane) -> None:
    agent.post("/instances", json=start_body("b", "exit3"))
    wait_until(lambda: cp.states("b")[-1:] == ["failed"], 10)
    report = cp.reports("b")[-1]
    assert report["exit_code"] == 3
    assert "boom: out of memory" in report["reason"]
    # The heartbeat carries it too.
    wait_until(
        lambda: any(i["state"] == "failed" for i in cp.bodies("/heartbeat")[-1]["instances"]), 5
    )


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"instance_id": "x", "model": "m"}',
        b'{"instance_id": "x", "model": "m", "model_path": "/p", "extra": 1}',
        b'{"instance_id": "../x", "model": "m", "model_path": "/p"}',
        b'{"instance_id": "x", "model": "m", "model_path": "/p", "engine_args": {"port": 1}}',
    ],
)
def test_bad_bodies_are_400(agent: httpx.Client, body: bytes) -> None:
    assert_error(agent.post("/instances", content=body), 400, "invalid_body")
    assert agent.get("/instances").json() == []


def test_errors_use_openai_shape(agent: httpx.Client) -> None:
    assert_error(agent.get("/instances/nope"), 404, "instance_not_found")
    assert_error(agent.get("/no-such-route"), 404)
    assert_error(agent.put("/instances"), 405)
    agent.post("/instances", json=start_body("dup"))
    assert_error(agent.post("/instances", json=start_body("dup", "other")), 409, "instance_exists")


def test_shutdown_stops_every_instance(
    tmp_path: Path, cp: FakeControlPlane, fake_instance_command: CommandFor
) -> None:
    app = create_app(
        settings(tmp_path),
        transport=cp.transport,
        command_for=fake_instance_command,
        resources=RESOURCES,
    )
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        pids = [
            client.post("/instances", json=start_body(f"s{n}", mode)).json()["pid"]
            for n, mode in enumerate(["ok", "forks", "hang"])
        ]
        wait_until(lambda: state_of(client, "s1") == "ready", 10)
        log_text = (tmp_path / "logs" / "instances" / "s1.log").read_text()
        grandchild = int(log_text.split("grandchild pid=")[1].split()[0])
    # Leaving `serve` ran the lifespan's exit.
    assert not any(pid_alive(pid) for pid in pids)
    wait_until(lambda: not pid_alive(grandchild), 3)
    for n in range(3):
        assert cp.states(f"s{n}")[-1] == "stopped"
