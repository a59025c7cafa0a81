"""The marks of one instance's start, for the `startup` field of its /health answer.

Every launch path (cold process, warm pod, fork, ipc; docs/scaling.md) sets the same wall-clock
marks, so their stage times compare like with like:

    requested   the launcher was asked for the instance (DEEPFLOW_LAUNCHED_AT in the environment)
    pod         a process for the instance existed (cold: the process's start; warm pod: when the
                pod was started; fork: the child's first instant)
    runtime     imports and device init were done
    weights     the engine had its model loaded
    ready       the KV cache was allocated and the engine thread started

Each stage is the time between consecutive marks, a mark earlier than its predecessor counting
as equal to it (a pre-warmed pod's pod and runtime marks precede the request: those stages
take 0 s), so the stages add up to the time from request to ready.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

from controlplane.wire import InstanceStartup

LAUNCHED_AT_ENV = "DEEPFLOW_LAUNCHED_AT"

# ipc: weights from a running instance on the same GPU (dataplane/scaleout/cuda_share.py)
LaunchPath = Literal["cold", "warm_pod", "fork", "ipc"]
WeightsSource = Literal["disk", "dram_cache", "zygote", "cuda_ipc", "device_copy"]


@dataclass(slots=True)
class StartupClock:
    path: LaunchPath
    requested_at: float
    pod_at: float
    runtime_at: float
    weights_at: float | None = None
    ready_at: float | None = None
    weights_source: WeightsSource | None = None

    def mark_ready(self, weights_at: float, weights_source: WeightsSource) -> None:
        self.weights_at = weights_at
        self.ready_at = time.time()
        self.weights_source = weights_source

    def report(self) -> InstanceStartup | None:
        """None until ready."""
        if self.weights_at is None or self.ready_at is None:
            return None
        marks = [self.requested_at, self.pod_at, self.runtime_at, self.weights_at, self.ready_at]
        for i in range(1, len(marks)):
            marks[i] = max(marks[i], marks[i - 1])
        stages = [round(b - a, 4) for a, b in zip(marks, marks[1:], strict=False)]
        return InstanceStartup(
            path=self.path,
            pod_ready_s=stages[0],
            runtime_preload_s=stages[1],
            weight_load_s=stages[2],
            post_load_s=stages[3],
            weights_source=self.weights_source,
        )


def launched_at(default: float) -> float:
    """When the launcher asked for this process (its environment says), else `default`."""
    try:
        return float(os.environ[LAUNCHED_AT_ENV])
    except (KeyError, ValueError):
        return default


def process_started_at() -> float:
    """This process's start (fork) as a wall-clock time, to the kernel's 10 ms tick."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    return time.time() - (uptime - started_after_boot)
