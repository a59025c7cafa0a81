"""The launcher's side of a zygote (`zygote.py`): start it, ask it to fork, learn of exits.

    zygote = Zygote.start(model_path, log_dir=..., cache_dir=...)   # blocks until it holds
    handle = zygote.fork(command)                                  # the weights; then ~ms
    zygote.close()

One reader thread per zygote takes its messages: replies to `fork` and the exit codes of the
children it reaps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from dataplane.agent.process import child_env
from dataplane.scaleout.errors import ZygoteUnavailable
from dataplane.scaleout.handles import ForkedHandle, proc_start_ticks
from dataplane.scaleout.protocol import Channel, Message, StartCommand, socketpair

FORK_REPLY_TIMEOUT_S = 10.0


class Zygote:
    def __init__(
        self,
        model_path: str,
        dtype: str | None,
        proc: subprocess.Popen[bytes],
        channel: Channel,
        ready: Message,
    ) -> None:
        self.model_path = model_path
        self.dtype = dtype  # as asked for; None: the node's default
        self.proc = proc
        self.resolved_dtype = str(ready["dtype"])  # what the zygote holds
        self.entry = str(ready["entry"])
        self.nbytes = int(ready["nbytes"])
        self._channel = channel
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, Message] = {}
        self._exits: dict[int, int] = {}
        self._next_id = 0
        self._closed = False
        self._reader = threading.Thread(target=self._read, name=f"zygote-{proc.pid}", daemon=True)
        self._reader.start()

    @classmethod
    def start(
        cls,
        model_path: str,
        *,
        log_dir: Path,
        cache_dir: str | None = None,
        cache_budget: int | None = None,
        dtype: str | None = None,
        timeout_s: float = 300.0,
    ) -> Zygote:
        """Start a zygote and wait until it holds the weights (preloading them into the DRAM
        cache first when needed). Raises ZygoteUnavailable if it fails or takes too long."""
        channel, theirs = socketpair()
        argv = [
            sys.executable, "-m", "dataplane.scaleout.zygote", "--model", model_path,
            "--control-fd", str(theirs.fileno()),
        ]  # fmt: skip
        if cache_dir is not None:
            argv += ["--cache-dir", cache_dir]
        if cache_budget is not None:
            argv += ["--cache-budget", str(cache_budget)]
        if dtype is not None:
            argv += ["--dtype", dtype]
        env = child_env(os.environ)
        env["OMP_NUM_THREADS"] = "1"  # see zygote.py: no thread pool before fork
        env["TOKENIZERS_PARALLELISM"] = "false"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"zygote-{Path(model_path).name}.log"
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
        try:
            ready = channel.recv(timeout_s)
        except TimeoutError:
            ready = {"event": "failed", "message": f"not ready within {timeout_s} s"}
        if ready is None or ready.get("event") != "ready":
            why = "exited" if ready is None else ready.get("message")
            proc.kill()
            proc.wait()
            channel.close()
            raise ZygoteUnavailable(f"zygote for {model_path}: {why} (log: {log_path})")
        return cls(model_path, dtype, proc, channel, ready)

    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def fork(self, command: StartCommand) -> ForkedHandle:
        """A child serving `command`; raises ZygoteUnavailable when the zygote cannot fork."""
        with self._cond:
            self._next_id += 1
            request_id = self._next_id
        try:
            with self._send_lock:
                self._channel.send({"op": "fork", "id": request_id, "start": command.to_json()})
        except OSError as exc:
            raise ZygoteUnavailable(f"zygote {self.proc.pid} is gone: {exc}") from exc
        deadline = time.monotonic() + FORK_REPLY_TIMEOUT_S
        with self._cond:
            while request_id not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise ZygoteUnavailable(f"zygote {self.proc.pid} did not answer a fork")
                self._cond.wait(left)
            reply = self._replies.pop(request_id)
        if reply.get("event") != "forked":
            raise ZygoteUnavailable(f"zygote {self.proc.pid} could not fork: {reply}")
        pid = int(reply["pid"])
        return ForkedHandle(
            instance_id=command.instance_id,
            path="fork",
            pid=pid,
            url=f"http://{command.host}:{command.port}",
            log_path=command.log_path,
            requested_at=command.requested_at,
            dispatched_at=time.time(),
            zygote=self,
            start_ticks=proc_start_ticks(pid) or 0,
        )

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            return self._exits.get(pid)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the zygote. Its children still running get SIGTERM (PR_SET_PDEATHSIG)."""
        try:
            with self._send_lock:
                self._channel.send({"op": "exit"})
        except OSError:
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout_s)
        self._channel.close()

    def _read(self) -> None:
        while True:
            try:
                message = self._channel.recv()
            except (OSError, ValueError):
                message = None
            with self._cond:
                if message is None:
                    self._closed = True
                    self._cond.notify_all()
                    return
                if message.get("event") == "exited":
                    self._exits[int(message["pid"])] = int(message["code"])
                elif "id" in message:
                    self._replies[int(message["id"])] = message
                self._cond.notify_all()
