"""A node's warm pod pool: a configurable number of model-agnostic pods (`pod.py`) kept started,
one handed out on demand, replaced in the background.

    pool = WarmPool(size=2, log_dir=...)
    pool.start()
    pod = pool.take(wait_s=0)          # a ready pod or None
    handle = pod.start_instance(command)   # or: stdout = pod.start_training(spec, log)
    pool.close()                       # kills the pods not handed out

One background thread keeps `size` pods ready or booting and watches for their `ready` message.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from dataplane.agent.process import child_env
from dataplane.scaleout.errors import PodUnavailable
from dataplane.scaleout.handles import ProcessHandle
from dataplane.scaleout.protocol import Channel, Message, StartCommand, socketpair

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1
START_REPLY_TIMEOUT_S = 30.0
# The agent waits on its event loop; the pod replies before it imports anything.
TRAIN_REPLY_TIMEOUT_S = 5.0


@dataclass(eq=False)
class WarmPod:
    proc: subprocess.Popen[bytes]
    channel: Channel
    log_path: Path
    spawned_at: float = field(default_factory=time.time)
    ready_at: float | None = None  # when it said ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fileno(self) -> int:  # for select()
        return self.channel.fileno()

    def start_instance(self, command: StartCommand) -> ProcessHandle:
        """Make this pod the instance. Raises PodUnavailable when it will not (the pod is
        killed then: it may be half-way)."""
        try:
            self.channel.send({"op": "start", "start": command.to_json()})
            reply = self.channel.recv(START_REPLY_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            reply = {"event": "error", "message": str(exc)}
        self.channel.close()
        if reply is None or reply.get("event") != "starting":
            why = self._why_not(reply)
            raise PodUnavailable(f"warm pod {self.pid} did not start {command.instance_id}: {why}")
        return ProcessHandle(
            instance_id=command.instance_id,
            path="warm_pod",
            pid=self.pid,
            url=f"http://{command.host}:{command.port}",
            log_path=command.log_path,
            requested_at=command.requested_at,
            dispatched_at=time.time(),
            proc=self.proc,
        )

    def start_training(
        self, spec_path: Path, log_path: Path, reply_timeout_s: float = TRAIN_REPLY_TIMEOUT_S
    ) -> BinaryIO:
        """Make this pod a training task's executor; the read end of its stdout pipe, where the
        trainer's JSON lines come as from `python -m dataplane.training`. Raises PodUnavailable
        when it will not (the pod is killed then)."""
        read_fd, write_fd = os.pipe()
        try:
            message = {"op": "train", "spec": str(spec_path), "log_path": str(log_path)}
            self.channel.send(message, fds=[write_fd])
            reply = self.channel.recv(reply_timeout_s)
        except (OSError, TimeoutError, ValueError) as exc:
            reply = {"event": "error", "message": str(exc)}
        finally:
            os.close(write_fd)  # the pod holds its copy: EOF comes when the pod is gone
        self.channel.close()
        if reply is None or reply.get("event") != "training":
            os.close(read_fd)
            why = self._why_not(reply)
            raise PodUnavailable(f"warm pod {self.pid} did not start training: {why}")
        return os.fdopen(read_fd, "rb")

    def _why_not(self, reply: Message | None) -> str:
        """Kill the pod (it may be half-way) and say why it would not take the work: its own
        message, else how it had ended, with its log for the rest."""
        exit_code = self.proc.poll()
        self.kill()
        said = "no reply" if reply is None else str(reply.get("message"))
        ended = "it was running" if exit_code is None else f"it had exited with {exit_code}"
        return f"{said} ({ended}; log: {self.log_path})"

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.channel.close()


class WarmPool:
    def __init__(
        self,
        size: int,
        *,
        log_dir: Path,
        cache_dir: str | Path | None = None,
        torch_threads: int | None = None,
        boot_timeout_s: float = 300.0,
    ) -> None:
        """`cache_dir`: the node's DRAM cache, whose entries a pod on a GPU registers ahead
        (None: the pod's default, settings.default_cache_root())."""
        if size < 0:
            raise ValueError(f"the pool size must be at least 0, not {size}")
        self.size = size
        self.log_dir = log_dir
        self.cache_dir = cache_dir
        self.torch_threads = torch_threads
        self.boot_timeout_s = boot_timeout_s
        self._ready: deque[WarmPod] = deque()
        self._booting: list[WarmPod] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._spawned = 0

    @property
    def num_ready(self) -> int:
        with self._cond:
            return len(self._ready)

    @property
    def num_booting(self) -> int:
        with self._cond:
            return len(self._booting)

    def resize(self, size: int) -> None:
        """Keep `size` pods from now on; pods beyond it stay until handed out or closed."""
        if size < 0:
            raise ValueError(f"the pool size must be at least 0, not {size}")
        with self._cond:
            self.size = size
            self._cond.notify_all()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="warm-pool", daemon=True)
        self._thread.start()

    def wait_full(self, timeout_s: float) -> bool:
        """Block until `size` pods are ready (a benchmark's or a test's starting line)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self._ready) < self.size:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._cond.wait(left)
        return True

    def take(self, wait_s: float = 0.0) -> WarmPod | None:
        """A ready pod (the oldest), waiting up to `wait_s` for one; None when none is."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                while self._ready:
                    pod = self._ready.popleft()
                    if pod.proc.poll() is None:
                        self._cond.notify_all()  # the refill thread starts a replacement
                        return pod
                    pod.channel.close()
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._cond.wait(left)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pods = list(self._ready) + self._booting
            self._ready.clear()
            self._booting.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(10)
        for pod in pods:
            pod.kill()

    # -- the refill thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                missing = self.size - len(self._ready) - len(self._booting)
            for _ in range(missing):
                try:
                    pod = self._spawn()
                except OSError as exc:
                    log.error("cannot start a warm pod: %s", exc)
                    break
                with self._cond:
                    if self._closed:
                        pod.kill()
                        return
                    self._booting.append(pod)
            self._watch_booting()

    def _watch_booting(self) -> None:
        with self._cond:
            booting = list(self._booting)
        if not booting:
            with self._cond:
                self._cond.wait(WATCH_INTERVAL_S)
            return
        readable, _, _ = select.select(booting, [], [], WATCH_INTERVAL_S)  # by fileno()
        now = time.time()
        for pod in booting:
            done = False
            if pod in readable:
                try:
                    message = pod.channel.recv(1.0)
                except (OSError, TimeoutError, ValueError):
                    message = None
                if message is not None and message.get("event") == "ready":
                    pod.ready_at = float(message["runtime_at"])
                    with self._cond:
                        self._booting.remove(pod)
                        self._ready.append(pod)
                        self._cond.notify_all()
                    continue
                done = True  # exited or spoke nonsense
            too_slow = now - pod.spawned_at > self.boot_timeout_s
            if done or too_slow or pod.proc.poll() is not None:
                log.warning("warm pod %d failed to boot (log: %s)", pod.pid, pod.log_path)
                with self._cond:
                    self._booting.remove(pod)
                pod.kill()

    def _spawn(self) -> WarmPod:
        channel, theirs = socketpair()
        self._spawned += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"pod-{os.getpid()}-{self._spawned}.log"
        env = child_env(os.environ)
        if self.torch_threads is not None:
            env["OMP_NUM_THREADS"] = str(self.torch_threads)
        argv = [
            sys.executable,
            "-m",
            "dataplane.scaleout.pod",
            "--control-fd",
            str(theirs.fileno()),
        ]
        if self.cache_dir is not None:
            argv += ["--cache-dir", str(self.cache_dir)]
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        theirs.close()
        return WarmPod(proc, channel, log_path)
