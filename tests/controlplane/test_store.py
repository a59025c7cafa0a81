"""The store on both backends: migrations, records and their events, state changes, recovery."""

from __future__ import annotations

import asyncio

import pytest
from alembic import command
from sqlalchemy import inspect, select, text

from controlplane import wire
from controlplane.db import scaling_store, store
from controlplane.db import tables as t
from controlplane.db.recorder import Recorder, Tracked
from controlplane.db.session import Database, alembic_config
from controlplane.errors import Conflict, NotFound
from controlplane.states import (
    IllegalTransition,
    JobState,
    RequestState,
    TaskState,
)


def clock() -> float:
    return 1000.0


@pytest.fixture
def db(database_url: str) -> Database:
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


def test_migrations_match_models_and_round_trip(database_url: str) -> None:
    database = Database(database_url)
    cfg = alembic_config(database.engine)
    command.upgrade(cfg, "head")
    command.check(cfg)  # raises if the tables and the migrations drifted apart
    command.downgrade(cfg, "base")
    assert set(inspect(database.engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(cfg, "head")
    names = set(inspect(database.engine).get_table_names())
    assert {
        "models",
        "deployments",
        "nodes",
        "instances",
        "requests",
        "jobs",
        "tasks",
        "events",
    } <= names
    database.dispose()


def _chat_records(recorder: Recorder, rid: str, *, tasks: tuple[str, ...] = ("colocated",)):
    request = Tracked("request", rid, RequestState.QUEUED)
    job = Tracked("job", f"job-{rid}", JobState.PENDING)
    tracked_tasks = [Tracked("task", f"task-{rid}-{k}", TaskState.PENDING) for k in tasks]
    rows: list[t.Base] = [
        t.Request(id=rid, kind="chat.completion", deployment="d", state="queued", created_at=1.0),
        t.Job(id=job.id, request_id=rid, kind="chat", state="pending", created_at=1.0),
    ]
    rows += [
        t.Task(id=tt.id, job_id=job.id, kind=k, state="pending", created_at=1.0)
        for tt, k in zip(tracked_tasks, tasks, strict=True)
    ]
    recorder.create(rows, [request, job, *tracked_tasks], "accepted")
    return request, job, tracked_tasks


def test_recorder_batches_and_every_change_has_an_event(db: Database) -> None:
    async def scenario() -> None:
        recorder = Recorder(db.sessions, clock=clock, flush_interval_s=0.01)
        recorder.start()
        request, job, (task,) = _chat_records(recorder, "req-1")
        recorder.move(task, TaskState.DISPATCHED, "dispatched", instance_id="inst-1")
        recorder.move(job, JobState.RUNNING, "running")
        recorder.move(request, RequestState.RUNNING, "running")
        recorder.move(task, TaskState.RUNNING, "first output")
        for rec, state in ((task, TaskState.SUCCEEDED), (job, JobState.SUCCEEDED)):
            recorder.move(rec, state, "completed", finished_at=2.0)
        recorder.move(request, RequestState.SUCCEEDED, "completed", completion_tokens=7)
        # Nothing has touched the database yet: the moves were queued.
        await recorder.close()
        assert recorder.batches_written >= 1

    asyncio.run(scenario())
    info = db.call(lambda s: store.get_request(s, "req-1"))
    assert info.state == "succeeded" and info.completion_tokens == 7
    (job,) = info.jobs
    (task,) = job.tasks
    assert job.state == "succeeded" and task.state == "succeeded"
    assert task.instance_id == "inst-1"
    assert [e.to_state for e in task.events] == [
        "pending",
        "dispatched",
        "running",
        "succeeded",
    ]
    assert [(e.from_state, e.to_state) for e in info.events] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ]
    assert all(e.reason and e.at == 1000.0 for e in task.events)


def test_recorder_rejects_illegal_moves_at_once(db: Database) -> None:
    recorder = Recorder(db.sessions, clock=clock)
    request, _, _ = _chat_records(recorder, "req-2")
    with pytest.raises(IllegalTransition):
        recorder.move(request, RequestState.SUCCEEDED, "skipped running")
    assert request.state == RequestState.QUEUED


def test_schema_expresses_disaggregated_and_multi_job_requests(db: Database) -> None:
    async def scenario() -> None:
        recorder = Recorder(db.sessions, clock=clock)
        _chat_records(recorder, "req-pd", tasks=("prefill", "decode"))
        ft = Tracked("request", "req-ft", RequestState.QUEUED)
        jobs = [
            Tracked("job", f"job-ft-{k}", JobState.PENDING)
            for k in ("validate", "train", "evaluate", "register")
        ]
        rows: list[t.Base] = [t.Request(id=ft.id, kind="fine_tune", state="queued", created_at=1.0)]
        rows += [
            t.Job(
                id=j.id,
                request_id=ft.id,
                kind=f"fine_tune_{j.id.split('-')[-1]}",
                state="pending",
                created_at=1.0,
            )
            for j in jobs
        ]
        recorder.create(rows, [ft, *jobs], "accepted")
        await recorder.close()

    asyncio.run(scenario())
    pd = db.call(lambda s: store.get_request(s, "req-pd"))
    assert [task.kind for task in pd.jobs[0].tasks] == ["prefill", "decode"]
    ft = db.call(lambda s: store.get_request(s, "req-ft"))
    assert len(ft.jobs) == 4


def test_fail_orphans_leaves_nothing_in_flight(db: Database) -> None:
    async def scenario() -> None:
        recorder = Recorder(db.sessions, clock=clock)
        _, job, (task,) = _chat_records(recorder, "req-3")
        recorder.move(task, TaskState.DISPATCHED, "dispatched")
        await recorder.close()

    asyncio.run(scenario())
    count = db.call(lambda s: store.fail_orphans(s, 5.0, "control plane restarted"))
    assert count == 3
    info = db.call(lambda s: store.get_request(s, "req-3"))
    assert info.state == "failed" and info.error == "control plane restarted"
    assert info.jobs[0].tasks[0].state == "failed"
    assert info.jobs[0].tasks[0].events[-1].reason == "control plane restarted"
    assert db.call(lambda s: store.fail_orphans(s, 6.0, "again")) == 0


def test_change_state_checks_the_table(db: Database) -> None:
    def setup(s):
        row = t.Node(
            id="n1",
            name="n1",
            url="u",
            state="ready",
            resources={"cpus": 1, "memory_bytes": 1},
            created_at=1.0,
            updated_at=1.0,
        )
        store.insert_created(s, [row], [store.StateChange("node", "n1", None, "ready", "r", 1.0)])

    db.call(setup)
    change = db.call(lambda s: store.change_state(s, "node", "n1", "unreachable", "silent", 2.0))
    assert change is not None and change.from_state == "ready"
    assert (
        db.call(lambda s: store.change_state(s, "node", "n1", "unreachable", "again", 3.0)) is None
    )
    with pytest.raises(NotFound):
        db.call(lambda s: store.change_state(s, "node", "nope", "down", "x", 3.0))
    events = db.call(lambda s: store.events_of(s, "node", "n1"))
    assert [e.to_state for e in events] == ["ready", "unreachable"]


def test_models_and_deployments(db: Database) -> None:
    model = t.Model(name="m", path="/x", source="import", created_at=1.0)
    db.call(lambda s: store.add_model(s, model))
    with pytest.raises(Conflict):
        db.call(
            lambda s: store.add_model(
                s, t.Model(name="m", path="/y", source="import", created_at=1.0)
            )
        )
    spec = wire.DeploymentCreate(name="d", model="m", replicas=2)
    db.call(lambda s: store.add_deployment(s, spec, 1.0))
    with pytest.raises(NotFound):
        db.call(lambda s: store.add_deployment(s, wire.DeploymentCreate(name="e", model="zz"), 1.0))
    with pytest.raises(Conflict):
        db.call(lambda s: store.delete_model(s, "m"))
    info = db.call(lambda s: store.deployment_info(s, store.get_deployment(s, "d")))
    assert info.replicas == 2 and info.ready_replicas == 0
    db.call(lambda s: store.delete_deployment_row(s, "d"))
    db.call(lambda s: store.delete_model(s, "m"))
    assert db.call(lambda s: s.scalars(select(t.Model)).all()) == []


def test_groups_migration_keeps_existing_deployments_colocated(database_url: str) -> None:
    database = Database(database_url)
    cfg = alembic_config(database.engine)
    command.upgrade(cfg, "5c2e9a7d41b3")
    with database.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO models (name, path, source, created_at) VALUES ('m', '/m', 'x', 1)")
        )
        conn.execute(
            text(
                "INSERT INTO deployments (name, model, replicas, config, created_at, updated_at) "
                "VALUES ('d', 'm', 2, '{}', 1, 1)"
            )
        )
        for kind in ("manual", "preload"):
            conn.execute(
                text(
                    "INSERT INTO scaling_events (deployment, kind, from_replicas, to_replicas, "
                    "reason, inputs, at) VALUES ('d', :kind, 1, 2, 'r', '{}', 1)"
                ),
                {"kind": kind},
            )
    command.upgrade(cfg, "df6ff830d4b1")
    with database.engine.connect() as conn:  # SQL of that revision: the tables have moved on
        row = conn.execute(
            text("SELECT mode, replicas, prefill_replicas, decode_replicas FROM deployments")
        ).one()
        assert tuple(row) == ("colocated", 2, 0, 0)
        roles = conn.scalars(text("SELECT role FROM scaling_events ORDER BY id")).all()
        assert roles == ["colocated", None]
    command.downgrade(cfg, "5c2e9a7d41b3")
    columns = {c["name"] for c in inspect(database.engine).get_columns("deployments")}
    assert "mode" not in columns and "replicas" in columns
    database.dispose()


def test_deployment_groups_and_their_ready_counts(db: Database) -> None:
    def setup(s) -> None:
        store.add_model(s, t.Model(name="m", path="/x", source="import", created_at=1.0))
        spec = wire.DeploymentCreate(name="d", model="m", mode="auto", decode_replicas=2)
        store.add_deployment(s, spec, 1.0)
        for iid, role, state in (
            ("c1", "colocated", "ready"),
            ("p1", "prefill", "starting"),
            ("d1", "decode", "ready"),
            ("d2", "decode", "ready"),
            ("d3", "decode", "stopped"),
        ):
            s.add(
                t.Instance(
                    id=iid,
                    deployment="d",
                    model="m",
                    role=role,
                    state=state,
                    created_at=1.0,
                    updated_at=1.0,
                )
            )

    db.call(setup)
    info = db.call(lambda s: store.deployment_info(s, store.get_deployment(s, "d")))
    assert info.mode == "auto" and (info.replicas, info.ready_replicas) == (1, 1)
    assert [(g.role, g.replicas, g.ready_replicas) for g in info.groups] == [
        ("colocated", 1, 1),
        ("prefill", 1, 0),
        ("decode", 2, 2),
    ]
    assert {i.role for i in info.instances} == {"colocated", "prefill", "decode"}

    db.call(
        lambda s: store.update_deployment(
            s, "d", wire.DeploymentUpdate(mode="disaggregated", prefill_replicas=3), 2.0
        )
    )
    info = db.call(lambda s: store.deployment_info(s, store.get_deployment(s, "d")))
    assert info.mode == "disaggregated" and info.replicas == 0
    assert [(g.role, g.replicas) for g in info.groups] == [("prefill", 3), ("decode", 2)]
    events = db.call(lambda s: scaling_store.list_events(s, "d", limit=10))
    assert sorted((e.role, e.from_replicas, e.to_replicas) for e in events) == [
        ("colocated", 1, 0),
        ("prefill", 1, 3),
    ]
    assert all(e.reason == "auto -> disaggregated" for e in events)


def test_semi_pd_migration_leaves_existing_deployments_without_settings(database_url: str) -> None:
    database = Database(database_url)
    cfg = alembic_config(database.engine)
    command.upgrade(cfg, "1e1595e9e784")
    with database.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO models (name, path, source, created_at) VALUES ('m', '/m', 'x', 1)")
        )
        conn.execute(
            text(
                "INSERT INTO deployments (name, model, replicas, config, created_at, updated_at) "
                "VALUES ('d', 'm', 2, '{}', 1, 1)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO instances (id, deployment, model, role, state, created_at, "
                "updated_at) VALUES ('i', 'd', 'm', 'colocated', 'ready', 1, 1)"
            )
        )
    command.upgrade(cfg, "4c75c18aaccf")
    with database.engine.connect() as conn:
        row = conn.execute(
            text("SELECT slo_ttft_ms, slo_tpot_ms, semi_pd_split, semi_pd_static FROM deployments")
        ).one()
        assert tuple(row) == (None, None, None, False)
        assert conn.scalars(text("SELECT semi_pd FROM instances")).all() == [None]
    command.downgrade(cfg, "1e1595e9e784")
    columns = {c["name"] for c in inspect(database.engine).get_columns("deployments")}
    assert "slo_ttft_ms" not in columns and "mode" in columns
    assert "semi_pd" not in {c["name"] for c in inspect(database.engine).get_columns("instances")}
    database.dispose()


def test_semi_pd_deployments_and_instances_keep_their_settings(db: Database) -> None:
    config = wire.SemiPDConfig(slo_ttft_ms=300.5, slo_tpot_ms=40, split=30, static=True)

    def setup(s) -> None:
        store.add_model(s, t.Model(name="m", path="/x", source="import", created_at=1.0))
        spec = wire.DeploymentCreate(
            name="d",
            model="m",
            mode="semi-pd",
            replicas=2,
            slo_ttft_ms=300.5,
            slo_tpot_ms=40,
            semi_pd_split=30,
            semi_pd_static=True,
        )
        store.add_deployment(s, spec, 1.0)
        for iid, semi_pd in (("s1", config.model_dump(mode="json")), ("c1", None)):
            s.add(
                t.Instance(
                    id=iid,
                    deployment="d",
                    model="m",
                    role="colocated",
                    semi_pd=semi_pd,
                    state="ready",
                    created_at=1.0,
                    updated_at=1.0,
                )
            )

    db.call(setup)
    info = db.call(lambda s: store.deployment_info(s, store.get_deployment(s, "d")))
    assert info.mode == "semi-pd" and info.semi_pd == config
    assert (info.replicas, info.ready_replicas) == (2, 2)
    assert {i.id: i.semi_pd for i in info.instances} == {"s1": config, "c1": None}
    assert db.call(lambda s: scaling_store.scaling_spec(store.get_deployment(s, "d"))).semi_pd == (
        config
    )

    db.call(lambda s: store.update_deployment(s, "d", wire.DeploymentUpdate(slo_tpot_ms=25), 2.0))
    info = db.call(lambda s: store.deployment_info(s, store.get_deployment(s, "d")))
    assert info.semi_pd == config.model_copy(update={"slo_tpot_ms": 25})
    db.call(lambda s: store.update_deployment(s, "d", wire.DeploymentUpdate(mode="auto"), 3.0))
    row = db.call(lambda s: store.get_deployment(s, "d"))
    assert (row.mode, row.slo_ttft_ms, row.semi_pd_split, row.semi_pd_static) == (
        "auto",
        None,
        None,
        False,
    )
    events = db.call(lambda s: scaling_store.list_events(s, "d", limit=10))
    assert [(e.role, e.reason) for e in events] == [  # newest first
        ("decode", "semi-pd -> auto"),  # the groups auto adds
        ("prefill", "semi-pd -> auto"),
        (None, "semi-PD settings changed by hand"),
    ]
