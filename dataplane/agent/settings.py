"""The node agent's settings, read once at start-up."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path


def deepflow_home() -> Path:
    """`$DEEPFLOW_HOME`, default `~/.deepflow`."""
    return Path(os.environ.get("DEEPFLOW_HOME") or Path.home() / ".deepflow")


def default_name() -> str:
    return socket.gethostname() or "node"


@dataclass(frozen=True, slots=True)
class AgentSettings:
    control_plane_url: str  # e.g. http://127.0.0.1:8480
    url: str  # this agent's own URL, sent to the control plane at registration
    name: str
    home: Path
    request_timeout_s: float = 5.0  # each call to the control plane (register, heartbeat, report)
    start_timeout_s: float = 300.0  # an instance not healthy by then is killed and failed
    stop_grace_s: float = 10.0  # SIGTERM -> SIGKILL
    poll_interval_s: float = 0.5  # process watch and health polling
    register_backoff_s: float = 0.5  # first retry delay; doubles up to register_backoff_max_s
    register_backoff_max_s: float = 10.0
    instance_host: str = "127.0.0.1"  # where instances listen; their URL uses it too
    # SIGTERM -> SIGKILL for a trainer; it stops between steps, and a stop must take seconds.
    training_stop_grace_s: float = 5.0
    # Fast scale-out (docs/scaling.md). The defaults here suit tests; `python -m dataplane.agent`
    # defaults to a real node's (a pool of 2, zygotes on a CPU node).
    warm_pool_size: int = 0  # model-agnostic pods kept booted
    cache_dir: Path | None = None  # the DRAM cache (None: $DEEPFLOW_CACHE_DIR or /dev/shm/...)
    cache_budget_bytes: int | None = None  # None: half the cache's filesystem
    zygotes: bool | None = None  # start zygotes when a preload asks (None: on for CPU nodes)
    torch_threads: int | None = None  # per instance (None: 1 forked, torch's default otherwise)
    ready_poll_interval_s: float = 0.05  # health polling while an instance starts
    preload_timeout_s: float = 600.0  # a preload (DRAM cache, then the zygote) may take this long

    def __post_init__(self) -> None:
        for name in (
            "request_timeout_s",
            "start_timeout_s",
            "poll_interval_s",
            "register_backoff_s",
            "register_backoff_max_s",
            "ready_poll_interval_s",
            "preload_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.stop_grace_s < 0 or self.training_stop_grace_s < 0:
            raise ValueError("stop grace periods must not be negative")
        if not self.name:
            raise ValueError("name must not be empty")
        if self.warm_pool_size < 0:
            raise ValueError("warm_pool_size must not be negative")
        if self.cache_budget_bytes is not None and self.cache_budget_bytes < 1:
            raise ValueError("cache_budget_bytes must be positive")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("torch_threads must be at least 1")

    @property
    def instance_log_dir(self) -> Path:
        return self.home / "logs" / "instances"

    @property
    def scaleout_log_dir(self) -> Path:
        """Warm pods' and zygotes' own logs (an instance's goes to instance_log_dir)."""
        return self.home / "logs" / "scaleout"

    @property
    def training_log_dir(self) -> Path:
        return self.home / "logs" / "training"

    @property
    def training_spec_dir(self) -> Path:
        return self.home / "run" / "training"
