"""The real `deepflow files ...` and `deepflow finetune ...` against the running platform: upload a
dataset, fine-tune the tiny model following the job (progress as plain lines, stderr being a pipe),
inspect it, cancel a second job, refuse what cannot be done, delete the file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deepflow_cli.errors import ExitCode
from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e

PROGRESS = re.compile(r"^(\S+)  step (\d+)/(\d+) · loss \d+\.\d{4} · ETA (-|\d+s|\d+m \d+s)$")
# 6 examples, 1 a step, 3 epochs: 18 steps, long enough for an ETA, short for 2 cores.
TRAIN = ["--epochs", "3", "--batch-size", "1", "--seed", "1", "--suffix", "cli"]


def _deepflow(platform: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    """`deepflow ARGS` as a script in CI runs it: output to pipes, nothing claiming a terminal."""
    env = {k: v for k, v in platform.env.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run(
        [str(Path(sys.executable).parent / "deepflow"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _ok(platform: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    result = _deepflow(platform, *args)
    assert result.returncode == 0, f"deepflow {' '.join(args)}\n{result.stdout}{result.stderr}"
    return result


def _json(platform: Platform, *args: str) -> Any:
    return json.loads(_ok(platform, *args, "--json").stdout)


def _dataset(path: Path) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {n} plus {n}?"},
                {"role": "assistant", "content": f"{n} plus {n} is {2 * n}."},
            ]
        }
        for n in range(6)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_files_and_finetune_through_the_cli(platform: Platform, tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "sums.jsonl")
    uploaded = _json(platform, "files", "upload", str(dataset))
    file_id = uploaded["id"]
    assert uploaded["purpose"] == "fine-tune" and uploaded["bytes"] == dataset.stat().st_size
    assert file_id in {f["id"] for f in _json(platform, "files", "list")}
    got = _json(platform, "files", "get", file_id)
    assert (got["id"], got["filename"], got["bytes"]) == (file_id, "sums.jsonl", uploaded["bytes"])

    # Refusals: one clear line and a non-zero exit, before any job exists.
    bad_model = _deepflow(platform, "finetune", "create", "-m", "no-such-model", "-f", file_id)
    assert bad_model.returncode == ExitCode.NOT_FOUND
    assert bad_model.stderr.strip() == "error: The model `no-such-model` does not exist."
    bad_file = _deepflow(platform, "finetune", "create", "-m", "tiny", "-f", "file-nope")
    assert bad_file.returncode == ExitCode.ERROR
    assert bad_file.stderr.strip() == "error: invalid training_file: no such file file-nope"

    follow = _ok(platform, "finetune", "create", "--model", "tiny", "--file", file_id, *TRAIN,
                 "--follow")  # fmt: skip
    found = re.search(r"created fine-tuning job (ftjob-\S+)", follow.stderr)
    assert found, follow.stderr
    job_id = found.group(1)
    model = f"ft:tiny:cli:{job_id}"
    assert follow.stdout.splitlines() == [f"fine-tuned model: {model}"]
    lines = follow.stderr.splitlines()
    for status in ("running", "succeeded"):
        assert f"status: {status}" in lines, follow.stderr
    progress = [m for m in (PROGRESS.match(line) for line in lines) if m]
    assert progress, follow.stderr
    first, last = progress[0], progress[-1]
    assert last.group(2, 3) == ("18", "18"), follow.stderr
    if first.group(1) != last.group(1):  # steps reported seconds apart: a pace, so an ETA
        assert last.group(4) == "0s", follow.stderr
    assert "\x1b[" not in follow.stderr  # no bar, no escape codes in a log

    job = _json(platform, "finetune", "get", job_id)
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == model
    assert job["hyperparameters"]["n_epochs"] == 3 and job["training_file"] == file_id
    events = _json(platform, "finetune", "events", job_id, "--limit", "100")
    losses = [e["data"]["train_loss"] for e in events if e["type"] == "metrics" and e["data"]]
    assert losses, events
    assert events[-1]["message"] == "The job has successfully completed"  # oldest first
    table = _ok(platform, "finetune", "events", job_id).stdout
    assert "Step 18/18" in table

    created = _ok(platform, "finetune", "create", "-m", "tiny", "-f", file_id, *TRAIN)
    second = re.fullmatch(r"created fine-tuning job (ftjob-\S+) \(\w+\)", created.stdout.strip())
    assert second, created.stdout
    second_id = second.group(1)
    cancelled = _json(platform, "finetune", "cancel", second_id)
    assert cancelled["status"] == "cancelled"
    assert _json(platform, "finetune", "get", second_id)["status"] == "cancelled"
    again = _deepflow(platform, "finetune", "cancel", job_id)
    assert again.returncode == ExitCode.ERROR and "cannot be cancelled" in again.stderr

    listed = _json(platform, "finetune", "list")
    statuses = {j["id"]: j["status"] for j in listed}
    assert statuses[job_id] == "succeeded" and statuses[second_id] == "cancelled"
    assert re.search(rf"{job_id}\s.*succeeded", _ok(platform, "finetune", "list").stdout)

    deleted = _json(platform, "files", "delete", file_id)
    assert deleted == {"id": file_id, "object": "file", "deleted": True}
    assert file_id not in {f["id"] for f in _json(platform, "files", "list")}
    gone = _deepflow(platform, "files", "get", file_id)
    assert gone.returncode == ExitCode.NOT_FOUND and len(gone.stderr.strip().splitlines()) == 1
