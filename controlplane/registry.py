"""The in-memory view of ready instances that the request path routes on (no SQL per token).

The reconciler refreshes it from the database and from node reports; the chat executor reads it
and counts the tasks it has in flight on each instance.
"""

from __future__ import annotations

import asyncio
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
        self.inflight_requests = 0

    # -- written by the reconciler -------------------------------------------------------------

    async def set_deployments(self, deployments: dict[str, str]) -> None:
        self._deployments = dict(deployments)
        await self._notify()

    async def set_ready(self, ready: list[ReadyInstance]) -> None:
        """Replace the ready set, keeping the in-flight counts of instances that stay."""
        fresh: dict[str, ReadyInstance] = {}
        for inst in ready:
            old = self._instances.get(inst.id)
            if old is not None:
                inst.inflight = old.inflight
            fresh[inst.id] = inst
        self._instances = fresh
        await self._notify()

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
        async with self._changed:
            while True:
                choice = pick_instance(self.candidates(deployment), exclude)
                if choice is not None:
                    self._instances[choice.id].inflight += 1
                    return choice
                remaining = deadline - loop.time()
                if remaining <= 0 or deployment not in self._deployments:
                    return None
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=remaining)
                except TimeoutError:
                    return None

    def release(self, instance_id: str) -> None:
        inst = self._instances.get(instance_id)
        if inst is not None and inst.inflight > 0:
            inst.inflight -= 1
