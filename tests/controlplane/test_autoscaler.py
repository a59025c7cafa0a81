"""The reconciler applying autoscaling decisions on both backends: the desired replicas it writes,
the scaling events that record them with their inputs, and the preloads it asks nodes for."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane import wire
from controlplane.db import scaling_store, store
from controlplane.db import tables as t
from controlplane.db.session import Database
from controlplane.reconcile.reconciler import Reconciler
from controlplane.registry import Registry
from controlplane.states import InstanceState


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


def seed(db: Database, clock: Clock, **deployment: object) -> None:
    spec = wire.DeploymentCreate(name="d", model="m", **deployment)  # type: ignore[arg-type]

    def write(s: Session) -> None:
        now = clock()
        s.add(t.Model(name="m", path="/models/m", source="import", created_at=now))
        s.flush()
        store.add_deployment(s, spec, now)
        node = t.Node(
            id="n1",
            name="n1",
            url="http://node",
            state="ready",
            resources={"cpus": 2, "memory_bytes": 1 << 30},
            last_heartbeat_at=now,
            created_at=now,
            updated_at=now,
        )
        s.add(node)

    db.call(write)


class FakeNode:
    """The node agent: accepts instances; `/preload` answers 404 (an agent without it)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, object] | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.seen.append((request.method, request.url.path, body))
        if request.url.path == "/preload":
            return httpx.Response(404, json={"error": {"message": "no such route"}})
        return httpx.Response(202, json={"instance_id": "x", "state": "starting"})

    def calls(self, method: str, path: str) -> list[dict[str, object] | None]:
        return [b for m, p, b in self.seen if m == method and p == path]


def scenario(db: Database, clock: Clock, node: FakeNode, body: object) -> None:
    async def main() -> None:
        registry = Registry()
        async with httpx.AsyncClient(transport=httpx.MockTransport(node)) as http:
            reconciler = Reconciler(
                db=db,
                registry=registry,
                http=http,
                clock=clock,
                interval_s=60.0,
                node_timeout_s=1e9,
            )
            try:
                await body(reconciler, registry)  # type: ignore[operator]
            finally:
                await reconciler.close()

    asyncio.run(main())


def events(db: Database) -> list[wire.ScalingEventInfo]:
    return list(reversed(db.call(lambda s: scaling_store.list_events(s, "d", limit=100))))


def replicas(db: Database) -> int:
    return db.call(lambda s: store.get_deployment(s, "d").replicas)


def test_a_waiting_request_scales_from_zero_at_once_and_idleness_back_to_zero(
    db: Database,
) -> None:
    clock, node = Clock(), FakeNode()
    seed(db, clock, max_replicas=3, replicas=0, scale_to_zero_after_s=60)

    async def body(reconciler: Reconciler, registry: Registry) -> None:
        await reconciler.tick()
        assert replicas(db) == 0 and node.calls("POST", "/instances") == []
        waiter = asyncio.create_task(registry.acquire("d", timeout=30.0))
        await asyncio.sleep(0.05)
        assert registry.load_of("d") == (0, 0, 1)
        assert reconciler._wakeup.is_set()  # the activator woke the loop
        await reconciler.tick()
        waiter.cancel()
        assert replicas(db) == 1
        (start,) = node.calls("POST", "/instances")
        assert start is not None and start["model_path"] == "/models/m"

        clock.now += 10
        await reconciler.tick()  # idle from here
        clock.now += 59
        await reconciler.tick()
        assert replicas(db) == 1
        clock.now += 1
        actions = await reconciler.tick()
        assert replicas(db) == 0
        assert [type(a).__name__ for a in actions] == ["DrainInstance"]

    scenario(db, clock, node, body)
    autoscaled = [e for e in events(db) if e.kind == "autoscale"]
    assert [(e.from_replicas, e.to_replicas) for e in autoscaled] == [(0, 1), (1, 0)]
    assert autoscaled[0].reason == "scale from zero: 1 requests waiting"
    assert autoscaled[0].inputs["waiting"] == 1 and autoscaled[0].inputs["max_replicas"] == 3
    assert "keep-alive" in autoscaled[1].reason
    (instance,) = db.call(lambda s: s.scalars(select(t.Instance)).all())
    assert instance.state == InstanceState.DRAINING.value


def test_load_above_target_scales_up_after_the_delay_and_preloads(db: Database) -> None:
    clock, node = Clock(), FakeNode()
    seed(db, clock, max_replicas=4, min_replicas=1, upscale_delay_s=30, target_concurrency=2)

    async def body(reconciler: Reconciler, registry: Registry) -> None:
        # One ready instance with 7 requests in flight (the store knows of no instance, so the
        # registry's answer is set here rather than through a refresh).
        registry.load_of = lambda _d, _role=None: (1, 7, 0)  # type: ignore[method-assign,assignment]
        await reconciler.tick()
        assert replicas(db) == 1
        await asyncio.gather(*reconciler.autoscaler._tasks)  # the preload runs in the background
        clock.now += 30
        await reconciler.tick()
        assert replicas(db) == 4

    scenario(db, clock, node, body)
    (preload,) = node.calls("POST", "/preload")
    assert preload == {"model_path": "/models/m", "zygote": True}
    kinds = [(e.kind, e.from_replicas, e.to_replicas) for e in events(db)]
    assert ("autoscale", 1, 4) in kinds
    (recorded,) = [e for e in events(db) if e.kind == "preload"]
    assert recorded.inputs["nodes"] == {"n1": "404"}  # an agent without /preload is harmless


def test_fixed_deployments_are_left_alone(db: Database) -> None:
    clock, node = Clock(), FakeNode()
    seed(db, clock, replicas=0)

    async def body(reconciler: Reconciler, registry: Registry) -> None:
        waiter = asyncio.create_task(registry.acquire("d", timeout=30.0))
        await asyncio.sleep(0.05)
        await reconciler.tick()
        waiter.cancel()
        assert replicas(db) == 0

    scenario(db, clock, node, body)
    assert events(db) == []


def test_scaling_events_and_settings_round_trip(db: Database) -> None:
    clock = Clock()
    seed(db, clock, max_replicas=4, downscale_delay_s=5)
    row = db.call(lambda s: store.deployment_info(s, store.get_deployment(s, "d")))
    assert row.autoscaling is not None and row.autoscaling.downscale_delay_s == 5
    assert row.autoscaling.upscale_delay_s == 30 and row.replicas == 1

    def scale(s: Session) -> None:
        store.update_deployment(s, "d", wire.DeploymentUpdate(replicas=3), clock.now)

    db.call(scale)
    (manual,) = events(db)
    assert (manual.kind, manual.from_replicas, manual.to_replicas) == ("manual", 1, 3)
    assert manual.inputs == {"replicas": 3}
    assert not db.call(
        lambda s: scaling_store.set_replicas(
            s, "d", expected=1, replicas=2, reason="stale", inputs={}, now=clock.now
        )
    )
    assert replicas(db) == 3
    db.call(lambda s: store.delete_deployment_row(s, "d"))
    assert events(db) == []


# -- instance groups: each group scaled on its own load ------------------------------------------


def test_each_group_is_scaled_on_its_own_load(db: Database) -> None:
    clock, node = Clock(), FakeNode()
    seed(
        db,
        clock,
        mode="disaggregated",
        max_replicas=3,
        prefill_replicas=0,
        decode_replicas=0,
        upscale_delay_s=30,
    )

    async def body(reconciler: Reconciler, registry: Registry) -> None:
        await reconciler.tick()
        waiter = asyncio.create_task(registry.acquire("d", timeout=30.0, role="prefill"))
        await asyncio.sleep(0.05)
        await reconciler.tick()  # the activator: only the prefill group scales from zero
        waiter.cancel()
        assert groups(db) == {"prefill": 1, "decode": 0}
        (start,) = node.calls("POST", "/instances")
        assert start is not None and start["role"] == "prefill"

        loads: dict[str | None, tuple[int, int, int]] = {"prefill": (1, 0, 0), "decode": (1, 7, 0)}
        registry.load_of = lambda _d, role=None: loads[role]  # type: ignore[method-assign,assignment]
        await reconciler.tick()
        clock.now += 30
        await reconciler.tick()
        assert groups(db) == {"prefill": 1, "decode": 3}  # decode up; prefill kept alive

    scenario(db, clock, node, body)
    decisions = [e for e in events(db) if e.kind == "autoscale"]
    assert [(e.role, e.from_replicas, e.to_replicas) for e in decisions] == [
        ("prefill", 0, 1),
        ("decode", 0, 3),
    ]
    first, second = decisions
    assert first.reason.startswith("scale from zero") and first.inputs["waiting"] == 1
    assert second.inputs["load"] == 7 and second.inputs["current"] == 0
    rows = db.call(lambda s: s.scalars(select(t.Instance)).all())
    assert sorted(r.role for r in rows) == ["decode", "decode", "decode", "prefill"]


def test_scaling_one_group_by_hand_records_that_group_only(db: Database) -> None:
    clock = Clock()
    seed(db, clock, mode="auto")

    def scale(s: Session) -> None:
        body = wire.DeploymentUpdate(decode_replicas=2, prefill_replicas=1)
        store.update_deployment(s, "d", body, clock.now)

    db.call(scale)
    assert groups(db) == {"colocated": 1, "prefill": 1, "decode": 2}
    (manual,) = events(db)
    assert (manual.kind, manual.role, manual.from_replicas, manual.to_replicas) == (
        "manual",
        "decode",
        1,
        2,
    )
    assert not db.call(
        lambda s: scaling_store.set_replicas(
            s, "d", expected=1, replicas=3, reason="stale", inputs={}, now=1.0, role="decode"
        )
    )
    assert db.call(
        lambda s: scaling_store.set_replicas(
            s, "d", expected=1, replicas=0, reason="idle", inputs={}, now=1.0, role="prefill"
        )
    )
    assert groups(db) == {"colocated": 1, "prefill": 0, "decode": 2}


def groups(db: Database) -> dict[str, int]:
    info = db.call(lambda s: store.deployment_info(s, store.get_deployment(s, "d")))
    return {g.role: g.replicas for g in info.groups}
