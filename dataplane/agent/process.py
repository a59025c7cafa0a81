"""Child processes: spawn in a process group of their own, signal the group, reap, read logs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Collection, Mapping
from pathlib import Path

import dataplane

log = logging.getLogger(__name__)

# The directory holding the `dataplane` package, so `-m dataplane.flowserve` imports from any cwd.
PROJECT_ROOT = Path(dataplane.__file__).resolve().parent.parent
REAP_POLL_S = 0.05


def free_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """A port nothing listens on now (the child binds it a moment later; a race we accept)."""
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in avoid:
            return port
    raise OSError("no free port found")


def child_env(base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    env["PYTHONUNBUFFERED"] = "1"
    paths = [str(PROJECT_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session (so its own process group), output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"=== {stamp} {' '.join(argv)}\n".encode())
        out.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(os.environ),
            start_new_session=True,
        )


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send `sig` to the child's process group; a group already gone is not an error."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:  # the pid was reused by someone else's process
        log.warning("cannot signal process group %d: %s", proc.pid, exc)


async def reap(proc: subprocess.Popen[bytes]) -> int:
    while (code := proc.poll()) is None:
        await asyncio.sleep(REAP_POLL_S)
    return code


async def terminate(proc: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM the group, wait up to `grace_s`, then SIGKILL the group; returns the exit code.

    The group gets SIGKILL even when the leader exited in time, so nothing it started survives.
    """
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(REAP_POLL_S)
    signal_group(proc, signal.SIGKILL)
    return await reap(proc)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the group without waiting; `reap` collects the exit code."""
    signal_group(proc, signal.SIGKILL)


def log_tail(path: Path, max_lines: int = 20, max_bytes: int = 4096) -> str:
    """The last lines of a log file, at most `max_bytes` of them; empty if it cannot be read."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and len(lines) > 1:
        lines = lines[1:]  # the first line is probably cut
    return "\n".join(lines[-max_lines:]).strip()
