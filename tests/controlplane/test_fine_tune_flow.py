"""The fine-tuning flow in-process, against a fake node agent: the test posts the trainer's reports.

Covers the happy path with a restart from a checkpoint, the restart limit, cancel, files that turn
bad before validation, lost and silent nodes, a heartbeat that no longer lists the training, and
a control plane restart.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fine_tune_support import (
    Clock,
    FakeAgent,
    chat_jsonl,
    checkpoint,
    failed,
    progress,
    succeeded,
    wait_for,
)
from starlette.testclient import TestClient

from controlplane.app import create_app
from controlplane.settings import Settings
from dataplane.modelstore import create_random

RESOURCES = {"cpus": 2, "memory_bytes": 8 << 30}
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    base = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'df.db'}")
    return dataclasses.replace(
        base, node_timeout_s=1e6, training_watch_interval_s=0.05, reconcile_interval_s=0.05
    )


@dataclasses.dataclass
class Platform:
    client: TestClient
    agent: FakeAgent
    clock: Clock
    tiny: Path

    def post(self, path: str, body: dict[str, Any]) -> Any:
        reply = self.client.post(path, json=body)
        assert reply.status_code < 300, reply.text
        return reply.json()

    def upload(self, content: bytes, purpose: str = "fine-tune") -> str:
        files = {"file": ("train.jsonl", content)}
        reply = self.client.post("/v1/files", files=files, data={"purpose": purpose})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["id"])

    def register_node(self, name: str) -> str:
        body = {"name": name, "url": f"http://{name}:8481", "resources": RESOURCES}
        return str(self.post("/api/v1/nodes/register", body)["node_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/v1/fine_tuning/jobs/{job_id}").json())

    def wait_status(self, job_id: str, *status: str) -> dict[str, Any]:
        return dict(wait_for(lambda: (j := self.job(job_id))["status"] in status and j))

    def wait_start(self, count: int) -> Any:
        wait_for(lambda: len(self.agent.starts) >= count)
        return self.agent.starts[count - 1][1]

    def report(self, body: dict[str, Any]) -> None:
        reply = self.client.post(f"/api/v1/tasks/{body['task_id']}/report", json=body)
        assert reply.status_code == 200, reply.text

    def records(self, job: dict[str, Any]) -> dict[str, Any]:
        return dict(self.client.get(f"/api/v1/requests/{job['request_id']}").json())


def start_platform(settings: Settings, agent: FakeAgent, clock: Clock) -> TestClient:
    return TestClient(create_app(settings, clock=clock, transport=agent.transport))


@pytest.fixture
def platform(settings: Settings, tiny_model: Path) -> Iterator[Platform]:
    agent, clock = FakeAgent(), Clock()
    with start_platform(settings, agent, clock) as client:
        p = Platform(client, agent, clock, tiny_model)
        p.post("/api/v1/models", {"name": "tiny", "path": str(tiny_model)})
        yield p


def merged_folder(platform: Platform, output_dir: str) -> Path:
    merged = Path(output_dir) / "merged"
    shutil.copytree(platform.tiny, merged)
    return merged


def all_settled(records: dict[str, Any]) -> bool:
    states = [records["state"]]
    for job in records["jobs"]:
        states.append(job["state"])
        states += [task["state"] for task in job["tasks"]]
    return set(states) <= TERMINAL


def test_fine_tune_succeeds_after_a_restart_from_its_checkpoint(platform: Platform) -> None:
    p = platform
    p.register_node("node-a")
    train = p.upload(chat_jsonl(8))
    valid = p.upload(chat_jsonl(2))
    body = {
        "model": "tiny",
        "training_file": train,
        "validation_file": valid,
        "suffix": "demo",
        "hyperparameters": {"n_epochs": 2, "batch_size": 2},
    }
    job = p.post("/v1/fine_tuning/jobs", body)
    assert job["status"] == "validating_files" and job["id"].startswith("ftjob-")
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 2,
        "learning_rate_multiplier": 1.0,
    }

    first = p.wait_start(1)
    assert first.base_model_path == str(p.tiny.resolve())
    assert first.output_dir.endswith(f"fine_tunes/{job['id']}")
    assert first.hyperparameters.learning_rate == pytest.approx(2e-4)
    assert first.hyperparameters.checkpoint_every == 2  # 8 steps, about four checkpoints
    assert first.resume_from is None and first.validation_file is not None
    assert p.wait_status(job["id"], "running")["status"] == "running"

    p.report(progress(first.task_id, 1))
    p.report(progress(first.task_id, 2))
    p.report(checkpoint(first.task_id, 2, first.output_dir))
    p.report(checkpoint(first.task_id, 2, first.output_dir))  # reports repeat: one checkpoint
    p.report(progress(first.task_id, 3))
    p.report(failed(first.task_id))

    second = p.wait_start(2)
    assert second.task_id != first.task_id
    assert second.resume_from == str(Path(first.output_dir) / "checkpoints" / "step-2")
    wait_for(lambda: ("node-a", first.task_id) in p.agent.deletes)  # the agent forgets it
    p.report(progress(second.task_id, 3))
    p.report(progress(second.task_id, 8, loss=0.5))
    p.report(succeeded(second.task_id, merged_folder(p, second.output_dir)))

    done = p.wait_status(job["id"], "succeeded", "failed")
    name = f"ft:tiny:demo:{job['id']}"
    assert done["status"] == "succeeded", done
    assert done["fine_tuned_model"] == name
    assert done["trained_tokens"] == 800 and done["finished_at"] is not None

    events = p.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [m["data"]["step"] for m in metrics if "total_steps" in m["data"]] == [8, 3, 3, 2, 1]
    assert metrics[0]["data"]["valid_loss"] == 1.25
    assert any("restarting from the checkpoint at step 2" in e["message"] for e in events)
    checkpoints = p.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()
    assert [c["step_number"] for c in checkpoints["data"]] == [2]
    assert checkpoints["data"][0]["fine_tuned_model_checkpoint"] == f"{name}:ckpt-step-2"
    assert checkpoints["data"][0]["metrics"]["train_loss"] == 1.5

    records = p.records(done)
    assert records["state"] == "succeeded" and all_settled(records)
    kinds = {j["kind"]: j for j in records["jobs"]}
    assert [t["state"] for t in kinds["fine_tune_train"]["tasks"]] == ["failed", "succeeded"]
    assert all(j["state"] == "succeeded" for j in records["jobs"])
    assert kinds["fine_tune_train"]["tasks"][1]["node_id"] is not None

    models = [m["id"] for m in p.client.get("/v1/models").json()["data"]]
    assert name in models
    assert p.client.get(f"/v1/models/{name}").json()["owned_by"] == "deepflow"
    assert p.client.get(f"/api/v1/models/{name}").json()["path"] == str(
        Path(second.output_dir) / "merged"
    )
    deployment = {"name": "demo", "model": name, "replicas": 0}
    assert p.client.post("/api/v1/deployments", json=deployment).status_code == 201


def test_training_fails_after_its_restarts(platform: Platform) -> None:
    p = platform
    p.register_node("node-a")
    job = p.post("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": p.upload(chat_jsonl())})
    for attempt in range(1, 4):  # the first run and two restarts
        start = p.wait_start(attempt)
        p.report(failed(start.task_id, exit_code=137))
    done = p.wait_status(job["id"], "failed")
    assert done["error"]["code"] == "training_failed"
    assert "after 2 restarts" in done["error"]["message"]
    assert "exit code 137" in done["error"]["message"]
    assert len(p.agent.starts) == 3
    records = wait_for(lambda: (r := p.records(done)) and all_settled(r) and r)
    assert records["state"] == "failed"


def test_cancel_stops_the_training_and_settles_every_record(platform: Platform) -> None:
    p = platform
    p.register_node("node-a")
    job = p.post("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": p.upload(chat_jsonl())})
    start = p.wait_start(1)
    p.report(progress(start.task_id, 1))
    reply = p.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert reply.status_code == 200 and reply.json()["status"] == "cancelled"
    wait_for(lambda: any(task == start.task_id for _, task in p.agent.deletes))
    records = p.records(p.job(job["id"]))
    assert records["state"] == "cancelled" and all_settled(records)
    # The agent reports the stop afterwards: accepted, nothing changes.
    p.report({"task_id": start.task_id, "state": "stopped", "exit_code": 143})
    assert p.job(job["id"])["status"] == "cancelled"
    again = p.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_while_queued_and_finished_jobs_cannot_be_cancelled(platform: Platform) -> None:
    p = platform  # no node: the job waits in the queue
    job = p.post("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": p.upload(chat_jsonl())})
    p.wait_status(job["id"], "queued")
    assert p.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", {})["status"] == "cancelled"
    p.register_node("node-a")
    records = p.records(p.job(job["id"]))
    assert all_settled(records) and not p.agent.starts

    other = p.post(
        "/v1/fine_tuning/jobs", {"model": "tiny", "training_file": p.upload(chat_jsonl())}
    )
    start = p.wait_start(1)
    p.report(succeeded(start.task_id, merged_folder(p, start.output_dir), valid_loss=None))
    p.wait_status(other["id"], "succeeded")
    late = p.client.post(f"/v1/fine_tuning/jobs/{other['id']}/cancel")
    assert late.status_code == 409, late.text


def test_a_file_gone_bad_fails_validation(platform: Platform, settings: Settings) -> None:
    p = platform
    train = p.upload(chat_jsonl())
    (settings.files_dir / train).write_bytes(b'{"messages": []}\n')
    job = p.post("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": train})
    done = p.wait_status(job["id"], "failed")
    assert done["error"]["code"] == "invalid_training_file"
    assert done["error"]["param"] == "training_file"
    assert "line 1" in done["error"]["message"]
    assert all_settled(p.records(done)) and not p.agent.starts


def test_a_merged_folder_that_cannot_be_served_fails_registration(platform: Platform) -> None:
    p = platform
    node = p.register_node("node-a")
    job = p.post("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": p.upload(chat_jsonl())})
    start = p.wait_start(1)
    p.report(succeeded(start.task_id, Path(start.output_dir) / "nothing-here"))
    done = p.wait_status(job["id"], "failed")
    assert done["error"]["code"] == "register_failed" and done["fine_tuned_model"] is None
    records = p.records(done)
    assert all_settled(records)
    states = {j["kind"]: j["state"] for j in records["jobs"]}
    assert states["fine_tune_train"] == "succeeded" and states["fine_tune_register"] == "failed"
    # The agent still lists the finished task: the control plane tells it to forget it.
    held = {"task_id": start.task_id, "state": "succeeded"}
    p.post(f"/api/v1/nodes/{node}/heartbeat", {"resources": RESOURCES, "training": [held]})
    wait_for(lambda: ("node-a", start.task_id) in p.agent.deletes)


def test_a_refused_training_restarts_on_another_node(platform: Platform) -> None:
    p = platform
    p.register_node("node-a")
    p.register_node("node-b")
    p.agent.refuse_hosts.add("node-a")  # picked first (by name), and answers 503
    job = p.post("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": p.upload(chat_jsonl())})
    start = p.wait_start(1)
    assert p.agent.starts[0][0] == "node-b" and start.resume_from is None
    assert p.wait_status(job["id"], "running")["status"] == "running"
    events = p.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert any("node node-a refused the training" in e["message"] for e in events)


def test_a_lost_node_restarts_the_training_elsewhere(settings: Settings, tiny_model: Path) -> None:
    agent, clock = FakeAgent(), Clock()
    settings = dataclasses.replace(settings, node_timeout_s=5.0)
    with start_platform(settings, agent, clock) as client:
        p = Platform(client, agent, clock, tiny_model)
        p.post("/api/v1/models", {"name": "tiny", "path": str(tiny_model)})
        p.register_node("node-a")
        node_b = p.register_node("node-b")
        train = p.upload(chat_jsonl())
        job = p.post("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": train})
        first = p.wait_start(1)
        assert agent.starts[0][0] == "node-a"  # the least busy, by name
        clock.now += 60  # node-a stops heartbeating; node-b goes on

        def node_b_beats() -> bool:
            beat = {"resources": RESOURCES, "instances": [], "training": []}
            p.post(f"/api/v1/nodes/{node_b}/heartbeat", beat)
            return len(agent.starts) > 1

        wait_for(node_b_beats)
        second = agent.starts[1][1]
        assert agent.starts[1][0] == "node-b" and second.task_id != first.task_id
        events = p.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
        assert any("node node-a is unreachable" in e["message"] for e in events)


def test_a_heartbeat_without_the_training_and_silence_end_attempts(
    settings: Settings, tiny_model: Path
) -> None:
    agent, clock = FakeAgent(), Clock()
    # A heartbeat may lag 3 x 10 s behind a start; a training may go 20 s without a report.
    settings = dataclasses.replace(settings, node_timeout_s=10.0, training_report_timeout_s=20.0)
    with start_platform(settings, agent, clock) as client:
        p = Platform(client, agent, clock, tiny_model)
        p.post("/api/v1/models", {"name": "tiny", "path": str(tiny_model)})
        node = p.register_node("node-a")
        train = p.upload(chat_jsonl())
        job = p.post("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": train})
        first = p.wait_start(1)

        def beat(*held: str) -> None:
            clock.now += 5
            training = [{"task_id": task_id, "state": "running"} for task_id in held]
            body = {"resources": RESOURCES, "instances": [], "training": training}
            p.post(f"/api/v1/nodes/{node}/heartbeat", body)

        for _ in range(7):  # 35 s of heartbeats that list the training
            beat(first.task_id)
        beat()  # then one that does not (its agent restarted, say)
        second = p.wait_start(2)
        for _ in range(5):  # 25 s of heartbeats, none with a report on the new attempt
            beat()
        third = p.wait_start(3)
        assert len({first.task_id, second.task_id, third.task_id}) == 3
        events = p.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=50").json()
        text = " ".join(e["message"] for e in events["data"])
        assert "no longer runs it" in text and "no report from node node-a" in text


def test_a_restarted_control_plane_fails_jobs_in_flight(
    settings: Settings, tiny_model: Path
) -> None:
    agent, clock = FakeAgent(), Clock()
    with start_platform(settings, agent, clock) as client:
        p = Platform(client, agent, clock, tiny_model)
        p.post("/api/v1/models", {"name": "tiny", "path": str(tiny_model)})
        p.register_node("node-a")
        train = p.upload(chat_jsonl())
        job = p.post("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": train})
        start = p.wait_start(1)
    with start_platform(settings, agent, clock) as client:
        p = Platform(client, agent, clock, tiny_model)
        done = p.job(job["id"])
        assert done["status"] == "failed"
        assert done["error"]["code"] == "control_plane_restarted"
        assert all_settled(p.records(done))
        wait_for(lambda: ("node-a", start.task_id) in agent.deletes)


def test_restart_success_and_cancel_on_both_backends(
    database_url: str, tmp_path: Path, tiny_model: Path
) -> None:
    base = Settings(home=tmp_path / "home", database_url=database_url)
    settings = dataclasses.replace(base, node_timeout_s=1e6, training_watch_interval_s=0.05)
    agent, clock = FakeAgent(), Clock()
    with start_platform(settings, agent, clock) as client:
        p = Platform(client, agent, clock, tiny_model)
        p.post("/api/v1/models", {"name": "tiny", "path": str(tiny_model)})
        p.register_node("node-a")
        train = p.upload(chat_jsonl())
        job = p.post("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": train})
        first = p.wait_start(1)
        p.report(checkpoint(first.task_id, 1, first.output_dir))
        p.report(failed(first.task_id))
        second = p.wait_start(2)
        assert second.resume_from is not None and second.resume_from.endswith("step-1")
        p.report(succeeded(second.task_id, merged_folder(p, second.output_dir)))
        done = p.wait_status(job["id"], "succeeded")
        assert all_settled(p.records(done))
        other = p.post("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": train})
        third = p.wait_start(3)
        p.post(f"/v1/fine_tuning/jobs/{other['id']}/cancel", {})
        wait_for(lambda: ("node-a", third.task_id) in agent.deletes)
        assert all_settled(p.records(p.job(other["id"])))
