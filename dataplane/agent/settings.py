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

    def __post_init__(self) -> None:
        for name in (
            "request_timeout_s",
            "start_timeout_s",
            "poll_interval_s",
            "register_backoff_s",
            "register_backoff_max_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.stop_grace_s < 0:
            raise ValueError("stop_grace_s must not be negative")
        if not self.name:
            raise ValueError("name must not be empty")

    @property
    def instance_log_dir(self) -> Path:
        return self.home / "logs" / "instances"
