"""Starts, watches and stops the FlowServe instances of this node.

Instances start through a launcher (`launchers.py`: fork, warm pod or cold on a node; a given
command line in tests); whichever path started one, its handle polls, signals and stops it the
same way. Each instance has one watcher task. On every tick it observes the process (exited?
healthy?), asks `states.judge` what that means, and applies the verdict through `_move`, the one
place a state changes; every change is handed to `on_change` (the reporter pushes it to the
control plane).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import ValidationError

from controlplane.wire import InstanceHealth, InstanceReport, InstanceStart, InstanceStartup
from dataplane.agent import process
from dataplane.agent.errors import (
    InstanceConflict,
    ShuttingDown,
    SpawnFailed,
    UnknownInstance,
)
from dataplane.agent.launch import CommandFor, check_start, flowserve_command
from dataplane.agent.launchers import CommandLauncher, InstanceLauncher
from dataplane.agent.states import InstanceState, Observation, check_transition, judge
from dataplane.scaleout.errors import ScaleOutError
from dataplane.scaleout.handles import InstanceHandle

log = logging.getLogger(__name__)

OnChange = Callable[[InstanceReport], None]
HEALTH_TIMEOUT_S = 2.0


@dataclass(slots=True)
class ManagedInstance:
    start: InstanceStart
    port: int
    url: str
    log_path: Path
    handle: InstanceHandle
    deadline: float
    state: InstanceState = InstanceState.STARTING
    exit_code: int | None = None
    reason: str | None = None
    startup: InstanceStartup | None = None  # from its /health once ready
    ready_at: float | None = None  # wall clock: when it was ready to serve
    watcher: asyncio.Task[None] | None = None
    stopper: asyncio.Task[InstanceReport] | None = None

    def report(self) -> InstanceReport:
        return InstanceReport(
            instance_id=self.start.instance_id,
            state=self.state.value,
            url=self.url if self.state is InstanceState.READY else None,
            pid=self.handle.pid,
            exit_code=self.exit_code,
            reason=self.reason,
            launch_path=self.handle.path,
            fallbacks=list(self.handle.fallbacks),
            startup=self.startup,
            ready_at=self.ready_at,
        )

    def mark_ready(self, startup: InstanceStartup | None, now: float) -> None:
        """Its stages sum to the time from the launch request to its own ready mark; without
        them (an instance that does not report them) it was ready when the agent saw it."""
        self.startup = startup
        if startup is None:
            self.ready_at = now
            return
        stages = (
            startup.pod_ready_s,
            startup.runtime_preload_s,
            startup.weight_load_s,
            startup.post_load_s,
        )
        self.ready_at = min(now, self.handle.requested_at + sum(stages))


class Supervisor:
    def __init__(
        self,
        *,
        log_dir: Path,
        on_change: OnChange,
        command_for: CommandFor | None = None,
        launcher: InstanceLauncher | None = None,
        start_timeout_s: float = 300.0,
        stop_grace_s: float = 10.0,
        poll_interval_s: float = 0.5,
        ready_poll_interval_s: float | None = None,
        instance_host: str = "127.0.0.1",
    ) -> None:
        """`launcher`: how instances start (None: `command_for`'s command line, by default
        `python -m dataplane.flowserve`, cold). `ready_poll_interval_s`: health polling while
        an instance starts (None: `poll_interval_s`); a forked one is ready in ~0.1 s."""
        if launcher is None:

            def default_command(start: InstanceStart, port: int) -> list[str]:
                return flowserve_command(start, port, instance_host)

            launcher = CommandLauncher(log_dir, command_for or default_command, instance_host)
        self._log_dir = log_dir
        self._launcher = launcher
        self._on_change = on_change
        self._start_timeout_s = start_timeout_s
        self._stop_grace_s = stop_grace_s
        self._poll_interval_s = poll_interval_s
        self._ready_poll_interval_s = min(ready_poll_interval_s or poll_interval_s, poll_interval_s)
        self._host = instance_host
        self._instances: dict[str, ManagedInstance] = {}
        self._health = httpx.AsyncClient(timeout=min(HEALTH_TIMEOUT_S, 4 * poll_interval_s))
        self._closing = False

    # -- queries -------------------------------------------------------------------------------

    def reports(self) -> list[InstanceReport]:
        return [inst.report() for inst in self._instances.values()]

    def get(self, instance_id: str) -> InstanceReport:
        return self._find(instance_id).report()

    # -- commands ------------------------------------------------------------------------------

    def start(self, start: InstanceStart) -> InstanceReport:
        """Launch the instance and begin watching it; returns its report (state `starting`).

        Starting an id that exists with the same spec returns its current report, so a control
        plane that retries a start does not get two processes. The launch runs on the caller's
        thread: a fork or a warm pod's hand-over is a message and its reply (milliseconds), a
        cold start a spawn.
        """
        if self._closing:
            raise ShuttingDown()
        check_start(start)
        existing = self._instances.get(start.instance_id)
        if existing is not None:
            if existing.start != start:
                raise InstanceConflict(start.instance_id)
            return existing.report()
        used = {inst.port for inst in self._instances.values()}
        log_path = self._log_dir / f"{start.instance_id}.log"
        try:
            port = process.free_port(self._host, avoid=used)
            handle = self._launcher.launch(start, port)
        except (OSError, ScaleOutError) as exc:
            raise SpawnFailed(start.instance_id, exc) from exc
        inst = ManagedInstance(
            start=start,
            port=port,
            url=f"http://{self._host}:{port}",
            log_path=log_path,
            handle=handle,
            deadline=time.monotonic() + self._start_timeout_s,
        )
        self._instances[start.instance_id] = inst
        log.info(
            "instance %s: %s, pid %d on port %d", start.instance_id, handle.path, handle.pid, port
        )
        self._on_change(inst.report())
        inst.watcher = asyncio.create_task(self._watch(inst), name=f"watch-{start.instance_id}")
        return inst.report()

    async def stop(self, instance_id: str) -> InstanceReport:
        """Stop the instance (SIGTERM, grace, SIGKILL) and forget it; returns its last report.

        A live instance ends `stopped`; one that had already failed keeps `failed`. Concurrent
        calls share one stop, and a caller that goes away does not interrupt it.
        """
        inst = self._find(instance_id)
        if inst.stopper is None:
            inst.stopper = asyncio.create_task(self._stop(inst), name=f"stop-{instance_id}")
        return await asyncio.shield(inst.stopper)

    async def stop_all(self) -> None:
        """Refuse new starts and stop every instance: the agent leaves no orphans."""
        self._closing = True
        ids = list(self._instances)
        results = await asyncio.gather(*(self.stop(i) for i in ids), return_exceptions=True)
        for instance_id, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, UnknownInstance):
                log.error("instance %s: stop failed: %r", instance_id, result)

    async def aclose(self) -> None:
        await self.stop_all()
        await self._health.aclose()

    # -- internals -----------------------------------------------------------------------------

    def _find(self, instance_id: str) -> ManagedInstance:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise UnknownInstance(instance_id)
        return inst

    def _move(self, inst: ManagedInstance, to_state: InstanceState, reason: str) -> None:
        check_transition(inst.state, to_state)
        log.info(
            "instance %s: %s -> %s (%s)",
            inst.start.instance_id,
            inst.state.value,
            to_state.value,
            reason,
        )
        inst.state = to_state
        inst.reason = reason
        self._on_change(inst.report())

    async def _stop(self, inst: ManagedInstance) -> InstanceReport:
        if inst.watcher is not None:
            inst.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await inst.watcher
        code = await asyncio.to_thread(inst.handle.stop, self._stop_grace_s)
        if not inst.state.is_terminal:
            inst.exit_code = code
            self._move(inst, InstanceState.STOPPED, "stopped on request")
        self._instances.pop(inst.start.instance_id, None)
        return inst.report()

    async def _health_of(self, inst: ManagedInstance) -> InstanceHealth | None:
        """Its /health answer when it says "ok"; None otherwise."""
        try:
            response = await self._health.get(f"{inst.url}/health")
            if response.status_code != 200:
                return None
            health = InstanceHealth.model_validate(response.json())
        except (httpx.HTTPError, ValueError, ValidationError):
            return None
        return health if health.status == "ok" else None

    async def _watch(self, inst: ManagedInstance) -> None:
        try:
            await self._watch_until_terminal(inst)
        except Exception:
            # A bug here must not pass silently: the instance would stay `starting` forever.
            log.exception("instance %s: watcher crashed", inst.start.instance_id)

    async def _watch_until_terminal(self, inst: ManagedInstance) -> None:
        while not inst.state.is_terminal:
            exit_code = inst.handle.poll()
            health = None
            if exit_code is None and inst.state is InstanceState.STARTING:
                health = await self._health_of(inst)
            verdict = judge(
                Observation(
                    state=inst.state,
                    exit_code=exit_code,
                    healthy=health is not None,
                    now=time.monotonic(),
                    deadline=inst.deadline,
                    start_timeout_s=self._start_timeout_s,
                )
            )
            if verdict is None:
                starting = inst.state is InstanceState.STARTING
                await asyncio.sleep(
                    self._ready_poll_interval_s if starting else self._poll_interval_s
                )
                continue
            reason = verdict.reason
            if verdict.kill or exit_code is not None:
                # Kill it, or whatever an exited leader left behind in its group.
                exit_code = await asyncio.to_thread(inst.handle.kill)
            if verdict.to_state is InstanceState.READY:
                inst.mark_ready(health.startup if health is not None else None, time.time())
            if verdict.to_state is InstanceState.FAILED:
                inst.exit_code = exit_code
                tail = process.log_tail(inst.log_path)
                reason = f"{reason}; log tail:\n{tail}" if tail else reason
            self._move(inst, verdict.to_state, reason)
