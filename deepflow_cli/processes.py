"""The local processes `deepflow up` starts and `deepflow down` stops, tracked by pid files.

A pid file is trusted only while its process is alive and still runs the module it was started
with (`python -m <module>`), so a stale file whose pid was reused is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from deepflow_cli.errors import CliError
from deepflow_cli.home import RunInfo, home, logs_dir, run_dir

STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class Service:
    name: str  # pid file and log file stem
    module: str  # what `python -m` runs

    @property
    def pid_file(self) -> Path:
        return run_dir() / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return logs_dir() / f"{self.name}.log"

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def running_pid(self) -> int | None:
        """The pid from the pid file, if that process is alive and is this service."""
        pid = self.read_pid()
        return pid if pid is not None and runs_module(pid, self.module) else None


CONTROL_PLANE = Service("controlplane", "controlplane")
AGENT = Service("agent", "dataplane.agent")


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, though not ours
    try:  # a zombie has exited; it only waits for its parent to reap it
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def runs_module(pid: int, module: str) -> bool:
    if not is_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust a live pid
    wanted = module.encode()
    return any(a == b"-m" and b == wanted for a, b in zip(argv, argv[1:], strict=False))


def spawn(
    service: Service, argv: list[str], *, env: dict[str, str], log: bool = True
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session (so Ctrl-C in this shell does not reach it)."""
    run_dir().mkdir(parents=True, exist_ok=True)
    logs_dir().mkdir(parents=True, exist_ok=True)
    out = service.log_file.open("ab") if log else None
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise CliError(f"cannot start the {service.name}: {exc}") from exc
    finally:
        if out is not None:
            out.close()
    service.pid_file.write_text(f"{proc.pid}\n")
    return proc


def wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def terminate(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL (to its whole process group, which `spawn` made) after `timeout`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if wait_exit(pid, timeout):
        return
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_exit(pid, 5.0)


def stop(service: Service, timeout: float = STOP_TIMEOUT_S) -> int | None:
    """Stop the service if its pid file names it; remove the pid file. Returns the stopped pid."""
    pid = service.running_pid()
    if pid is not None:
        terminate(pid, timeout)
    service.pid_file.unlink(missing_ok=True)
    return pid


def clear_run_files() -> None:
    for service in (AGENT, CONTROL_PLANE):
        service.pid_file.unlink(missing_ok=True)
    RunInfo.path().unlink(missing_ok=True)


def child_env() -> dict[str, str]:
    """The children use this CLI's home, whatever their working directory."""
    return {**os.environ, "DEEPFLOW_HOME": str(home())}
