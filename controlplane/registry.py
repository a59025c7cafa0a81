"""The in-memory view of ready instances that the request path routes on (no SQL per token).

The reconciler refreshes it from the database and from node reports; the chat executor reads it
and counts the tasks it has in flight on each instance. It is also the activator: a request that
finds no instance taking requests waits here, counted per deployment, and `on_waiting` tells the
autoscaler at once so that it scales from zero without its upscale delay.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.routing.policy import InstanceLoad, pick_instance


@dataclass(slots=True)
class ReadyInstance:
    id: str
    deployment: str
    node_id: str | None
    url: str
    inflight: int = 0
    accepting: bool = True


class Registry:
    def __init__(self) -> None:
        self._instances: dict[str, ReadyInstance] = {}
        self._deployments: dict[str, str] = {}  # deployment name -> model name
        self._changed = asyncio.Condition()
        self._waiting: Counter[str] = Counter()  # deployment -> requests waiting for an instance
        self.inflight_requests = 0
        self.on_waiting: Callable[[str], None] | None = None

    # -- written by the reconciler -------------------------------------------------------------

    async def set_deployments(self, deployments: dict[str, str]) -> None:
        self._deployments = dict(deployments)
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

    def load_of(self, deployment: str) -> tuple[int, int, int]:
        """(instances taking requests, requests in flight on them, requests waiting)."""
        accepting = [
            i for i in self._instances.values() if i.deployment == deployment and i.accepting
        ]
        return len(accepting), sum(i.inflight for i in accepting), self._waiting[deployment]

    def candidates(self, deployment: str) -> list[InstanceLoad]:
        return [
            InstanceLoad(i.id, i.node_id, i.url, i.inflight)
            for i in self._instances.values()
            if i.deployment == deployment and i.accepting
        ]

    async def acquire(
        self, deployment: str, timeout: float, exclude: frozenset[str] = frozenset()
    ) -> InstanceLoad | None:
        """Wait up to `timeout` for a ready instance of the deployment and count a task on it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiting = False
        async with self._changed:
            try:
                while True:
                    choice = pick_instance(self.candidates(deployment), exclude)
                    if choice is not None:
                        self._instances[choice.id].inflight += 1
                        return choice
                    remaining = deadline - loop.time()
                    if remaining <= 0 or deployment not in self._deployments:
                        return None
                    if not waiting:
                        waiting = True
                        self._waiting[deployment] += 1
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
                    self._waiting[deployment] -= 1
                    if self._waiting[deployment] <= 0:
                        del self._waiting[deployment]

    def release(self, instance_id: str) -> None:
        inst = self._instances.get(instance_id)
        if inst is not None and inst.inflight > 0:
            inst.inflight -= 1
