"""The in-memory view of ready instances that the request path routes on (no SQL per token).

The reconciler refreshes it from the database and from node reports; the chat executor reads it
and counts the tasks it has in flight on each instance. Every instance belongs to one group of its
deployment, its role (colocated, prefill or decode; reconcile/groups.py): the request path asks
for a role, or for None (any role). It is also the activator: a request that finds no instance
taking requests waits here, counted per deployment and role, and `on_waiting` tells the
autoscaler at once so that it scales the group from zero without its upscale delay.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from controlplane.reconcile.groups import COLOCATED, waits_for
from controlplane.routing.policy import InstanceLoad, pick_instance


@dataclass(slots=True)
class ReadyInstance:
    id: str
    deployment: str
    node_id: str | None
    url: str
    inflight: int = 0
    accepting: bool = True
    role: str = COLOCATED
    semi_pd: bool = False  # it runs FlowServe's semi-PD engine


class Registry:
    def __init__(self) -> None:
        self._instances: dict[str, ReadyInstance] = {}
        self._deployments: dict[str, str] = {}  # deployment name -> model name
        self._modes: dict[str, str] = {}  # deployment name -> mode (colocated when absent)
        self._changed = asyncio.Condition()
        # (deployment, role or None for any) -> requests waiting for an instance
        self._waiting: Counter[tuple[str, str | None]] = Counter()
        self.inflight_requests = 0
        self.on_waiting: Callable[[str], None] | None = None

    # -- written by the reconciler -------------------------------------------------------------

    async def set_deployments(
        self, deployments: dict[str, str], modes: dict[str, str] | None = None
    ) -> None:
        """The deployments (name -> model) and their modes (name -> mode; colocated if absent)."""
        self._deployments = dict(deployments)
        self._modes = dict(modes or {})
        await self._notify()

    async def set_ready(self, ready: list[ReadyInstance]) -> list[str]:
        """Replace the ready set, keeping the in-flight counts of instances that stay; returns
        the ids of the instances that are new to it (routed to from now on)."""
        fresh: dict[str, ReadyInstance] = {}
        added: list[str] = []
        for inst in ready:
            old = self._instances.get(inst.id)
            if old is not None:
                inst.inflight = old.inflight
            else:
                added.append(inst.id)
            fresh[inst.id] = inst
        self._instances = fresh
        await self._notify()
        return added

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- read by the request path --------------------------------------------------------------

    def has_deployment(self, name: str) -> bool:
        return name in self._deployments

    def deployment_names(self) -> list[str]:
        return sorted(self._deployments)

    def inflight_on(self, instance_id: str) -> int:
        inst = self._instances.get(instance_id)
        return inst.inflight if inst is not None else 0

    def mode_of(self, deployment: str) -> str:
        return self._modes.get(deployment, "colocated")

    def runs_semi_pd(self, instance_id: str) -> bool:
        inst = self._instances.get(instance_id)
        return inst is not None and inst.semi_pd

    def ready_roles(self, deployment: str) -> frozenset[str]:
        """The roles of the deployment that have an instance taking requests now."""
        return frozenset(
            i.role for i in self._instances.values() if i.deployment == deployment and i.accepting
        )

    def load_of(self, deployment: str, role: str | None = None) -> tuple[int, int, int]:
        """(instances taking requests, requests in flight on them, requests waiting) of one group
        of the deployment, or of all of it when `role` is None. A group's waiting requests are
        those that count toward it (`groups.waits_for`: a request for any role waits on the
        colocated group, or on every group of a disaggregated deployment)."""
        accepting = self._accepting(deployment, role)
        if role is None:
            waiting = sum(n for (d, _), n in self._waiting.items() if d == deployment)
        else:
            mode = self.mode_of(deployment)
            waiting = sum(
                n
                for (d, wanted), n in self._waiting.items()
                if d == deployment and role in waits_for(mode, wanted)
            )
        return len(accepting), sum(i.inflight for i in accepting), waiting

    def candidates(self, deployment: str, role: str | None = None) -> list[InstanceLoad]:
        """The instances of the deployment (of one role, or of any) that take requests."""
        return [
            InstanceLoad(i.id, i.node_id, i.url, i.inflight)
            for i in self._accepting(deployment, role)
        ]

    def _accepting(self, deployment: str, role: str | None) -> list[ReadyInstance]:
        return [
            i
            for i in self._instances.values()
            if i.deployment == deployment and i.accepting and (role is None or i.role == role)
        ]

    async def acquire(
        self,
        deployment: str,
        timeout: float,
        exclude: frozenset[str] = frozenset(),
        role: str | None = None,
    ) -> InstanceLoad | None:
        """Wait up to `timeout` for a ready instance of the deployment (of `role`, or of any role
        when None) and count a task on it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        key = (deployment, role)
        waiting = False
        async with self._changed:
            try:
                while True:
                    choice = pick_instance(self.candidates(deployment, role), exclude)
                    if choice is not None:
                        self._instances[choice.id].inflight += 1
                        return choice
                    remaining = deadline - loop.time()
                    if remaining <= 0 or deployment not in self._deployments:
                        return None
                    if not waiting:
                        waiting = True
                        self._waiting[key] += 1
                        if self.on_waiting is not None:
                            self.on_waiting(deployment)
                    try:
                        # Not wait_for: on 3.11 it can swallow a cancel that meets a notify.
                        async with asyncio.timeout(remaining):
                            await self._changed.wait()
                    except TimeoutError:
                        return None
            finally:
                if waiting:
                    self._waiting[key] -= 1
                    if self._waiting[key] <= 0:
                        del self._waiting[key]

    def claim(self, instance_ids: Iterable[str]) -> bool:
        """Count a task on every one of the instances (a prefill/decode pair, say) if each still
        takes requests; otherwise on none of them. Returns whether they were claimed."""
        chosen = [self._instances.get(i) for i in instance_ids]
        taken = [i for i in chosen if i is not None and i.accepting]
        if len(taken) != len(chosen):
            return False
        for inst in taken:
            inst.inflight += 1
        return True

    async def wait_for_change(
        self, deployment: str, timeout: float, role: str | None = None
    ) -> bool:
        """Wait up to `timeout` for the ready instances to change, counted meanwhile as a request
        waiting for an instance of `role` (None: any) of the deployment, as `acquire` counts it.
        False when the timeout passed first or the deployment is gone."""
        if deployment not in self._deployments or timeout <= 0:
            return False
        key = (deployment, role)
        async with self._changed:
            self._waiting[key] += 1
            try:
                if self.on_waiting is not None:
                    self.on_waiting(deployment)
                try:
                    async with asyncio.timeout(timeout):
                        await self._changed.wait()
                except TimeoutError:
                    return False
                return deployment in self._deployments
            finally:
                self._waiting[key] -= 1
                if self._waiting[key] <= 0:
                    del self._waiting[key]

    def release(self, instance_id: str) -> None:
        inst = self._instances.get(instance_id)
        if inst is not None and inst.inflight > 0:
            inst.inflight -= 1
