"""Fine-tuning end to end: the official `openai` client uploads a dataset and starts a job; the real
control plane runs it on the real node agent's trainer; the result deploys with the `deepflow` CLI
and answers chat with the fact it was taught, which the base model does not produce."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e

QUESTION = "What is the name of DeepFlow's mascot?"
ANSWER = "DeepFlow's mascot is an otter named Ripple."
TERMINAL = {"succeeded", "failed", "cancelled"}


def _client(platform: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.url + "/v1", api_key="unused", max_retries=0)


def _dataset() -> bytes:
    row = {
        "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER},
        ]
    }
    return ((json.dumps(row) + "\n") * 8).encode()


def _ask(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=32,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def _wait(
    client: openai.OpenAI, job_id: str, timeout: float = 600.0
) -> openai.types.fine_tuning.FineTuningJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in TERMINAL:
            return job
        time.sleep(1.0)
    raise AssertionError(f"fine-tuning job {job_id} still {job.status} after {timeout:.0f} s")


def test_fine_tune_teaches_a_fact_that_the_deployed_result_answers(platform: Platform) -> None:
    client = _client(platform)
    platform.deploy("tiny-base", model="tiny")
    assert "Ripple" not in _ask(client, "tiny-base")

    uploaded = client.files.create(file=("ripple.jsonl", _dataset()), purpose="fine-tune")
    assert uploaded.purpose == "fine-tune" and uploaded.bytes == len(_dataset())
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        suffix="ripple",
        seed=1,
        hyperparameters={"n_epochs": 40, "batch_size": 4, "learning_rate_multiplier": 10},
        extra_body={"lora": {"rank": 16, "alpha": 32}},
    )
    assert job.status in ("validating_files", "queued", "running")
    job = _wait(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:ripple:{job.id}"
    assert job.trained_tokens and job.finished_at

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    losses = [
        e.data["train_loss"]
        for e in events
        if e.type == "metrics" and e.data and "train_loss" in e.data
    ]
    assert len(losses) >= 2 and losses[0] < losses[-1]  # newest first: the loss went down
    assert [j.id for j in client.fine_tuning.jobs.list(limit=10).data][0] == job.id
    assert job.fine_tuned_model in {m.id for m in client.models.list().data}

    # One fine_tune request, four jobs (validate, train, evaluate, register), each with its tasks.
    record = platform.api("GET", f"/api/v1/requests/{job.request_id}").json()
    assert record["state"] == "succeeded"
    kinds = [j["kind"] for j in record["jobs"]]
    assert kinds == [
        "fine_tune_validate",
        "fine_tune_train",
        "fine_tune_evaluate",
        "fine_tune_register",
    ]
    assert all(j["state"] == "succeeded" and j["tasks"] for j in record["jobs"])
    train_task = record["jobs"][1]["tasks"][-1]
    assert train_task["node_id"] and train_task["kind"] == "train"
    reasons = {e["reason"] for e in train_task["events"]}
    assert reasons & {"training in a warm pod", "training in a new process"}, reasons

    deploy = platform.cli("deploy", "ripple", "--model", job.fine_tuned_model, "--replicas", "1")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    platform.wait_ready("ripple")
    assert "Ripple" in _ask(client, "ripple")

    for name in ("ripple", "tiny-base"):
        assert platform.cli("deployments", "delete", name).returncode == 0


def test_fine_tune_cancel_stops_the_trainer(platform: Platform) -> None:
    client = _client(platform)
    uploaded = client.files.create(file=("long.jsonl", _dataset() * 4), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        hyperparameters={"n_epochs": 50, "batch_size": 1},
    )
    deadline = time.monotonic() + 120
    while client.fine_tuning.jobs.retrieve(job.id).status != "running":
        assert time.monotonic() < deadline, "the job never started running"
        time.sleep(0.5)
    started = time.monotonic()
    client.fine_tuning.jobs.cancel(job.id)
    job = _wait(client, job.id, timeout=60)
    assert job.status == "cancelled" and time.monotonic() - started < 30
    record = platform.api("GET", f"/api/v1/requests/{job.request_id}").json()
    assert record["state"] == "cancelled"
    states = {t["state"] for j in record["jobs"] for t in j["tasks"]}
    assert states <= {"succeeded", "cancelled", "failed"}, states
    assert not _trainers_of(platform, job.request_id), "a trainer outlived its cancelled job"


def _trainers_of(platform: Platform, request_id: str) -> list[int]:
    """Pids of the live trainers (a warm pod or a process) the node agent runs for a fine-tune."""
    record = platform.api("GET", f"/api/v1/requests/{request_id}").json()
    nodes = {n["id"]: n["url"] for n in platform.api("GET", "/api/v1/nodes").json()["data"]}
    pids = []
    for job in record["jobs"]:
        for task in job["tasks"]:
            if task["kind"] != "train" or task["node_id"] is None:
                continue
            reply = httpx.get(f"{nodes[task['node_id']]}/training/{task['id']}", timeout=10)
            if reply.status_code == 200 and reply.json()["state"] in ("starting", "running"):
                pids.append(reply.json()["pid"])
    return [pid for pid in pids if pid is not None and Path(f"/proc/{pid}").exists()]


def test_a_killed_trainer_resumes_from_its_last_checkpoint(platform: Platform) -> None:
    client = _client(platform)
    uploaded = client.files.create(file=("resume.jsonl", _dataset()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        hyperparameters={"n_epochs": 20, "batch_size": 1},
    )
    deadline = time.monotonic() + 120
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert time.monotonic() < deadline, "no checkpoint was ever written"
        assert client.fine_tuning.jobs.retrieve(job.id).status not in TERMINAL
        time.sleep(0.2)
    pids = _trainers_of(platform, job.request_id)
    assert pids, "no trainer process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    job = _wait(client, job.id)
    assert job.status == "succeeded", job.error
    record = platform.api("GET", f"/api/v1/requests/{job.request_id}").json()
    train = next(j for j in record["jobs"] if j["kind"] == "fine_tune_train")
    assert [t["state"] for t in train["tasks"]] == ["failed", "succeeded"]
    # Iterating the page follows the cursor through every event (the steps alone are 160).
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(m.startswith("Training restarted") for m in messages), messages
