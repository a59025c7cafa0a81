"""The reconcile loop: reads the store, asks the planner, applies its actions, refreshes routing.

Node reports (heartbeats and pushed instance reports) come in through `apply_report`, which writes
the state change and wakes the loop so that routing sees a ready instance at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane import wire
from controlplane.db import instance_startup, scaling_store, store
from controlplane.db import tables as t
from controlplane.db.session import Database
from controlplane.errors import NotFound
from controlplane.reconcile.autoscale import AutoscaleConfig
from controlplane.reconcile.autoscaler import Autoscaler
from controlplane.reconcile.groups import COUNT_FIELD
from controlplane.reconcile.planner import (
    Action,
    DeploymentView,
    DrainInstance,
    FailInstance,
    InstanceView,
    MarkNode,
    NodeView,
    StartInstance,
    StopInstance,
    plan,
)
from controlplane.registry import ReadyInstance, Registry
from controlplane.states import IllegalTransition, InstanceState, NodeState

log = logging.getLogger(__name__)

REPORTED = {
    "starting": InstanceState.STARTING,
    "ready": InstanceState.READY,
    "failed": InstanceState.FAILED,
    "stopped": InstanceState.STOPPED,
}


@dataclass(slots=True, frozen=True)
class Snapshot:
    deployments: list[DeploymentView]
    instances: list[InstanceView]
    nodes: list[NodeView]
    node_urls: dict[str, str]
    model_paths: dict[str, str]
    instance_urls: dict[str, str]
    autoscaled: dict[str, AutoscaleConfig] = field(default_factory=dict)


class Reconciler:
    def __init__(
        self,
        *,
        db: Database,
        registry: Registry,
        http: httpx.AsyncClient,
        clock: Callable[[], float],
        interval_s: float,
        node_timeout_s: float,
    ) -> None:
        self.db = db
        self.registry = registry
        self.http = http
        self.clock = clock
        self.interval_s = interval_s
        self.node_timeout_s = node_timeout_s
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._orphans: set[tuple[str, str]] = set()  # (node url, instance id) to stop
        self._lock = asyncio.Lock()
        self.autoscaler = Autoscaler(db=db, registry=registry, http=http, clock=clock)
        # The activator: a request waiting for an instance wakes the loop, so a deployment at
        # zero scales up at once rather than at the next interval.
        registry.on_waiting = lambda _deployment: self.kick()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="reconciler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.autoscaler.close()

    def kick(self) -> None:
        self._wakeup.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - one bad tick must not stop reconciling
                log.exception("reconcile tick failed")
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass
            self._wakeup.clear()

    async def tick(self) -> list[Action]:
        async with self._lock:
            snap = await self.db.run(self._snapshot)
            await self._refresh_registry(snap)
            snap = await self._autoscale(snap)
            actions = plan(
                snap.deployments,
                snap.instances,
                snap.nodes,
                now=self.clock(),
                node_timeout_s=self.node_timeout_s,
            )
            for action in actions:
                await self._apply(action, snap)
            await self._stop_orphans()
            if actions:
                await self._refresh_registry(await self.db.run(self._snapshot))
            return actions

    async def _autoscale(self, snap: Snapshot) -> Snapshot:
        groups = {
            (d.name, role): count
            for d in snap.deployments
            if d.name in snap.autoscaled
            for role, count in d.groups().items()
        }
        changed = await self.autoscaler.step(snap.autoscaled, groups)
        if not changed:
            return snap
        deployments = []
        for d in snap.deployments:
            counts: dict[str, Any] = {
                COUNT_FIELD[role]: n for (name, role), n in changed.items() if name == d.name
            }
            deployments.append(dataclasses.replace(d, **counts))
        return dataclasses.replace(snap, deployments=deployments)

    def _snapshot(self, session: Session) -> Snapshot:
        deployments = store.list_deployments(session)
        rows = session.scalars(
            select(t.Instance).where(t.Instance.state.notin_([InstanceState.STOPPED.value]))
        ).all()
        nodes = session.scalars(select(t.Node)).all()
        models = session.scalars(select(t.Model)).all()
        return Snapshot(
            deployments=[
                DeploymentView(
                    d.name,
                    d.model,
                    d.replicas,
                    d.prefill_replicas,
                    d.decode_replicas,
                    d.mode,
                    scaling_store.semi_pd_config(d),
                )
                for d in deployments
            ],
            instances=[
                InstanceView(
                    r.id,
                    r.deployment,
                    r.node_id,
                    InstanceState(r.state),
                    self.registry.inflight_on(r.id),
                    r.created_at,
                    r.updated_at,
                    r.role,
                    scaling_store.instance_semi_pd(r),
                )
                for r in rows
                if r.state != InstanceState.FAILED.value or self.clock() - r.updated_at < 120
            ],
            nodes=[NodeView(n.id, n.url, NodeState(n.state), n.last_heartbeat_at) for n in nodes],
            node_urls={n.id: n.url for n in nodes},
            model_paths={m.name: m.path for m in models},
            instance_urls={r.id: r.url for r in rows if r.url},
            autoscaled={
                d.name: config
                for d in deployments
                if (config := scaling_store.autoscale_config(d)) is not None
            },
        )

    async def _refresh_registry(self, snap: Snapshot) -> None:
        await self.registry.set_deployments(
            {d.name: d.model for d in snap.deployments},
            {d.name: d.mode for d in snap.deployments},
        )
        ready = [
            ReadyInstance(
                id=i.id,
                deployment=i.deployment,
                node_id=i.node_id,
                url=snap.instance_urls[i.id],
                accepting=i.state == InstanceState.READY,
                role=i.role,
                semi_pd=i.semi_pd is not None,
            )
            for i in snap.instances
            if i.state in (InstanceState.READY, InstanceState.DRAINING)
            and i.id in snap.instance_urls
        ]
        routed = await self.registry.set_ready(ready)
        if routed:  # registration, the fifth stage of a scale-up, ends now
            now = self.clock()
            await self.db.run(lambda s: instance_startup.record_registration(s, routed, now))

    # -- acting -------------------------------------------------------------------------------

    async def _apply(self, action: Action, snap: Snapshot) -> None:
        now = self.clock()
        match action:
            case StartInstance(deployment, model, node_id, role, semi_pd):
                await self._start(deployment, model, node_id, role, semi_pd, snap)
            case DrainInstance(instance_id, reason):
                await self._change(instance_id, InstanceState.DRAINING, reason)
            case StopInstance(instance_id, reason):
                await self._stop(instance_id, reason, snap)
            case FailInstance(instance_id, reason):
                await self._change(instance_id, InstanceState.FAILED, reason, reason=reason)
            case MarkNode(node_id, state, reason):
                await self.db.run(
                    lambda s: store.change_state(s, "node", node_id, state, reason, now)
                )

    async def _change(
        self, instance_id: str, state: InstanceState, why: str, **fields: object
    ) -> None:
        now = self.clock()
        try:
            await self.db.run(
                lambda s: store.change_state(s, "instance", instance_id, state, why, now, **fields)
            )
        except (IllegalTransition, NotFound) as exc:
            log.info("instance %s: %s", instance_id, exc)

    async def _start(
        self,
        deployment: str,
        model: str,
        node_id: str,
        role: wire.InstanceRole,
        semi_pd: wire.SemiPDConfig | None,
        snap: Snapshot,
    ) -> None:
        instance_id = f"inst-{uuid.uuid4().hex[:12]}"
        now = self.clock()
        row = t.Instance(
            id=instance_id,
            deployment=deployment,
            model=model,
            node_id=node_id,
            role=role,
            semi_pd=None if semi_pd is None else semi_pd.model_dump(mode="json"),
            state=InstanceState.PENDING.value,
            created_at=now,
            updated_at=now,
        )
        created = store.StateChange("instance", instance_id, None, "pending", "scale up", now)
        await self.db.run(lambda s: store.insert_created(s, [row], [created]))
        start = wire.InstanceStart(
            instance_id=instance_id,
            model=deployment,
            model_path=snap.model_paths[model],
            role=role,
            semi_pd=semi_pd,
        )
        try:
            reply = await self.http.post(
                f"{snap.node_urls[node_id]}/instances", content=start.model_dump_json()
            )
            reply.raise_for_status()
        except httpx.HTTPError as exc:
            reason = f"node refused the instance: {exc}"
            await self._change(instance_id, InstanceState.FAILED, reason, reason=reason)
            return
        await self._change(instance_id, InstanceState.STARTING, "node is starting it")

    async def _stop(self, instance_id: str, reason: str, snap: Snapshot) -> None:
        node_id = next((i.node_id for i in snap.instances if i.id == instance_id), None)
        url = snap.node_urls.get(node_id or "")
        if url is not None:
            try:
                await self.http.delete(f"{url}/instances/{instance_id}", timeout=30.0)
            except httpx.HTTPError as exc:
                log.warning("stopping %s on %s failed: %s", instance_id, url, exc)
        await self._change(instance_id, InstanceState.STOPPED, reason)

    async def _stop_orphans(self) -> None:
        orphans, self._orphans = self._orphans, set()
        for node_url, instance_id in orphans:
            try:
                await self.http.delete(f"{node_url}/instances/{instance_id}", timeout=30.0)
            except httpx.HTTPError as exc:
                log.warning("stopping orphan %s failed: %s", instance_id, exc)

    # -- node reports -------------------------------------------------------------------------

    async def apply_report(self, node: t.Node | None, report: wire.InstanceReport) -> None:
        """Apply one instance report; an instance the store no longer wants is stopped."""
        now = self.clock()
        target = REPORTED[report.state]

        def write(session: Session) -> str | None:
            row = session.get(t.Instance, report.instance_id)
            if row is None:
                return "unknown"
            current = InstanceState(row.state)
            instance_startup.record_launch(row, report)
            fields: dict[str, object] = {}
            if report.url:
                fields["url"] = report.url
            if report.pid:
                fields["pid"] = report.pid
            if report.reason:
                fields["reason"] = report.reason
            if current == target:
                return None
            if current in InstanceState.terminal():
                return (
                    "terminal" if target in (InstanceState.STARTING, InstanceState.READY) else None
                )
            if current == InstanceState.DRAINING and target == InstanceState.READY:
                return None
            why = report.reason or f"node reported {report.state}"
            if report.exit_code is not None:
                why = f"{why} (exit code {report.exit_code})"
            store.change_state(session, "instance", row.id, target, why, now, **fields)
            return None

        try:
            verdict = await self.db.run(write)
        except IllegalTransition as exc:
            log.info("report for %s ignored: %s", report.instance_id, exc)
            return
        if verdict is not None and node is not None and report.state in ("starting", "ready"):
            self._orphans.add((node.url, report.instance_id))
        self.kick()

    async def heartbeat(self, node_id: str, beat: wire.NodeHeartbeat) -> None:
        now = self.clock()

        def write(session: Session) -> tuple[t.Node, list[str]]:
            node = store.get_node(session, node_id)
            node.last_heartbeat_at = now
            node.resources = beat.resources.model_dump()
            if node.state != NodeState.READY.value:
                store.change_state(session, "node", node_id, NodeState.READY, "heartbeat", now)
            reported = {r.instance_id for r in beat.instances}
            grace = 3 * self.node_timeout_s
            lost = session.scalars(
                select(t.Instance.id).where(
                    t.Instance.node_id == node_id,
                    t.Instance.state.in_([InstanceState.STARTING.value, InstanceState.READY.value]),
                    t.Instance.updated_at < now - grace,
                )
            ).all()
            return node, [i for i in lost if i not in reported]

        node, lost = await self.db.run(write)
        for instance_id in lost:
            await self._change(
                instance_id, InstanceState.FAILED, "node no longer runs it", reason="lost by node"
            )
        for report in beat.instances:
            await self.apply_report(node, report)
