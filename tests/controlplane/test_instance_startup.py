"""The control plane keeps how each instance started: the launch path and the node's four stages
from the agent's reports, and registration (ready on the node -> routed to), timed by itself.
On SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from controlplane.app import create_app
from controlplane.settings import Settings
from dataplane.modelstore import create_random

NODE_URL = "http://node.test:8481"
STAGES = {
    "path": "fork",
    "pod_ready_s": 0.011,
    "runtime_preload_s": 0.0,
    "weight_load_s": 0.042,
    "post_load_s": 0.05,
    "weights_source": "zygote",
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@dataclasses.dataclass
class FakeNode:
    """The agent's side of what the control plane calls: it accepts every start."""

    starts: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/instances":
            body = json.loads(request.content)
            self.starts.append(body)
            report = {"instance_id": body["instance_id"], "state": "starting"}
            return httpx.Response(202, json=report)
        if request.method == "POST" and request.url.path == "/preload":
            return httpx.Response(202, json={})
        return httpx.Response(200, json={})


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


@pytest.fixture
def client(database_url: str, tmp_path: Path, node: FakeNode) -> Iterator[TestClient]:
    settings = dataclasses.replace(
        Settings(home=tmp_path, database_url=database_url),
        reconcile_interval_s=0.05,
        node_timeout_s=1e6,
    )
    app = create_app(settings, transport=httpx.MockTransport(node.handle))
    with TestClient(app) as c:
        yield c


def wait_for(predicate: Any, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def report(client: TestClient, body: dict[str, Any]) -> None:
    reply = client.post(f"/api/v1/instances/{body['instance_id']}/report", json=body)
    assert reply.status_code < 300, reply.text


def test_report_stages_are_stored_and_registration_is_timed(
    client: TestClient, node: FakeNode, tiny_model: Path
) -> None:
    registered = client.post(
        "/api/v1/nodes/register",
        json={"name": "n1", "url": NODE_URL, "resources": {"cpus": 2, "memory_bytes": 1 << 30}},
    ).json()
    assert client.post("/api/v1/models", json={"name": "tiny", "path": str(tiny_model)}).is_success
    deployment = {"name": "d", "model": "tiny", "replicas": 1}
    assert client.post("/api/v1/deployments", json=deployment).status_code == 201
    instance_id = wait_for(lambda: node.starts and node.starts[0]["instance_id"])
    get = f"/api/v1/instances/{instance_id}"
    wait_for(lambda: client.get(get).json()["state"] == "starting")

    fallbacks = ["warm_pod: no pod ready"]
    starting = {"instance_id": instance_id, "state": "starting", "pid": 7, "launch_path": "fork"}
    report(client, {**starting, "fallbacks": fallbacks})
    info = client.get(get).json()
    assert info["launch_path"] == "fork" and info["fallbacks"] == fallbacks
    assert info["startup"] is None and info["registration_s"] is None

    ready_at = time.time() - 1.0  # ready on the node a second before the control plane hears
    ready = {
        **starting,
        "state": "ready",
        "url": "http://127.0.0.1:9",
        "fallbacks": fallbacks,
        "startup": STAGES,
        "ready_at": ready_at,
    }
    report(client, ready)
    info = wait_for(lambda: (i := client.get(get).json())["registration_s"] is not None and i)
    assert info["state"] == "ready" and info["launch_path"] == "fork"
    assert info["startup"] == STAGES
    assert 1.0 <= info["registration_s"] < 10.0
    assert client.get("/v1/models").json()["data"][0]["id"] == "d"  # routed to

    # A heartbeat carrying the same report changes nothing; one that says less erases nothing.
    beat = {"resources": {"cpus": 2, "memory_bytes": 1 << 30}, "instances": [ready]}
    assert client.post(f"/api/v1/nodes/{registered['node_id']}/heartbeat", json=beat).is_success
    report(client, {"instance_id": instance_id, "state": "ready", "url": "http://127.0.0.1:9"})
    again = client.get(get).json()
    for key in ("launch_path", "fallbacks", "startup", "registration_s"):
        assert again[key] == info[key], key

    listed = client.get("/api/v1/instances").json()["data"]
    assert listed[0]["launch_path"] == "fork" and listed[0]["startup"] == STAGES
