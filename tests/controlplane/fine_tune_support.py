"""A fake node agent, a settable clock and chat JSONL for the fine-tuning tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from controlplane import wire

EXAMPLE = {
    "messages": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
}


def chat_jsonl(count: int = 8) -> bytes:
    return b"".join(json.dumps(EXAMPLE).encode() + b"\n" for _ in range(count))


@dataclass(slots=True)
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeAgent:
    """Answers the control plane's training calls like a node agent and records them; the test
    plays the trainer by posting TrainingReports itself."""

    starts: list[tuple[str, wire.TrainingStart]] = field(default_factory=list)  # (host, start)
    deletes: list[tuple[str, str]] = field(default_factory=list)  # (host, task id)
    refuse_hosts: set[str] = field(default_factory=set)  # nodes that answer 503

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/training":
            if request.url.host in self.refuse_hosts:
                return httpx.Response(503, json={"error": {"message": "busy", "type": "x"}})
            start = wire.TrainingStart.model_validate_json(request.content)
            self.starts.append((request.url.host, start))
            report = wire.TrainingReport(task_id=start.task_id, state="starting")
            return httpx.Response(202, json=report.model_dump(mode="json"))
        if request.method == "DELETE" and path.startswith("/training/"):
            task_id = path.removeprefix("/training/")
            self.deletes.append((request.url.host, task_id))
            report = wire.TrainingReport(task_id=task_id, state="stopped")
            return httpx.Response(200, json=report.model_dump(mode="json"))
        return httpx.Response(404, json={"error": {"message": "no route", "type": "x"}})

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def task_ids(self) -> list[str]:
        return [start.task_id for _, start in self.starts]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def progress(task_id: str, step: int, total: int = 8, loss: float = 2.0) -> dict[str, Any]:
    report = wire.TrainingReport(
        task_id=task_id,
        state="running",
        progress=wire.TrainingProgress(
            step=step,
            total_steps=total,
            epoch=step / 4,
            loss=loss,
            learning_rate=2e-4,
            tokens=step * 100,
            elapsed_s=step * 0.5,
        ),
    )
    return report.model_dump(mode="json")


def checkpoint(task_id: str, step: int, output_dir: str) -> dict[str, Any]:
    path = str(Path(output_dir) / "checkpoints" / f"step-{step}")
    report = wire.TrainingReport(
        task_id=task_id,
        state="running",
        checkpoint=wire.TrainingCheckpoint(step=step, path=path, metrics={"loss": 1.5}),
    )
    return report.model_dump(mode="json")


def failed(task_id: str, exit_code: int = 1) -> dict[str, Any]:
    report = wire.TrainingReport(
        task_id=task_id, state="failed", exit_code=exit_code, reason="trainer died"
    )
    return report.model_dump(mode="json")


def succeeded(task_id: str, merged: Path, valid_loss: float | None = 1.25) -> dict[str, Any]:
    report = wire.TrainingReport(
        task_id=task_id,
        state="succeeded",
        result=wire.TrainingResult(
            merged_model_path=str(merged),
            adapter_path=str(merged.parent / "adapter"),
            trained_tokens=800,
            train_loss=1.0,
            valid_loss=valid_loss,
            steps=8,
        ),
    )
    return report.model_dump(mode="json")
