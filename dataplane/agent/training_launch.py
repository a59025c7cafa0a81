"""How a `TrainingStart` becomes a trainer process: its check, its spec file, its command line.

The trainer's spec file is the `TrainingStart` itself (`dataplane.training` reads one), so
`resume_from` and every hyperparameter reach the trainer unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from controlplane.wire import TrainingStart
from dataplane.agent import process
from dataplane.agent.errors import InvalidStart
from dataplane.agent.launch import INSTANCE_ID_PATTERN

# Called with the path of the spec file; returns argv.
TrainerCommand = Callable[[Path], list[str]]


def trainer_command(spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "dataplane.training", "--spec", str(spec_path)]


def check_training_start(start: TrainingStart) -> None:
    """Raise `InvalidStart` for a task id that cannot name the task's log and spec files."""
    if not INSTANCE_ID_PATTERN.match(start.task_id):
        raise InvalidStart(
            "task_id must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit",
            param="task_id",
        )


def write_spec(spec_dir: Path, start: TrainingStart) -> Path:
    """Write `spec_dir/<task_id>.json` whole (a temporary file, then a rename)."""
    spec_dir.mkdir(parents=True, exist_ok=True)
    path = spec_dir / f"{start.task_id}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(start.model_dump_json(indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def spawn_trainer(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start the trainer in a session of its own: stdout a pipe (the protocol), stderr appended
    to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as err:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        err.write(f"=== {stamp} {' '.join(argv)}\n".encode())
        err.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=process.child_env(os.environ),
            start_new_session=True,
        )
