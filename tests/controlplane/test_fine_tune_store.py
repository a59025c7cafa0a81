"""Files and fine-tuning records in the store, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane import wire
from controlplane.db import file_store, store
from controlplane.db import fine_tune_store as fts
from controlplane.db import tables as t
from controlplane.db.session import Database
from controlplane.errors import Conflict, InvalidRequest, NotFound
from controlplane.jobs import fine_tune_steps as steps
from controlplane.states import FineTuneState, JobKind, TaskState

NOW = 1000.0


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


def add_file(s: Session, file_id: str, at: float, purpose: str = "fine-tune") -> None:
    row = t.File(
        id=file_id,
        filename=f"{file_id}.jsonl",
        purpose=purpose,
        bytes=10,
        path=f"/files/{file_id}",
        num_examples=8,
        created_at=at,
    )
    file_store.add_file(s, row)


def ids(page: wire.Page) -> list[str]:
    return [item["id"] for item in page.data]


def test_files_list_in_pages_both_ways(db: Database) -> None:
    with db.sessions.begin() as s:
        for i, at in enumerate([1.0, 2.0, 2.0, 3.0]):  # two with the same time
            add_file(s, f"file-{i}", at)
        add_file(s, "file-batch", 4.0, purpose="batch")
    with db.sessions.begin() as s:
        first = file_store.list_files(s, purpose="fine-tune", after=None, limit=2, descending=True)
        assert ids(first) == ["file-3", "file-2"] and first.has_more
        rest = file_store.list_files(
            s, purpose="fine-tune", after=first.last_id, limit=5, descending=True
        )
        assert ids(rest) == ["file-1", "file-0"] and not rest.has_more
        up = file_store.list_files(s, purpose=None, after="file-1", limit=10, descending=False)
        assert ids(up) == ["file-2", "file-3", "file-batch"]
        with pytest.raises(InvalidRequest):
            file_store.list_files(s, purpose=None, after="file-x", limit=1, descending=True)
        with pytest.raises(NotFound):
            file_store.get_file(s, "file-x")


def create_job(s: Session, tmp: Path, job_id: str, at: float) -> wire.FineTuningJob:
    if s.get(t.Model, "tiny") is None:
        s.add(t.Model(name="tiny", path="/models/tiny", source="import", created_at=0.0))
        add_file(s, "file-train", 0.0)
        s.flush()
    spec = wire.FineTuningJobCreate(model="tiny", training_file="file-train", suffix="x", seed=3)
    return steps.create(s, spec, job_id, tmp / job_id, at)


def test_fine_tunes_are_created_with_their_records_and_listed_newest_first(
    db: Database, tmp_path: Path
) -> None:
    with db.sessions.begin() as s:
        job = create_job(s, tmp_path, "ftjob-a", 1.0)
        create_job(s, tmp_path, "ftjob-b", 2.0)
        create_job(s, tmp_path, "ftjob-c", 2.0)
    assert job.status == "validating_files" and job.seed == 3
    assert job.hyperparameters.n_epochs == 10  # auto: 100 examples over 8, at most 10 epochs
    with db.sessions.begin() as s:
        page = fts.list_fine_tunes(s, after=None, limit=2)
        assert ids(page) == ["ftjob-c", "ftjob-b"] and page.has_more
        assert ids(fts.list_fine_tunes(s, after="ftjob-b", limit=2)) == ["ftjob-a"]
        request = store.get_request(s, job.request_id or "")
        assert request.kind == "fine_tune" and request.state == "queued"
        kinds = sorted(j.kind for j in request.jobs)
        assert kinds == sorted(k.value for k, _ in steps.JOB_KINDS)
        assert all(len(j.tasks) == 1 and j.tasks[0].state == "pending" for j in request.jobs)
        created = store.events_of(s, "fine_tune", "ftjob-a")
        assert [(e.from_state, e.to_state) for e in created] == [(None, "validating_files")]
        with pytest.raises(Conflict):  # its training file is in use
            file_store.delete_file(s, "file-train")


def test_events_and_checkpoints(db: Database, tmp_path: Path) -> None:
    with db.sessions.begin() as s:
        create_job(s, tmp_path, "ftjob-a", 1.0)
        for step in range(1, 4):
            fts.add_event(s, "ftjob-a", f"step {step}", NOW, type="metrics", data={"step": step})
        row = fts.get_fine_tune(s, "ftjob-a")
        for step in (2, 4, 2):  # a repeated report does not add a checkpoint
            point = wire.TrainingCheckpoint(step=step, path=f"/ckpt/{step}", metrics={"loss": 1.0})
            fts.add_checkpoint(s, row, point, NOW)
        assert row.last_checkpoint == "/ckpt/2"
    with db.sessions.begin() as s:
        events = fts.list_events(s, "ftjob-a", after=None, limit=2)
        assert [e["message"] for e in events.data] == ["step 3", "step 2"] and events.has_more
        older = fts.list_events(s, "ftjob-a", after=events.last_id, limit=10)
        assert [e["message"] for e in older.data] == ["step 1", "Created fine-tuning job: ftjob-a"]
        with pytest.raises(InvalidRequest):
            fts.list_events(s, "ftjob-a", after="bogus", limit=10)
        with pytest.raises(NotFound):
            fts.list_events(s, "ftjob-zz", after=None, limit=10)
        points = fts.list_checkpoints(s, "ftjob-a", after=None, limit=1)
        assert [c["step_number"] for c in points.data] == [4] and points.has_more
        rest = fts.list_checkpoints(s, "ftjob-a", after=points.last_id, limit=5)
        assert [c["step_number"] for c in rest.data] == [2]
        assert rest.data[0]["fine_tuned_model_checkpoint"] == "ft:tiny:x:ftjob-a:ckpt-step-2"
        assert rest.data[0]["metrics"] == {"step": 2.0, "train_loss": 1.0}
        assert fts.checkpoint_step(s, "ftjob-a", "/ckpt/2") == 2


def test_settle_ends_every_record_with_an_event(db: Database, tmp_path: Path) -> None:
    with db.sessions.begin() as s:
        create_job(s, tmp_path, "ftjob-a", 1.0)
        s.add(
            t.Node(
                id="node-1",
                name="a",
                url="http://a",
                state="ready",
                resources={},
                created_at=0.0,
                updated_at=0.0,
            )
        )
        row = fts.get_fine_tune(s, "ftjob-a")
        fts.move_fine_tune(s, row, FineTuneState.QUEUED, "files ok", NOW)
        train = fts.task_of(s, fts.job_of(s, row.request_id, JobKind.FINE_TUNE_TRAIN).id)
        store.change_state(s, "task", train.id, TaskState.DISPATCHED, "sent", NOW, node_id="node-1")
        to_stop = fts.fail_in_flight(s, NOW + 1, "control plane restarted")
        assert to_stop == [("http://a", train.id)]
    with db.sessions.begin() as s:
        job = fts.job_object(fts.get_fine_tune(s, "ftjob-a"))
        assert job.status == "failed" and job.finished_at == int(NOW + 1)
        assert job.error is not None and job.error.code == "control_plane_restarted"
        request = store.get_request(s, job.request_id or "")
        assert request.state == "failed"
        assert all(j.state == "failed" for j in request.jobs)
        assert all(k.state == "failed" for j in request.jobs for k in j.tasks)
        changes = store.events_of(s, "fine_tune", "ftjob-a")
        assert [c.to_state for c in changes] == ["validating_files", "queued", "failed"]
        messages = s.scalars(select(t.FineTuneEvent.message).order_by(t.FineTuneEvent.id)).all()
        assert messages[-1] == "control plane restarted"
        assert fts.fail_in_flight(s, NOW + 2, "again") == []
        file_store.delete_file(s, "file-train")  # no job in flight reads it now
