"""The agent's only caller of the control plane, and the reporter that pushes state changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
from pydantic import BaseModel, ValidationError

from controlplane.wire import (
    InstanceReport,
    NodeHeartbeat,
    NodeRegister,
    NodeRegistered,
    TrainingReport,
)
from dataplane.agent.errors import ControlPlaneError, NodeForgotten

log = logging.getLogger(__name__)

Report = InstanceReport | TrainingReport


class ControlPlaneClient:
    """`POST`s the node agent protocol to the control plane.

    `transport` replaces the network (an `httpx.MockTransport` or `httpx.ASGITransport` in tests).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport
        )

    async def register(self, body: NodeRegister) -> NodeRegistered:
        response = await self._post("/api/v1/nodes/register", body)
        try:
            return NodeRegistered.model_validate(response.json())
        except (ValueError, ValidationError) as exc:
            raise ControlPlaneError(f"bad registration reply: {exc}") from exc

    async def heartbeat(self, node_id: str, body: NodeHeartbeat) -> None:
        try:
            await self._post(f"/api/v1/nodes/{node_id}/heartbeat", body)
        except _NotFound as exc:
            raise NodeForgotten(node_id) from exc

    async def report(self, report: InstanceReport) -> None:
        await self._post(f"/api/v1/instances/{report.instance_id}/report", report)

    async def report_training(self, report: TrainingReport) -> None:
        await self._post(f"/api/v1/tasks/{report.task_id}/report", report)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: BaseModel) -> httpx.Response:
        try:
            response = await self._http.post(path, json=body.model_dump(mode="json"))
        except httpx.HTTPError as exc:
            raise ControlPlaneError(f"POST {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 404:
            raise _NotFound(f"POST {path}: 404 {response.text[:200]}")
        if not response.is_success:
            raise ControlPlaneError(f"POST {path}: {response.status_code} {response.text[:200]}")
        return response


class _NotFound(ControlPlaneError):
    pass


class Reporter:
    """Pushes instance and training reports in order, best-effort: a lost report rides the next
    heartbeat, which carries every instance's and every training task's current report."""

    def __init__(self, client: ControlPlaneClient) -> None:
        self._client = client
        self._queue: asyncio.Queue[Report] = asyncio.Queue()

    def push(self, report: Report) -> None:
        self._queue.put_nowait(report)

    async def run(self) -> None:
        while True:
            report = await self._queue.get()
            try:
                if isinstance(report, TrainingReport):
                    await self._client.report_training(report)
                else:
                    await self._client.report(report)
            except ControlPlaneError as exc:
                entity_id = (
                    report.task_id if isinstance(report, TrainingReport) else report.instance_id
                )
                log.warning("report %s %s not delivered: %s", entity_id, report.state, exc)
            finally:
                self._queue.task_done()

    async def drain(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the queued reports to be sent."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
