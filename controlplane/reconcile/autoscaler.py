"""Applies the autoscaling policy each reconcile tick, and preloads models on the nodes.

`step` asks `autoscale.decide` about every instance group of every autoscaled deployment (the
colocated, prefill and decode groups its mode has; reconcile/groups.py), each on that group's own
load and count, writes each change of a group's desired replicas together with a scaling event of
that group holding the decision's inputs, and returns the new counts for the planner, which turns
them into Start/Drain/Stop actions. Preloads
(`POST {node}/preload`) are best effort, run in the background and are recorded as scaling events
of kind `preload` with each node's answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from controlplane import wire
from controlplane.db import scaling_store
from controlplane.db.session import Database
from controlplane.reconcile.autoscale import (
    AutoscaleConfig,
    AutoscaleContext,
    AutoscaleState,
    decide,
    inputs,
)
from controlplane.registry import Registry

log = logging.getLogger(__name__)

# A deployment's model is preloaded at most this often (creation, predicted scale-ups).
PRELOAD_COOLDOWN_S = 300.0
PRELOAD_TIMEOUT_S = 5.0

GroupKey = tuple[str, str]  # (deployment, role)


class Autoscaler:
    def __init__(
        self,
        *,
        db: Database,
        registry: Registry,
        http: httpx.AsyncClient,
        clock: Callable[[], float],
    ) -> None:
        self.db = db
        self.registry = registry
        self.http = http
        self.clock = clock
        self._states: dict[GroupKey, AutoscaleState] = {}
        self._preloaded_at: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def step(
        self, configs: Mapping[str, AutoscaleConfig], groups: Mapping[GroupKey, int]
    ) -> dict[GroupKey, int]:
        """Decide for every group of every autoscaled deployment (`groups`: each group's desired
        count, by deployment and role); returns the counts that changed."""
        now = self.clock()
        changed: dict[GroupKey, int] = {}
        for key in list(self._states):
            if key not in groups or key[0] not in configs:
                del self._states[key]
        for key, current in groups.items():
            name, role = key
            config = configs.get(name)
            if config is None:
                continue
            ready, inflight, waiting = self.registry.load_of(name, role)
            ctx = AutoscaleContext(
                config=config,
                current=current,
                ready=ready,
                inflight=inflight,
                waiting=waiting,
                now=now,
                state=self._states.get(key, AutoscaleState()),
            )
            decision = decide(ctx)
            self._states[key] = decision.state
            if decision.preload and config.max_replicas > 1:
                self.request_preload(name, "scale-up predicted", zygote=True)
            if decision.replicas == ctx.current:
                continue
            if await self._write(key, ctx, decision.replicas, decision.reason):
                changed[key] = decision.replicas
                log.info(
                    "%s (%s): %d -> %d replicas (%s)",
                    name,
                    role,
                    ctx.current,
                    decision.replicas,
                    decision.reason,
                )
        return changed

    async def _write(
        self, key: GroupKey, ctx: AutoscaleContext, replicas: int, reason: str
    ) -> bool:
        name, role = key
        recorded = inputs(ctx)
        return await self.db.run(
            lambda s: scaling_store.set_replicas(
                s,
                name,
                expected=ctx.current,
                replicas=replicas,
                reason=reason,
                inputs=recorded,
                now=ctx.now,
                role=role,
            )
        )

    # -- preloading ----------------------------------------------------------------------------

    def request_preload(self, deployment: str, reason: str, *, zygote: bool | None = None) -> None:
        """Ask the ready nodes to preload the deployment's model, unless done recently.

        `zygote` (also keep a zygote, so instances fork) defaults to whether it autoscales."""
        now = self.clock()
        last = self._preloaded_at.get(deployment)
        if last is not None and now - last < PRELOAD_COOLDOWN_S:
            return
        self._preloaded_at[deployment] = now
        task = asyncio.create_task(self._preload(deployment, reason, zygote), name="preload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _preload(self, deployment: str, reason: str, zygote: bool | None) -> None:
        try:
            found = await self.db.run(lambda s: scaling_store.preload_targets(s, deployment))
            if found is None:
                return
            keep_zygote = found.autoscaled if zygote is None else zygote
            body = wire.PreloadStart(model_path=found.model_path, zygote=keep_zygote)
            urls = found.node_urls
            answers = await asyncio.gather(*(self._post(url, body) for url in urls.values()))
            recorded: dict[str, Any] = {
                "model_path": found.model_path,
                "zygote": keep_zygote,
                "nodes": dict(zip(urls, answers, strict=True)),
            }
            now, n = self.clock(), found.replicas
            await self.db.run(
                lambda s: scaling_store.record(
                    s, deployment, "preload", n, n, reason, recorded, now
                )
            )
        except Exception:  # noqa: BLE001 - preloading is best effort
            log.exception("preloading for %s failed", deployment)

    async def _post(self, node_url: str, body: wire.PreloadStart) -> str:
        url, content = f"{node_url}/preload", body.model_dump_json()
        try:
            reply = await self.http.post(url, content=content, timeout=PRELOAD_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return f"error: {exc.__class__.__name__}"
        return str(reply.status_code)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
