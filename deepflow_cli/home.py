"""Where DeepFlow keeps its files (`$DEEPFLOW_HOME`) and how the CLI finds the control plane."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8480"


def home() -> Path:
    return Path(os.environ.get("DEEPFLOW_HOME") or Path.home() / ".deepflow").expanduser()


def run_dir() -> Path:
    return home() / "run"


def logs_dir() -> Path:
    return home() / "logs"


def models_dir() -> Path:
    return home() / "models"


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What `deepflow up` leaves in `run/controlplane.json` for later commands."""

    url: str
    pid: int
    agent_pid: int | None = None

    @staticmethod
    def path() -> Path:
        return run_dir() / "controlplane.json"

    @classmethod
    def load(cls) -> RunInfo | None:
        try:
            raw = json.loads(cls.path().read_text())
            return cls(url=str(raw["url"]), pid=int(raw["pid"]), agent_pid=raw.get("agent_pid"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self) -> None:
        self.path().parent.mkdir(parents=True, exist_ok=True)
        self.path().write_text(json.dumps(asdict(self)) + "\n")


def resolve_url(explicit: str | None) -> str:
    """`--url` / `DEEPFLOW_URL` (Typer reads both into `explicit`), then `deepflow up`'s file."""
    if explicit:
        return explicit.rstrip("/")
    info = RunInfo.load()
    if info is not None:
        return info.url.rstrip("/")
    return DEFAULT_URL
