"""Training tasks in warm pods: an agent with a warm pool of 1 hands each task a ready pod (the
REAL pod process becoming the REAL trainer, tiny random Llama), else starts a trainer process."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_fakes import FakeControlPlane, pid_alive, serve, wait_until
from test_agent_training import (  # the same task bodies and report shapes
    FIRST_STEP_S,
    RESOURCES,
    body,
    ended,
    reports,
    settings,
    shape,
    states,
)

from dataplane.agent.app import create_app

pytestmark = pytest.mark.slow

# A pod imports torch, transformers and the engine before it is ready (seconds on a busy box).
POD_READY_S = 120.0


@pytest.fixture(scope="module")
def cp() -> FakeControlPlane:
    return FakeControlPlane()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, cp: FakeControlPlane) -> Iterator[httpx.Client]:
    home = tmp_path_factory.mktemp("home")
    pooled = dataclasses.replace(settings(home), warm_pool_size=1)
    app = create_app(pooled, transport=cp.transport, resources=RESOURCES)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        client.home = home  # type: ignore[attr-defined]
        yield client


def wait_for_pod(agent: httpx.Client) -> None:
    wait_until(lambda: agent.get("/preload").json()["warm_pods_ready"] == 1, POD_READY_S, 0.2)


def start(agent: httpx.Client, task_id: str, files: dict[str, Path], **hp: Any) -> dict[str, Any]:
    started = agent.post("/training", json=body(task_id, files, **hp))
    assert started.status_code == 202, started.text
    report: dict[str, Any] = started.json()
    return report


def start_in_pod(
    agent: httpx.Client, task_id: str, files: dict[str, Path], **hp: Any
) -> dict[str, Any]:
    """Start a task once a pod is ready. A pod that dies between its `ready` and the hand-off
    (a loaded 2-core box) sends the task to a process, as it should; that task is stopped and
    the hand-off tried again with the pool's next pod, `task_id` suffixed."""
    for attempt in range(3):
        wait_for_pod(agent)
        name = task_id if attempt == 0 else f"{task_id}-{attempt}"
        started = start(agent, name, files, **hp)
        if started["executor"] == "warm_pod":
            return started
        assert agent.delete(f"/training/{name}").json()["state"] in ("stopped", "failed")
    raise AssertionError(f"no warm pod took {task_id} in 3 tries")


def test_a_task_runs_in_a_warm_pod(
    agent: httpx.Client, cp: FakeControlPlane, files: dict[str, Path]
) -> None:
    wait_for_pod(agent)
    started = start(agent, "p-ok", files)
    assert started["executor"] == "warm_pod" and started["state"] == "starting"
    wait_until(lambda: ended(cp, "p-ok"), FIRST_STEP_S + 60, step_s=0.2)
    run = reports(cp, "p-ok")
    # The same reports as a trainer process sends (test_agent_training), each saying warm_pod.
    assert [shape(r) for r in run] == [
        ("starting",),
        ("running", "progress:1"),
        ("running", "progress:1", "checkpoint:1"),
        ("running", "progress:2"),
        ("running", "progress:2", "checkpoint:2"),
        ("succeeded", "progress:2", "result:2"),
    ], [r["reason"] for r in run]
    assert {r["executor"] for r in run} == {"warm_pod"}
    assert {r["pid"] for r in run} == {started["pid"]}
    final = run[-1]
    assert final["exit_code"] == 0 and final["reason"] == "training finished"
    assert Path(final["result"]["merged_model_path"], "config.json").is_file()
    home: Path = agent.home  # type: ignore[attr-defined]
    assert "warm pod" in (home / "logs" / "training" / "p-ok.log").read_text()


def test_stop_and_the_fallback_to_a_process(
    agent: httpx.Client, cp: FakeControlPlane, files: dict[str, Path]
) -> None:
    wait_for_pod(agent)
    in_pod = start(agent, "p-stop", files, n_epochs=1000)
    # The pool's one pod is taken and its replacement takes seconds to boot.
    in_process = start(agent, "p-cold", files, n_epochs=1000)
    assert in_pod["executor"] == "warm_pod" and in_process["executor"] == "process"
    for task_id in ("p-stop", "p-cold"):
        wait_until(lambda: "running" in states(cp, task_id), FIRST_STEP_S, 0.1)  # noqa: B023
        stopped = agent.delete(f"/training/{task_id}").json()
        assert stopped["state"] == "stopped" and stopped["reason"] == "stopped on request"
    assert not pid_alive(in_pod["pid"]) and not pid_alive(in_process["pid"])
    assert [r["state"] for r in reports(cp, "p-stop")][-1] == "stopped"


def test_a_killed_pod_is_failed_with_its_exit_code(
    agent: httpx.Client, cp: FakeControlPlane, files: dict[str, Path]
) -> None:
    started = start_in_pod(agent, "p-kill", files, n_epochs=1000)
    task_id = started["task_id"]
    wait_until(lambda: "running" in states(cp, task_id), FIRST_STEP_S, step_s=0.1)
    os.kill(started["pid"], signal.SIGKILL)
    wait_until(lambda: ended(cp, task_id), 10)
    final = reports(cp, task_id)[-1]
    assert final["state"] == "failed" and final["exit_code"] == -signal.SIGKILL
    assert final["reason"].startswith("killed by SIGKILL") and final["executor"] == "warm_pod"
