"""Training tasks through the agent's HTTP API: the REAL trainer process on a tiny random Llama,
real uvicorn, a fake control plane that records every report."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_fakes import FakeControlPlane, pid_alive, serve, wait_until

from controlplane.wire import NodeResources
from dataplane.agent.app import create_app
from dataplane.agent.settings import AgentSettings

pytestmark = pytest.mark.slow

RESOURCES = NodeResources(cpus=2, memory_bytes=2**30)
STOP_GRACE_S = 3.0
# The trainer imports torch, transformers and peft (seconds on a busy 2-core box) before a step.
FIRST_STEP_S = 90.0


def settings(home: Path) -> AgentSettings:
    return AgentSettings(
        control_plane_url="http://cp.test",
        url="http://127.0.0.1:1",
        name="test-node",
        home=home,
        poll_interval_s=0.05,
        register_backoff_s=0.01,
        training_stop_grace_s=STOP_GRACE_S,
    )


@pytest.fixture(scope="module")
def cp() -> FakeControlPlane:
    return FakeControlPlane()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, cp: FakeControlPlane) -> Iterator[httpx.Client]:
    home = tmp_path_factory.mktemp("home")
    app = create_app(settings(home), transport=cp.transport, resources=RESOURCES)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        client.home = home  # type: ignore[attr-defined]
        yield client


def body(task_id: str, files: dict[str, Path], **hp: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "job_id": f"job-{task_id}",
        "base_model_path": str(files["base"]),
        "training_file": str(files["data"]),
        "output_dir": str(files["root"] / task_id),
        "hyperparameters": {
            "n_epochs": 1,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "checkpoint_every": 1,
            **hp,
        },
    }


def reports(cp: FakeControlPlane, task_id: str) -> list[dict[str, Any]]:
    return cp.bodies(f"/api/v1/tasks/{task_id}/report")


def states(cp: FakeControlPlane, task_id: str) -> list[str]:
    return [r["state"] for r in reports(cp, task_id)]


def ended(cp: FakeControlPlane, task_id: str) -> bool:
    return bool(set(states(cp, task_id)) & {"succeeded", "failed", "stopped"})


def shape(report: dict[str, Any]) -> tuple[str, ...]:
    """A report as its state and the step of each part it carries."""
    parts = [report["state"]]
    for key in ("progress", "checkpoint"):
        if report[key] is not None:
            parts.append(f"{key}:{report[key]['step']}")
    if report["result"] is not None:
        parts.append(f"result:{report['result']['steps']}")
    return tuple(parts)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code


@pytest.fixture(scope="module")
def first_run(
    agent: httpx.Client, cp: FakeControlPlane, files: dict[str, Path]
) -> list[dict[str, Any]]:
    started = agent.post("/training", json=body("t-ok", files))
    assert started.status_code == 202, started.text
    assert started.json()["state"] == "starting" and started.json()["pid"] > 0
    wait_until(lambda: ended(cp, "t-ok"), FIRST_STEP_S + 60, step_s=0.2)
    return reports(cp, "t-ok")


def test_reports_arrive_in_order(
    agent: httpx.Client, cp: FakeControlPlane, first_run: list[dict[str, Any]]
) -> None:
    assert [shape(r) for r in first_run] == [
        ("starting",),
        ("running", "progress:1"),
        ("running", "progress:1", "checkpoint:1"),
        ("running", "progress:2"),
        ("running", "progress:2", "checkpoint:2"),
        ("succeeded", "progress:2", "result:2"),
    ], [r["reason"] for r in first_run]
    final = first_run[-1]
    assert final["exit_code"] == 0 and final["reason"] == "training finished"
    assert Path(final["result"]["merged_model_path"], "config.json").is_file()
    # GET and the heartbeat carry the whole picture, the latest checkpoint included.
    got = agent.get("/training/t-ok").json()
    assert shape(got) == ("succeeded", "progress:2", "checkpoint:2", "result:2")
    wait_until(
        lambda: any(t["task_id"] == "t-ok" for t in cp.bodies("/heartbeat")[-1]["training"]), 5
    )
    home: Path = agent.home  # type: ignore[attr-defined]
    assert "=== " in (home / "logs" / "training" / "t-ok.log").read_text()
    assert json.loads((home / "run" / "training" / "t-ok.json").read_text())["task_id"] == "t-ok"


def test_resume_continues_after_the_checkpoint(
    agent: httpx.Client,
    cp: FakeControlPlane,
    files: dict[str, Path],
    first_run: list[dict[str, Any]],
) -> None:
    step_1 = next(r["checkpoint"]["path"] for r in first_run if shape(r)[-1] == "checkpoint:1")
    resumed = body("t-resume", files) | {"resume_from": step_1}
    assert agent.post("/training", json=resumed).status_code == 202
    wait_until(lambda: ended(cp, "t-resume"), FIRST_STEP_S + 60, step_s=0.2)
    assert [shape(r) for r in reports(cp, "t-resume")] == [
        ("starting",),
        ("running", "progress:2"),
        ("running", "progress:2", "checkpoint:2"),
        ("succeeded", "progress:2", "result:2"),
    ]


def test_a_killed_trainer_is_failed_with_its_exit_code(
    agent: httpx.Client, cp: FakeControlPlane, files: dict[str, Path]
) -> None:
    pid = agent.post("/training", json=body("t-kill", files, n_epochs=1000)).json()["pid"]
    wait_until(lambda: "running" in states(cp, "t-kill"), FIRST_STEP_S, step_s=0.1)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: ended(cp, "t-kill"), 10)
    final = reports(cp, "t-kill")[-1]
    assert final["state"] == "failed" and final["exit_code"] == -signal.SIGKILL
    assert final["reason"].startswith("killed by SIGKILL")
    assert agent.get("/training/t-kill").json()["state"] == "failed"

    # The control plane restarts a failed task under the same id; this one it stops at once.
    again = agent.post("/training", json=body("t-kill", files, n_epochs=1000))
    assert again.status_code == 202 and again.json()["state"] == "starting"
    assert agent.delete("/training/t-kill").json()["state"] == "stopped"
    wait_until(lambda: states(cp, "t-kill")[-2:] == ["starting", "stopped"], 5)


def test_delete_stops_within_seconds(
    agent: httpx.Client, cp: FakeControlPlane, files: dict[str, Path]
) -> None:
    pid = agent.post("/training", json=body("t-stop", files, n_epochs=1000)).json()["pid"]
    wait_until(lambda: "running" in states(cp, "t-stop"), FIRST_STEP_S, step_s=0.1)
    assert_error(agent.post("/training", json=body("t-stop", files)), 409, "task_running")

    sent = time.monotonic()
    stopped = agent.delete("/training/t-stop")
    assert time.monotonic() - sent < STOP_GRACE_S + 2.0
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopped" and stopped.json()["reason"] == "stopped on request"
    assert not pid_alive(pid)
    wait_until(lambda: states(cp, "t-stop")[-1] == "stopped", 5)
    assert states(cp, "t-stop").count("stopped") == 1
    assert_error(agent.get("/training/t-stop"), 404, "task_not_found")
    assert_error(agent.delete("/training/t-stop"), 404, "task_not_found")


@pytest.mark.parametrize(
    "patch",
    [
        {"task_id": "../x"},
        {"task_id": ""},
        {"hyperparameters": {"n_epochs": 0, "batch_size": 4, "learning_rate": 1e-2}},
        {"hyperparameters": {"n_epochs": 1, "batch_size": 4}},
        {"extra": 1},
    ],
)
def test_bad_bodies_are_400(
    agent: httpx.Client, files: dict[str, Path], patch: dict[str, Any]
) -> None:
    before = agent.get("/training").json()
    assert_error(agent.post("/training", json=body("bad", files) | patch), 400, "invalid_body")
    assert agent.get("/training").json() == before


def test_unparseable_and_incomplete_bodies_are_400(agent: httpx.Client) -> None:
    assert_error(agent.post("/training", content=b"{not json"), 400, "invalid_body")
    missing = agent.post("/training", json={"task_id": "x", "job_id": "j"})
    assert_error(missing, 400, "invalid_body")
    assert missing.json()["error"]["param"] == "base_model_path"
    assert_error(agent.get("/training/nope"), 404, "task_not_found")
    assert_error(agent.put("/training"), 405)


def test_shutdown_stops_every_trainer(tmp_path: Path, files: dict[str, Path]) -> None:
    cp = FakeControlPlane()
    app = create_app(settings(tmp_path), transport=cp.transport, resources=RESOURCES)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        pid = client.post("/training", json=body("t-down", files, n_epochs=1000)).json()["pid"]
    # Leaving `serve` ran the lifespan's exit.
    assert not pid_alive(pid)
    assert states(cp, "t-down") == ["starting", "stopped"]
