"""Registration and heartbeats: keeps this node known to the control plane."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from controlplane.wire import (
    InstanceReport,
    NodeHeartbeat,
    NodeRegister,
    NodeRegistered,
    NodeResources,
    TrainingReport,
)
from dataplane.agent.control_plane import ControlPlaneClient
from dataplane.agent.errors import ControlPlaneError, NodeForgotten

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.05


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before retry number `attempt` (0-based): doubling from `base_s`, capped at `max_s`."""
    return min(max_s, base_s * 2.0 ** min(attempt, 32))


class NodeLink:
    """Registers (retrying with backoff), then heartbeats; registers again if forgotten."""

    def __init__(
        self,
        client: ControlPlaneClient,
        registration: NodeRegister,
        instances: Callable[[], list[InstanceReport]],
        *,
        training: Callable[[], list[TrainingReport]] | None = None,
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
    ) -> None:
        self._client = client
        self._registration = registration
        self._instances = instances
        self._training = training
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self.node_id: str | None = None
        self.registered = asyncio.Event()

    @property
    def resources(self) -> NodeResources:
        return self._registration.resources

    async def run(self) -> None:
        while True:
            registered = await self.register()
            await self._beat(registered)

    async def register(self) -> NodeRegistered:
        attempt = 0
        while True:
            try:
                registered = await self._client.register(self._registration)
            except ControlPlaneError as exc:
                delay = backoff_delay(attempt, self._backoff_s, self._backoff_max_s)
                log.warning("registration failed (%s); retrying in %.1f s", exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            self.node_id = registered.node_id
            self.registered.set()
            log.info(
                "registered as node %s (heartbeat every %g s)",
                registered.node_id,
                registered.heartbeat_interval_s,
            )
            return registered

    async def _beat(self, registered: NodeRegistered) -> None:
        """Heartbeat at once and then every interval; returns when the node was forgotten."""
        interval = max(registered.heartbeat_interval_s, MIN_INTERVAL_S)
        while True:
            began = time.monotonic()
            body = NodeHeartbeat(
                resources=self.resources,
                instances=self._instances(),
                training=self._training() if self._training is not None else [],
            )
            try:
                await self._client.heartbeat(registered.node_id, body)
            except NodeForgotten:
                log.warning("control plane forgot node %s; registering again", registered.node_id)
                self.node_id = None
                self.registered.clear()
                return
            except ControlPlaneError as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))
