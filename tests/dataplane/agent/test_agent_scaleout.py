"""The agent starts instances through the scale-out launcher, for real, on the `tiny` preset:
cold with neither a pod nor a zygote, a warm pod when the pool has one, a fork after a preload
with a zygote; every report says which, the ready one carries the startup stages, and stopping
an instance (or the agent) leaves no process behind."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_fakes import FakeControlPlane, pid_alive, serve, wait_until

from controlplane.wire import InstanceReport, InstanceStart, NodeResources
from dataplane.agent.app import create_app
from dataplane.agent.settings import AgentSettings
from dataplane.agent.supervisor import Supervisor
from dataplane.modelstore import create_random
from dataplane.scaleout.launcher import Launcher

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ENGINE_ARGS = {"kv_cache_memory": 1 << 20, "max_model_len": 128}
RESOURCES = NodeResources(cpus=2, memory_bytes=2**30)
READY_S = 120.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=3)


def start_body(instance_id: str, model_path: Path) -> dict[str, Any]:
    return {
        "instance_id": instance_id,
        "model": "tiny",
        "model_path": str(model_path),
        "engine_args": ENGINE_ARGS,
    }


def ready_report(cp: FakeControlPlane, instance_id: str) -> InstanceReport:
    wait_until(lambda: "ready" in cp.states(instance_id), READY_S)
    body = next(r for r in cp.reports(instance_id) if r["state"] == "ready")
    return InstanceReport.model_validate(body)


def assert_stages(report: InstanceReport, path: str, weights_source: str) -> None:
    assert report.launch_path == path and report.url is not None
    startup = report.startup
    assert startup is not None and startup.path == path
    assert startup.weights_source == weights_source
    stages = [
        startup.pod_ready_s,
        startup.runtime_preload_s,
        startup.weight_load_s,
        startup.post_load_s,
    ]
    assert all(s >= 0 for s in stages)
    assert report.ready_at is not None and report.ready_at <= time.time()


@pytest.mark.anyio
async def test_cold_without_a_pod_or_a_zygote(tmp_path: Path, tiny: Path) -> None:
    launcher = Launcher(log_dir=tmp_path / "logs", cache_dir=tmp_path / "cache", torch_threads=1)
    changes: list[InstanceReport] = []
    supervisor = Supervisor(
        log_dir=tmp_path / "logs",
        on_change=changes.append,
        launcher=launcher,
        start_timeout_s=READY_S,
        poll_interval_s=0.1,
    )
    try:
        first = supervisor.start(InstanceStart.model_validate(start_body("c1", tiny)))
        assert first.state == "starting" and first.launch_path == "cold"
        assert [f.split(":")[0] for f in first.fallbacks] == ["fork", "warm_pod"]
        deadline = time.monotonic() + READY_S
        while supervisor.get("c1").state == "starting" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        ready = supervisor.get("c1")
        assert ready.state == "ready", ready.reason
        assert_stages(ready, "cold", "disk")
        assert [r.state for r in changes] == ["starting", "ready"]
        stopped = await supervisor.stop("c1")
        assert stopped.state == "stopped" and not pid_alive(ready.pid or 0)
    finally:
        await supervisor.aclose()
        launcher.close()


def settings(home: Path) -> AgentSettings:
    return AgentSettings(
        control_plane_url="http://cp.test",
        url="http://127.0.0.1:1",
        name="scaleout-node",
        home=home,
        start_timeout_s=READY_S,
        stop_grace_s=5.0,
        poll_interval_s=0.1,
        register_backoff_s=0.01,
        warm_pool_size=1,
        cache_dir=home / "cache",
        zygotes=True,
        torch_threads=1,
    )


def by_path(agent: httpx.Client) -> dict[str, dict[str, Any]]:
    return {p["model_path"]: p for p in preloads(agent)["preloads"]}


def preloads(agent: httpx.Client) -> dict[str, Any]:
    reply = agent.get("/preload")
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def test_warm_pod_then_fork_after_a_preload(tmp_path: Path, tiny: Path) -> None:
    cp = FakeControlPlane()
    app = create_app(settings(tmp_path), transport=cp.transport, resources=RESOURCES)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as agent:
        zygote_pid = warm_pod_then_fork(agent, cp, tiny, tmp_path)
    assert not pid_alive(zygote_pid)  # the agent's exit stops its zygotes


def warm_pod_then_fork(agent: httpx.Client, cp: FakeControlPlane, tiny: Path, tmp: Path) -> int:
    bad = agent.post("/preload", json={"model_path": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model_path"
    assert agent.post("/preload", json={"model_path": "/x", "zygotes": True}).status_code == 400
    missing = str((tmp / "nope").resolve())
    assert agent.post("/preload", json={"model_path": missing}).status_code == 202
    wait_until(lambda: preloads(agent)["warm_pods_ready"] == 1, READY_S)

    reply = agent.post("/instances", json=start_body("w1", tiny))
    assert reply.status_code == 202, reply.text
    assert reply.json()["launch_path"] == "warm_pod"
    warm = ready_report(cp, "w1")
    assert_stages(warm, "warm_pod", "disk")  # nothing preloaded yet
    assert warm.startup is not None and warm.startup.runtime_preload_s == 0.0

    model_path = str(tiny.resolve())
    first = agent.post("/preload", json={"model_path": str(tiny), "zygote": True})
    assert first.status_code == 202, first.text
    assert first.json()["model_path"] == model_path
    assert first.json()["state"] == "preloading"
    again = agent.post("/preload", json={"model_path": str(tiny), "zygote": True}).json()
    assert again["requested_at"] == first.json()["requested_at"]  # the same preload
    wait_until(lambda: by_path(agent)[model_path]["zygote"] == "ready", READY_S)
    listing = preloads(agent)
    entry = by_path(agent)[model_path]
    assert entry["state"] == "ready" and entry["error"] is None
    failed = by_path(agent)[missing]
    assert failed["state"] == "failed" and failed["error"] and failed["zygote"] == "off"
    zygote_pid = entry["zygote_pid"]
    assert pid_alive(zygote_pid)
    assert [c["model_path"] for c in listing["cached"]] == [model_path]
    repeat = agent.post("/preload", json={"model_path": str(tiny), "zygote": True}).json()
    assert repeat["state"] == "ready" and repeat["zygote"] == "ready"  # nothing to do

    reply = agent.post("/instances", json=start_body("f1", tiny))
    assert reply.status_code == 202, reply.text
    assert reply.json()["launch_path"] == "fork" and reply.json()["fallbacks"] == []
    forked = ready_report(cp, "f1")
    assert_stages(forked, "fork", "zygote")
    served = httpx.post(
        f"{forked.url}/generate",
        json={"request_id": "r1", "prompt_token_ids": [5, 6, 7], "sampling": {"max_tokens": 2}},
        timeout=30,
    )
    assert served.status_code == 200, served.text

    pids = {warm.pid, forked.pid}
    for instance_id in ("w1", "f1"):
        stopped = agent.delete(f"/instances/{instance_id}")
        assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    for pid in pids:
        assert pid is not None and not pid_alive(pid)
    assert agent.get("/instances").json() == []
    assert isinstance(zygote_pid, int)
    return zygote_pid
