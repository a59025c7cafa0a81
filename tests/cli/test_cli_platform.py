"""`deepflow up` / `down`: pid files, stale files, waiting for readiness, stopping processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_fakes import FakeApi, Invoke, node, platform, refuse

from deepflow_cli import processes
from deepflow_cli.commands import platform as platform_commands
from deepflow_cli.errors import ExitCode
from deepflow_cli.home import RunInfo
from deepflow_cli.processes import AGENT, CONTROL_PLANE


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@dataclass
class FakeProc:
    pid: int
    exit_code: int | None = None

    def poll(self) -> int | None:
        return self.exit_code

    @property
    def returncode(self) -> int | None:
        return self.exit_code


@dataclass
class FakeSpawn:
    started: dict[str, list[str]] = field(default_factory=dict)
    procs: dict[str, FakeProc] = field(default_factory=dict)

    def __call__(
        self, service: processes.Service, argv: list[str], *, env: dict[str, str], log: bool = True
    ) -> FakeProc:
        assert env["DEEPFLOW_HOME"] == os.environ["DEEPFLOW_HOME"]
        self.started[service.name] = argv
        proc = self.procs.setdefault(service.name, FakeProc(dead_pid()))
        service.pid_file.parent.mkdir(parents=True, exist_ok=True)
        service.pid_file.write_text(f"{proc.pid}\n")
        return proc


@pytest.fixture
def spawn(monkeypatch: pytest.MonkeyPatch) -> FakeSpawn:
    fake = FakeSpawn()
    monkeypatch.setattr(processes, "spawn", fake)
    monkeypatch.setattr(platform_commands, "POLL_INTERVAL_S", 0.0)
    return fake


def test_down_with_nothing_running(cli: Invoke, home: Path) -> None:
    result = cli("down")
    assert result.exit_code == 0, result.output
    assert "not running" in result.stdout


def test_down_with_stale_pid_files_signals_nothing(cli: Invoke, home: Path) -> None:
    (home / "run").mkdir(parents=True)
    CONTROL_PLANE.pid_file.write_text(f"{dead_pid()}\n")
    AGENT.pid_file.write_text(f"{os.getpid()}\n")  # alive, but not an agent: must survive
    RunInfo(url="http://127.0.0.1:8480", pid=1).save()
    result = cli("down")
    assert result.exit_code == 0, result.output
    assert "stale" in result.stdout
    assert not CONTROL_PLANE.pid_file.exists() and not AGENT.pid_file.exists()
    assert not RunInfo.path().exists()


def start_fake_control_plane(where: Path, *, ignore_term: bool = False) -> subprocess.Popen[bytes]:
    """A real process running `python -m controlplane`, from a stand-in module under `where`."""
    package = where / "controlplane"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else ""
    (package / "__main__.py").write_text(
        f"import signal, time\n{ignore}print('ready', flush=True)\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane"],
        cwd=where,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    CONTROL_PLANE.pid_file.parent.mkdir(parents=True, exist_ok=True)
    CONTROL_PLANE.pid_file.write_text(f"{proc.pid}\n")
    return proc


@pytest.fixture
def fake_control_plane(tmp_path: Path, home: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_fake_control_plane(tmp_path / "fake")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_down_stops_a_running_control_plane(
    cli: Invoke, fake_control_plane: subprocess.Popen[bytes]
) -> None:
    assert CONTROL_PLANE.running_pid() == fake_control_plane.pid
    result = cli("down")
    assert result.exit_code == 0, result.output
    assert f"pids {fake_control_plane.pid}" in result.stdout
    assert fake_control_plane.wait(timeout=5) == -signal.SIGTERM
    assert not CONTROL_PLANE.pid_file.exists()


def test_stop_escalates_to_sigkill(tmp_path: Path, home: Path) -> None:
    proc = start_fake_control_plane(tmp_path, ignore_term=True)
    try:
        assert processes.stop(CONTROL_PLANE, timeout=0.3) == proc.pid
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert not CONTROL_PLANE.pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_starts_both_and_waits_for_a_ready_node(
    api: FakeApi, cli: Invoke, spawn: FakeSpawn, home: Path
) -> None:
    api.on(
        "GET", "/api/v1/status", refuse, refuse, platform(nodes=[node("registering")]), platform()
    )
    result = cli("up", "--port", "9480", "--agent-port", "9481", "--database-url", "sqlite://")
    assert result.exit_code == 0, result.output
    assert "running at http://127.0.0.1:9480" in result.stdout

    cp = spawn.started["controlplane"]
    assert cp[:3] == [sys.executable, "-m", "controlplane"]
    assert cp[3:] == ["--host", "127.0.0.1", "--port", "9480", "--database-url", "sqlite://"]
    agent = spawn.started["agent"]
    assert agent[1:3] == ["-m", "dataplane.agent"]
    assert "--control-plane" in agent and "http://127.0.0.1:9480" in agent
    assert agent[-2:] == ["--name", "local"] and "9481" in agent

    info = json.loads(RunInfo.path().read_text())
    assert info == {
        "url": "http://127.0.0.1:9480",
        "pid": spawn.procs["controlplane"].pid,
        "agent_pid": spawn.procs["agent"].pid,
    }
    assert len(api.bodies("GET", "/api/v1/status")) == 4


def test_up_reports_a_process_that_exits(
    api: FakeApi, cli: Invoke, spawn: FakeSpawn, home: Path
) -> None:
    spawn.procs["controlplane"] = FakeProc(dead_pid(), exit_code=3)
    api.on("GET", "/api/v1/status", refuse)
    result = cli("up")
    assert result.exit_code == ExitCode.ERROR
    line = result.stderr.strip()
    assert "controlplane exited with code 3" in line
    assert str(home / "logs" / "controlplane.log") in line
    assert not RunInfo.path().exists() and not CONTROL_PLANE.pid_file.exists()


def test_up_timeout_points_at_the_logs(
    api: FakeApi, cli: Invoke, spawn: FakeSpawn, home: Path
) -> None:
    api.on("GET", "/api/v1/status", refuse)
    result = cli("up", "--timeout", "0")
    assert result.exit_code == ExitCode.ERROR
    assert "not ready within 0 s" in result.stderr
    assert "controlplane.log" in result.stderr and "deepflow down" in result.stderr


def test_up_no_wait(api: FakeApi, cli: Invoke, spawn: FakeSpawn) -> None:
    api.on("GET", "/api/v1/status", refuse)
    result = cli("up", "--no-wait")
    assert result.exit_code == 0, result.output
    assert "starting" in result.stdout
    assert len(api.bodies("GET", "/api/v1/status")) == 1  # only the already-running check


def test_up_with_stale_files_and_a_control_plane_answering(
    api: FakeApi, cli: Invoke, spawn: FakeSpawn, home: Path
) -> None:
    (home / "run").mkdir(parents=True)
    CONTROL_PLANE.pid_file.write_text(f"{dead_pid()}\n")
    RunInfo(url="http://127.0.0.1:8480", pid=1).save()
    api.on("GET", "/api/v1/status", platform())
    result = cli("up")
    assert result.exit_code == 0, result.output
    assert "removed stale pid files" in result.stdout
    assert "already answers" in result.stdout
    assert spawn.started == {}
    assert not CONTROL_PLANE.pid_file.exists()


def test_up_when_already_running(
    api: FakeApi,
    cli: Invoke,
    spawn: FakeSpawn,
    fake_control_plane: subprocess.Popen[bytes],
) -> None:
    RunInfo(url="http://127.0.0.1:8480", pid=fake_control_plane.pid).save()
    api.on("GET", "/api/v1/status", platform())
    result = cli("up")
    assert result.exit_code == 0, result.output
    assert "already running" in result.stdout
    assert list(spawn.started) == ["agent"]  # no live agent: only it is restarted


class InterruptingProc(FakeProc):
    """Polls fine a few times, then acts as if the user pressed Ctrl-C."""

    polls: int = 0

    def poll(self) -> int | None:
        self.polls += 1
        if self.polls > 3:
            raise KeyboardInterrupt
        return None


def test_foreground_stops_both_on_ctrl_c(
    api: FakeApi, cli: Invoke, spawn: FakeSpawn, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawn.procs["controlplane"] = InterruptingProc(dead_pid())
    stopped: list[str] = []
    real_stop = processes.stop

    def stop(service: processes.Service, timeout: float = 1.0) -> int | None:
        stopped.append(service.name)
        return real_stop(service, timeout)

    monkeypatch.setattr(processes, "stop", stop)
    api.on("GET", "/api/v1/status", refuse, platform())
    result = cli("up", "--foreground")
    assert result.exit_code == 0, result.output
    assert "Ctrl-C stops it" in result.stdout and "stopping" in result.stdout
    assert stopped == ["agent", "controlplane"]
    assert not RunInfo.path().exists() and not AGENT.pid_file.exists()


def test_foreground_exits_1_when_a_child_dies(
    api: FakeApi, cli: Invoke, spawn: FakeSpawn, home: Path
) -> None:
    spawn.procs["agent"] = FakeProc(dead_pid(), exit_code=1)
    api.on("GET", "/api/v1/status", refuse)
    result = cli("up", "--foreground", "--no-wait")
    assert result.exit_code == ExitCode.ERROR
    assert result.stderr.strip() == "error: the agent exited with code 1"
    assert not RunInfo.path().exists()
