"""How the supervisor starts an instance's process.

On a node the scale-out `Launcher` does it (docs/scaling.md): fork from a zygote of the model,
else a pre-warmed pod (weights mapped from the DRAM cache), else a cold `python -m
dataplane.flowserve`. A caller that gives its own command line (tests) gets `CommandLauncher`,
which has only the cold path and runs exactly that command.

Importing this module does not import torch: the agent keeps torch out of its own process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from controlplane.wire import InstanceStart
from dataplane.agent import process
from dataplane.agent.launch import CommandFor, check_start
from dataplane.agent.settings import AgentSettings
from dataplane.scaleout.handles import InstanceHandle, ProcessHandle
from dataplane.scaleout.launcher import Launcher
from dataplane.scaleout.pool import WarmPool


class InstanceLauncher(Protocol):
    def launch(self, start: InstanceStart, port: int) -> InstanceHandle:
        """Start the instance on `port`; returns at once (it is ready when /health says so).
        Raises InvalidStart for a bad start, OSError when no process could be started."""
        ...


@dataclass(slots=True)
class CommandLauncher:
    """The cold path with a given command line: `command_for(start, port)` in its own session,
    output appended to `<log_dir>/<instance id>.log`."""

    log_dir: Path
    command_for: CommandFor
    host: str = "127.0.0.1"

    def launch(self, start: InstanceStart, port: int) -> InstanceHandle:
        check_start(start)
        log_path = self.log_dir / f"{start.instance_id}.log"
        requested_at = time.time()
        proc = process.spawn(self.command_for(start, port), log_path)
        return ProcessHandle(
            instance_id=start.instance_id,
            path="cold",
            pid=proc.pid,
            url=f"http://{self.host}:{port}",
            log_path=str(log_path),
            requested_at=requested_at,
            dispatched_at=time.time(),
            proc=proc,
        )


def scaleout_launcher(settings: AgentSettings) -> Launcher:
    """The node's launcher with its warm pool (not started yet: `launcher.pool.start()`)."""
    pool = None
    if settings.warm_pool_size > 0:
        pool = WarmPool(
            settings.warm_pool_size,
            log_dir=settings.scaleout_log_dir,
            cache_dir=settings.cache_dir,
            torch_threads=settings.torch_threads,
        )
    return Launcher(
        log_dir=settings.instance_log_dir,
        host=settings.instance_host,
        cache_dir=settings.cache_dir,
        pool=pool,
        torch_threads=settings.torch_threads,
    )
