"""/v1/files and the validation of /v1/fine_tuning/jobs, through the app in-process."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fine_tune_support import EXAMPLE, chat_jsonl
from starlette.testclient import TestClient

from controlplane.app import create_app
from controlplane.settings import Settings

MAX_FILE = 4096


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    base = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'df.db'}")
    return dataclasses.replace(base, max_file_bytes=MAX_FILE)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def upload(
    client: TestClient, content: bytes, purpose: str | None = "fine-tune", name: str = "t.jsonl"
) -> Any:
    data = {} if purpose is None else {"purpose": purpose}
    return client.post("/v1/files", files={"file": (name, content)}, data=data)


def error(reply: Any, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    return dict(reply.json()["error"])


def test_upload_retrieve_content_and_delete(client: TestClient, settings: Settings) -> None:
    content = chat_jsonl(3)
    reply = upload(client, content, name="../../train.jsonl")
    assert reply.status_code == 200, reply.text
    info = reply.json()
    assert info["object"] == "file" and info["id"].startswith("file-")
    assert info["bytes"] == len(content) and info["filename"] == "train.jsonl"
    assert info["purpose"] == "fine-tune" and info["status"] == "processed"
    assert (settings.files_dir / info["id"]).read_bytes() == content
    assert client.get(f"/v1/files/{info['id']}").json() == info
    assert client.get(f"/v1/files/{info['id']}/content").content == content
    gone = client.delete(f"/v1/files/{info['id']}").json()
    assert gone == {"id": info["id"], "object": "file", "deleted": True}
    assert not (settings.files_dir / info["id"]).exists()
    for reply in (
        client.get(f"/v1/files/{info['id']}"),
        client.get(f"/v1/files/{info['id']}/content"),
        client.delete(f"/v1/files/{info['id']}"),
    ):
        assert error(reply, 404)["code"] == "file_not_found"


def test_fine_tune_files_are_checked_line_by_line(client: TestClient, settings: Settings) -> None:
    good = json.dumps(EXAMPLE).encode()
    no_reply = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    bad_role = json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode()
    content = b"\n".join([good, b"", b"{oops", no_reply, good, bad_role]) + b"\n"
    body = error(upload(client, content), 400)
    assert body["type"] == "invalid_request_error" and body["param"] == "file"
    assert body["code"] == "invalid_file_format"
    message = body["message"]
    assert "line 3: not valid JSON" in message
    assert "line 4: no assistant message" in message
    assert "line 6: messages[0].role" in message
    assert "line 1" not in message and "line 5" not in message
    assert "has no examples" in error(upload(client, b"\n\n"), 400)["message"]
    assert not list(settings.files_dir.iterdir())  # nothing kept of refused uploads
    # Other purposes take any bytes.
    assert upload(client, b"\x00binary", purpose="batch").status_code == 200


def test_purpose_file_and_size_are_required(client: TestClient) -> None:
    assert error(upload(client, chat_jsonl(1), purpose=None), 400)["param"] == "purpose"
    assert error(upload(client, chat_jsonl(1), purpose="training"), 400)["param"] == "purpose"
    missing = client.post("/v1/files", data={"purpose": "fine-tune"})
    assert error(missing, 400)["param"] == "file"
    too_big = upload(client, b"x" * (MAX_FILE + 1), purpose="batch")
    assert error(too_big, 400)["code"] == "file_too_large"
    declared = client.post(
        "/v1/files",
        content=b"x" * (MAX_FILE + 100_000),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert error(declared, 400)["code"] == "file_too_large"


def test_files_list_in_pages(client: TestClient) -> None:
    ids = [upload(client, chat_jsonl(1)).json()["id"] for _ in range(3)]
    upload(client, b"x", purpose="batch")
    everything = client.get("/v1/files").json()
    assert everything["object"] == "list" and len(everything["data"]) == 4
    first = client.get("/v1/files?purpose=fine-tune&limit=2").json()
    assert len(first["data"]) == 2 and first["has_more"]
    rest = client.get(f"/v1/files?purpose=fine-tune&limit=2&after={first['last_id']}").json()
    assert not rest["has_more"]
    assert {f["id"] for f in first["data"] + rest["data"]} == set(ids)
    assert error(client.get("/v1/files?limit=0"), 400)["param"] == "limit"
    assert error(client.get("/v1/files?order=up"), 400)["param"] == "order"
    assert error(client.get("/v1/files?after=file-nope"), 400)["param"] == "after"


def test_fine_tuning_job_validation(client: TestClient, tmp_path: Path) -> None:
    from dataplane.modelstore import create_random

    tiny = create_random(tmp_path / "tiny", "tiny")
    client.post("/api/v1/models", json={"name": "tiny", "path": str(tiny)})
    train = upload(client, chat_jsonl(4)).json()["id"]
    batch = upload(client, b"x", purpose="batch").json()["id"]

    def create(**body: Any) -> Any:
        return client.post("/v1/fine_tuning/jobs", json={"model": "tiny", **body})

    unknown = error(create(model="nope", training_file=train), 404)
    assert unknown["code"] == "model_not_found" and unknown["param"] == "model"
    assert error(create(training_file="file-nope"), 400)["param"] == "training_file"
    wrong = error(create(training_file=batch), 400)
    assert wrong["code"] == "invalid_file_purpose" and wrong["param"] == "training_file"
    bad_valid = create(training_file=train, validation_file="file-nope")
    assert error(bad_valid, 400)["param"] == "validation_file"
    assert error(create(), 400)["message"] == "Missing required parameter: 'training_file'."
    assert error(create(training_file=train, suffix="bad suffix"), 400)["param"] == "suffix"
    epochs = create(training_file=train, hyperparameters={"n_epochs": 0})
    assert error(epochs, 400)["param"].startswith("hyperparameters.n_epochs")
    assert error(create(training_file=train, learning_rate=1), 400)["param"] == "learning_rate"

    method = {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}}
    job = create(training_file=train, method=method, lora={"rank": 4}, metadata={"k": "v"})
    assert job.status_code == 200, job.text
    body = job.json()
    assert body["object"] == "fine_tuning.job" and body["status"] == "validating_files"
    assert body["hyperparameters"] == {
        "n_epochs": 10,  # auto: 100 examples over 4, at most 10 epochs
        "batch_size": 2,
        "learning_rate_multiplier": 1.0,
    }
    assert body["metadata"] == {"k": "v"} and body["fine_tuned_model"] is None
    # Deployments may name the job's base model through a deployment, too.
    client.post("/api/v1/deployments", json={"name": "d", "model": "tiny", "replicas": 0})
    assert create(model="d", training_file=train).json()["model"] == "tiny"
    missing = client.get("/v1/fine_tuning/jobs/ftjob-nope")
    assert error(missing, 404)["type"] == "not_found_error"
    assert client.post("/v1/fine_tuning/jobs/ftjob-nope/cancel").status_code == 404
    assert client.get("/v1/fine_tuning/jobs/ftjob-nope/events").status_code == 404
    assert client.get("/v1/fine_tuning/jobs/ftjob-nope/checkpoints").status_code == 404
    jobs = client.get("/v1/fine_tuning/jobs?limit=1").json()
    assert jobs["has_more"] and len(jobs["data"]) == 1
    assert jobs["data"][0]["model"] == "tiny"
