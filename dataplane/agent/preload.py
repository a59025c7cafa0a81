"""The node's preloads: models the control plane asked this node to hold in its DRAM cache, and
the zygotes it keeps for some of them (docs/scaling.md), so that their next instances start by a
fork or map their weights instead of reading them.

    POST /preload {"model_path", "zygote"}   -> request(): a background task per model
    GET  /preload                            -> listing(): the requests and the cache's entries

A request is idempotent and cheap to repeat: a model preloaded (and still in the cache) or
preloading is left alone, and so is its zygote while it lives; a failed preload, an evicted
entry or a dead zygote is started again. The preload runs as a child process
(`launcher.preload_command`), so torch stays out of the agent's process; a zygote is started by
the launcher on a worker thread (it blocks until the zygote holds the weights).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from controlplane.wire import (
    CachedModel,
    NodePreloads,
    PreloadReport,
    PreloadStart,
)
from controlplane.wire.agent import PreloadState, ZygoteState
from dataplane.agent.errors import ShuttingDown
from dataplane.agent.process import child_env
from dataplane.scaleout.fork import Zygote
from dataplane.scaleout.launcher import Launcher, preload_command

log = logging.getLogger(__name__)

OUTPUT_TAIL_BYTES = 2000
CLOSE_WAIT_S = 30.0


@dataclass(slots=True)
class Preload:
    model_path: str  # resolved
    requested_at: float
    updated_at: float
    state: PreloadState = "preloading"
    zygote_state: ZygoteState = "off"
    zygote: Zygote | None = None
    error: str | None = None
    task: asyncio.Task[None] | None = None

    def report(self) -> PreloadReport:
        zygote_state, error = self.zygote_state, self.error
        if zygote_state == "ready" and (self.zygote is None or not self.zygote.alive()):
            zygote_state, error = "failed", error or "the zygote exited"
        pid = self.zygote.proc.pid if zygote_state == "ready" and self.zygote else None
        return PreloadReport(
            model_path=self.model_path,
            state=self.state,
            zygote=zygote_state,
            zygote_pid=pid,
            error=error,
            requested_at=self.requested_at,
            updated_at=self.updated_at,
        )

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


class Preloader:
    def __init__(
        self,
        launcher: Launcher | None,
        *,
        cache_dir: Path,
        cache_budget_bytes: int | None = None,
        zygotes: bool = True,
        timeout_s: float = 600.0,
    ) -> None:
        """`launcher` None: zygotes cannot be started (an agent that launches by a given
        command line); the cache is still filled."""
        self._launcher = launcher
        self._cache_dir = cache_dir
        self._budget = cache_budget_bytes
        self._zygotes = zygotes and launcher is not None
        self._timeout_s = timeout_s
        self._preloads: dict[str, Preload] = {}
        self._children: set[asyncio.subprocess.Process] = set()
        self._closed = False

    # -- commands ------------------------------------------------------------------------------

    def request(self, body: PreloadStart) -> PreloadReport:
        """Start what is missing for this model in the background; its report now."""
        if self._closed:
            raise ShuttingDown()
        model_path = str(Path(body.model_path).resolve())
        now = time.time()
        preload = self._preloads.get(model_path)
        if preload is None:
            preload = Preload(model_path, requested_at=now, updated_at=now)
            self._preloads[model_path] = preload
        want_zygote = body.zygote and self._zygotes
        if not preload.running and self._missing(preload, want_zygote):
            if preload.state != "ready" or not self._cached(model_path):
                preload.state = "preloading"
            preload.error = None
            preload.updated_at = now
            preload.task = asyncio.create_task(
                self._run(preload, want_zygote), name=f"preload-{Path(model_path).name}"
            )
        return preload.report()

    def listing(self) -> NodePreloads:
        launcher = self._launcher
        pool = launcher.pool if launcher is not None else None
        return NodePreloads(
            preloads=[p.report() for p in self._preloads.values()],
            cached=cached_models(self._cache_dir),
            cache_dir=str(self._cache_dir),
            warm_pods_ready=pool.num_ready if pool is not None else 0,
        )

    async def aclose(self) -> None:
        """Stop the preloads under way; a zygote being started is stopped once it is up."""
        self._closed = True
        for child in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        tasks = [p.task for p in self._preloads.values() if p.task is not None and p.running]
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)

    # -- internals -----------------------------------------------------------------------------

    def _missing(self, preload: Preload, want_zygote: bool) -> bool:
        if preload.state != "ready" or not self._cached(preload.model_path):
            return True
        return want_zygote and preload.report().zygote in ("off", "failed")

    def _cached(self, model_path: str) -> bool:
        return any(m.model_path == model_path for m in cached_models(self._cache_dir))

    async def _run(self, preload: Preload, want_zygote: bool) -> None:
        try:
            if preload.state != "ready":
                await self._fill_cache(preload)
            if want_zygote and preload.state == "ready":
                await self._start_zygote(preload)
        except Exception as exc:  # noqa: BLE001 - a background task: its report says why
            log.exception("preload of %s failed", preload.model_path)
            preload.state = "failed"
            preload.error = f"{type(exc).__name__}: {exc}"
        preload.updated_at = time.time()

    async def _fill_cache(self, preload: Preload) -> None:
        argv = preload_command(preload.model_path, cache_dir=str(self._cache_dir))
        if self._budget is not None:
            argv[3:3] = ["--budget", str(self._budget)]  # an option of the program, not `preload`
        child = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=child_env(os.environ),
        )
        self._children.add(child)
        try:
            output, _ = await asyncio.wait_for(child.communicate(), self._timeout_s)
        except TimeoutError:
            child.kill()
            await child.wait()
            output = f"not done within {self._timeout_s:g} s".encode()
        finally:
            self._children.discard(child)
        if child.returncode != 0:
            preload.state = "failed"
            tail = output[-OUTPUT_TAIL_BYTES:].decode("utf-8", errors="replace").strip()
            preload.error = f"preload exited with {child.returncode}: {tail}"
            return
        preload.state = "ready"
        preload.updated_at = time.time()
        log.info("preloaded %s into the DRAM cache", preload.model_path)

    async def _start_zygote(self, preload: Preload) -> None:
        preload.zygote_state = "starting"
        preload.zygote = None
        preload.updated_at = time.time()
        try:
            preload.zygote = await asyncio.to_thread(self._zygote_blocking, preload.model_path)
        except Exception as exc:  # noqa: BLE001 - ZygoteUnavailable, or a closed agent
            preload.zygote_state = "failed"
            preload.error = f"zygote: {exc}"
            return
        preload.zygote_state = "ready"
        log.info("zygote of %s: pid %d", preload.model_path, preload.zygote.proc.pid)

    def _zygote_blocking(self, model_path: str) -> Zygote:
        assert self._launcher is not None
        zygote = self._launcher.start_zygote(
            model_path, cache_budget=self._budget, timeout_s=self._timeout_s
        )
        if self._closed:  # the agent stopped while it started: leave nothing behind
            self._launcher.stop_zygote(model_path)
            raise RuntimeError("the node agent is shutting down")
        return zygote


def cached_models(cache_dir: Path) -> list[CachedModel]:
    """The DRAM cache's entries, read from their index files (without importing torch)."""
    found: list[CachedModel] = []
    entries = cache_dir / "entries"
    with contextlib.suppress(OSError):
        for entry in sorted(entries.iterdir()):
            try:
                index = json.loads((entry / "index.json").read_text())
                found.append(
                    CachedModel(
                        name=entry.name,
                        model_path=str(index.get("model", "")),
                        dtype=entry.name.rsplit("-", 2)[-2] if entry.name.count("-") >= 2 else "",
                        nbytes=int(index["nbytes"]),
                    )
                )
            except (OSError, ValueError, KeyError):
                continue  # being written or evicted
    return found
