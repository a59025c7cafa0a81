"""The supervisor against real child processes (a tiny HTTP server script, no model)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from agent_fakes import async_wait_until, make_start, pid_alive

from controlplane.wire import InstanceReport, InstanceStart
from dataplane.agent.errors import (
    InstanceConflict,
    InvalidStart,
    ShuttingDown,
    SpawnFailed,
    UnknownInstance,
)
from dataplane.agent.supervisor import Supervisor

pytestmark = pytest.mark.anyio

CommandFor = Callable[[InstanceStart, int], list[str]]


class Harness:
    def __init__(
        self,
        log_dir: Path,
        command_for: CommandFor,
        *,
        start_timeout_s: float = 10.0,
        stop_grace_s: float = 2.0,
    ) -> None:
        self.changes: list[InstanceReport] = []
        self.log_dir = log_dir
        self.supervisor = Supervisor(
            log_dir=log_dir,
            command_for=command_for,
            on_change=self.changes.append,
            poll_interval_s=0.05,
            start_timeout_s=start_timeout_s,
            stop_grace_s=stop_grace_s,
        )

    def states(self, instance_id: str) -> list[str]:
        return [r.state for r in self.changes if r.instance_id == instance_id]

    def state(self, instance_id: str) -> str:
        return self.supervisor.get(instance_id).state

    async def until_state(self, instance_id: str, state: str, timeout_s: float = 10) -> None:
        await async_wait_until(lambda: self.state(instance_id) == state, timeout_s)


@pytest.fixture
async def harness(tmp_path: Path, fake_instance_command: CommandFor) -> AsyncIterator[Harness]:
    h = Harness(tmp_path / "logs", fake_instance_command)
    yield h
    await h.supervisor.aclose()


async def test_start_ready_stop(harness: Harness) -> None:
    sup = harness.supervisor
    first = sup.start(make_start("a"))
    assert first.state == "starting" and first.url is None and first.pid is not None
    await harness.until_state("a", "ready")
    ready = sup.get("a")
    assert ready.url is not None and re.fullmatch(r"http://127\.0\.0\.1:\d+", ready.url)
    async with httpx.AsyncClient() as client:
        health = (await client.get(f"{ready.url}/health")).json()
    assert health["status"] == "ok"
    assert (harness.log_dir / "a.log").read_text().startswith("=== ")

    stopped = await sup.stop("a")
    assert stopped.state == "stopped" and stopped.url is None
    assert not pid_alive(first.pid)
    assert harness.states("a") == ["starting", "ready", "stopped"]
    assert sup.reports() == []
    with pytest.raises(UnknownInstance):
        await sup.stop("a")


async def test_exit_is_reported_failed_with_code_and_log(harness: Harness) -> None:
    harness.supervisor.start(make_start("boom", "exit3"))
    await harness.until_state("boom", "failed")
    report = harness.supervisor.get("boom")
    assert report.exit_code == 3
    assert report.reason is not None
    assert report.reason.startswith("exited with code 3")
    assert "boom: out of memory" in report.reason
    assert harness.states("boom")[-1] == "failed"
    # A failed instance stays listed until it is deleted; deleting keeps its state.
    assert [r.instance_id for r in harness.supervisor.reports()] == ["boom"]
    assert (await harness.supervisor.stop("boom")).state == "failed"
    assert harness.supervisor.reports() == []


async def test_start_timeout_kills_and_fails(
    tmp_path: Path, fake_instance_command: CommandFor
) -> None:
    h = Harness(tmp_path, fake_instance_command, start_timeout_s=0.5, stop_grace_s=1.0)
    report = h.supervisor.start(make_start("slow", "hang"))
    assert report.pid is not None
    await h.until_state("slow", "failed", timeout_s=5)
    final = h.supervisor.get("slow")
    assert final.reason is not None and "start timeout of 0.5 s" in final.reason
    assert final.exit_code == -9
    assert not pid_alive(report.pid)
    assert h.states("slow") == ["starting", "failed"]
    await h.supervisor.aclose()


async def test_stop_escalates_to_sigkill(tmp_path: Path, fake_instance_command: CommandFor) -> None:
    h = Harness(tmp_path, fake_instance_command, stop_grace_s=0.3)
    h.supervisor.start(make_start("s", "stubborn"))
    await h.until_state("s", "ready")
    began = time.monotonic()
    stopped = await h.supervisor.stop("s")
    assert time.monotonic() - began >= 0.3
    assert stopped.state == "stopped" and stopped.exit_code == -9
    await h.supervisor.aclose()


async def test_stop_kills_the_whole_process_group(harness: Harness) -> None:
    harness.supervisor.start(make_start("f", "forks"))
    await harness.until_state("f", "ready")
    log_text = (harness.log_dir / "f.log").read_text()
    match = re.search(r"grandchild pid=(\d+)", log_text)
    assert match is not None
    grandchild = int(match.group(1))
    assert pid_alive(grandchild)
    await harness.supervisor.stop("f")
    await async_wait_until(lambda: not pid_alive(grandchild), 3)


async def test_stop_all_leaves_no_children(harness: Harness) -> None:
    sup = harness.supervisor
    pids = [sup.start(make_start(f"i{n}")).pid for n in range(3)]
    await harness.until_state("i0", "ready")
    await sup.stop_all()
    assert sup.reports() == []
    assert not any(pid_alive(pid) for pid in pids if pid is not None)
    assert all(harness.states(f"i{n}")[-1] == "stopped" for n in range(3))
    with pytest.raises(ShuttingDown):
        sup.start(make_start("late"))


async def test_concurrent_stops_share_one(harness: Harness) -> None:
    import asyncio

    harness.supervisor.start(make_start("c"))
    a, b = await asyncio.gather(harness.supervisor.stop("c"), harness.supervisor.stop("c"))
    assert a == b and a.state == "stopped"
    assert harness.states("c").count("stopped") == 1


async def test_start_is_idempotent_per_spec(harness: Harness) -> None:
    sup = harness.supervisor
    first = sup.start(make_start("x"))
    assert sup.start(make_start("x")).pid == first.pid
    with pytest.raises(InstanceConflict):
        sup.start(make_start("x", "other-model"))
    assert len(sup.reports()) == 1


async def test_invalid_starts_spawn_nothing(harness: Harness) -> None:
    with pytest.raises(InvalidStart):
        harness.supervisor.start(make_start("../escape"))
    with pytest.raises(InvalidStart):
        harness.supervisor.start(make_start("ok-id", port=1))
    assert harness.supervisor.reports() == []
    assert not harness.log_dir.exists() or os.listdir(harness.log_dir) == []


async def test_spawn_failure_is_an_error_not_an_instance(tmp_path: Path) -> None:
    h = Harness(tmp_path, lambda start, port: [str(tmp_path / "no-such-program")])
    with pytest.raises(SpawnFailed, match="could not be started"):
        h.supervisor.start(make_start("ghost"))
    assert h.supervisor.reports() == [] and h.changes == []
    await h.supervisor.aclose()
