"""What the launcher hands back for each instance, whichever path started it.

    handle.path             "fork" | "warm_pod" | "cold"
    handle.pid, handle.url
    handle.fallbacks        why faster paths were passed over, in order
    handle.poll()           the exit code once the process has exited, else None
    handle.stop(grace_s)    SIGTERM to its process group, then SIGKILL after grace_s
    handle.kill()           SIGKILL to its process group
    handle.wait_ready(...)  polls /health until ready; the instance's startup stage times

A cold instance and a warm pod are children of the launcher's process (`subprocess.Popen`);
a forked instance is a child of its zygote, which reaps it and reports its exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from pydantic import ValidationError

from controlplane.wire import InstanceHealth, InstanceStartup
from dataplane.agent.process import log_tail
from dataplane.flowserve.startup import LaunchPath
from dataplane.scaleout.errors import ScaleOutError

if TYPE_CHECKING:
    from dataplane.scaleout.fork import Zygote

POLL_S = 0.02


class InstanceFailed(ScaleOutError):
    """The instance exited or did not become ready in time."""


@dataclass(eq=False)
class InstanceHandle(ABC):
    instance_id: str
    path: LaunchPath
    pid: int
    url: str
    log_path: str
    requested_at: float  # wall clock, when launch() was called
    dispatched_at: float  # when launch() returned
    fallbacks: list[str] = field(default_factory=list)
    startup: InstanceStartup | None = None  # set by wait_ready

    @abstractmethod
    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal) once exited; None while running."""

    @abstractmethod
    def _signal(self, sig: signal.Signals) -> None:
        """Signal the instance's process group."""

    def alive(self) -> bool:
        return self.poll() is None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM (the instance drains its streams), SIGKILL after `grace_s`; the exit code,
        or None if even SIGKILL was not seen to end it within 5 s."""
        if self.poll() is None:
            self._signal(signal.SIGTERM)
            self._wait(grace_s)
        # The group gets SIGKILL even when the leader is gone, so nothing it started survives.
        self._signal(signal.SIGKILL)
        return self._wait(5.0)

    def kill(self) -> int | None:
        """SIGKILL to its process group at once (what is left of an exited one too); the exit
        code, or None if it was not seen to end within 5 s."""
        self._signal(signal.SIGKILL)
        return self._wait(5.0)

    def wait_ready(self, timeout_s: float = 120.0) -> InstanceStartup:
        """Poll /health until the instance answers ready; its startup report."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                code = self.poll()
                if code is not None:
                    tail = log_tail(Path(self.log_path))
                    raise InstanceFailed(
                        f"instance {self.instance_id} ({self.path}) exited with {code}: {tail}"
                    )
                try:
                    response = client.get(f"{self.url}/health")
                    health = InstanceHealth.model_validate(response.json())
                except (httpx.HTTPError, ValueError, ValidationError):
                    time.sleep(POLL_S)
                    continue
                if health.status == "ok" and health.startup is not None:
                    self.startup = health.startup
                    return health.startup
                time.sleep(POLL_S)
        raise InstanceFailed(f"instance {self.instance_id} ({self.path}) not ready in time")

    def _wait(self, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while (code := self.poll()) is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return code


@dataclass(eq=False)
class ProcessHandle(InstanceHandle):
    """A cold instance or a warm pod: a child of this process, in a session of its own."""

    proc: subprocess.Popen[bytes] | None = None

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def _signal(self, sig: signal.Signals) -> None:
        _signal_group(self.pid, sig)


@dataclass(eq=False)
class ForkedHandle(InstanceHandle):
    """A zygote's child. Its zygote reaps it and reports the exit code; should the zygote die
    first, the child gets SIGTERM (PR_SET_PDEATHSIG), drains and exits, and reads as -15."""

    zygote: Zygote | None = None
    start_ticks: int = 0  # /proc starttime, so a reused pid is not mistaken for it

    def poll(self) -> int | None:
        assert self.zygote is not None
        code = self.zygote.exit_code(self.pid)
        if code is not None:
            return code
        if self.zygote.alive():
            return None  # it will report the exit
        if _running(self.pid, self.start_ticks):
            return None
        return -signal.SIGTERM

    def _signal(self, sig: signal.Signals) -> None:
        if self.poll() is None:
            _signal_group(self.pid, sig)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        # A forked child signalled before its setsid() has no group of its own yet.
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    except PermissionError:  # the pid was reused by someone else's process
        pass


def proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (field 22 of /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19])


def _running(pid: int, start_ticks: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in (b"Z", b"X") and int(fields[19]) == start_ticks
