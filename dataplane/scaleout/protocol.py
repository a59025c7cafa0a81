"""What the launcher tells a warm pod or a zygote, and how: JSON lines over a socketpair.

The launcher's end stays with the launcher; the other end is passed to the pod or zygote as an
inherited fd (`--control-fd`). When the launcher's process goes away, the peer reads EOF: an idle
pod or a zygote then exits, so nothing is left behind.

    pod    -> launcher  {"event": "ready", "pid", "pod_at", "runtime_at"}
    launcher -> pod     {"op": "start", "start": StartCommand}
    pod    -> launcher  {"event": "starting"} | {"event": "error", "message"}
    launcher -> pod     {"op": "train", "spec", "log_path"}  + fd: its stdout pipe's write end
    pod    -> launcher  {"event": "training"} | {"event": "error", "message"}

    zygote -> launcher  {"event": "ready", "pid", "entry", "nbytes"} | {"event": "failed", ...}
    launcher -> zygote  {"op": "fork", "id", "start": StartCommand}
    zygote -> launcher  {"event": "forked", "id", "pid"} | {"event": "error", "id", "message"}
    zygote -> launcher  {"event": "exited", "pid", "code"}   (a child was reaped)
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from controlplane.wire import InstanceRole, InstanceStart, SemiPDConfig
from dataplane.agent.launch import flowserve_command

Message = dict[str, Any]
MAX_LINE = 1 << 20
MAX_FDS = 4  # per recv; a message carries at most one today


@dataclass(frozen=True, slots=True)
class StartCommand:
    """Everything an in-process instance needs: the agent's InstanceStart, its port and host,
    where its log goes, and when the launcher was asked (the first startup mark)."""

    instance_id: str
    model: str
    model_path: str
    port: int
    host: str
    log_path: str
    requested_at: float
    engine_args: dict[str, Any] = field(default_factory=dict)
    torch_threads: int | None = None
    weights_cache: str | None = None  # a warm pod maps the model from this DRAM cache
    share_socket: str | None = None  # a CUDA instance exports its weights here (cuda_share)
    weights_peer: str | None = None  # ... and a new one on the same GPU takes them from there
    weights_peer_mode: str = "copy"
    role: InstanceRole = "colocated"
    semi_pd: dict[str, Any] | None = None  # InstanceStart.semi_pd as JSON

    @classmethod
    def of(
        cls,
        start: InstanceStart,
        port: int,
        *,
        host: str,
        log_path: str,
        requested_at: float,
        torch_threads: int | None = None,
        weights_cache: str | None = None,
    ) -> StartCommand:
        return cls(
            instance_id=start.instance_id,
            model=start.model,
            model_path=start.model_path,
            port=port,
            host=host,
            log_path=log_path,
            requested_at=requested_at,
            engine_args=dict(start.engine_args),
            torch_threads=torch_threads,
            weights_cache=weights_cache,
            role=start.role,
            semi_pd=None if start.semi_pd is None else start.semi_pd.model_dump(mode="json"),
        )

    def flowserve_argv(self) -> list[str]:
        """The flags of `python -m dataplane.flowserve` for this instance: the same ones the
        cold path runs, so every path parses engine args identically."""
        start = InstanceStart(
            instance_id=self.instance_id,
            model=self.model,
            model_path=self.model_path,
            engine_args=self.engine_args,
            role=self.role,
            semi_pd=None if self.semi_pd is None else SemiPDConfig.model_validate(self.semi_pd),
        )
        argv = flowserve_command(start, self.port, self.host)[3:]  # past `python -m module`
        if self.weights_cache is not None:
            argv += ["--weights-from-cache", self.weights_cache]
        if self.share_socket is not None:
            argv += ["--share-weights", self.share_socket]
        if self.weights_peer is not None:
            argv += ["--weights-from-instance", self.weights_peer]
            argv += ["--weights-import", self.weights_peer_mode]
        return argv

    def to_json(self) -> Message:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Message) -> StartCommand:
        return cls(**data)


class Channel:
    """One end of a socketpair carrying JSON lines. Not thread-safe for two readers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""
        self._fds: list[int] = []  # received, not yet taken

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        """Raises OSError when the peer is gone. `fds` travel with the message's first bytes
        (SCM_RIGHTS); the peer finds them with `take_fds` once it has the message."""
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        sent = socket.send_fds(self.sock, [data], list(fds)) if fds else 0
        self.sock.sendall(data[sent:])

    def recv(self, timeout_s: float | None = None) -> Message | None:
        """The next message; None on EOF. Raises TimeoutError when none came in time."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    raise TimeoutError("no message in time")
            try:
                chunk, fds, _, _ = socket.recv_fds(
                    self.sock, 65536, MAX_FDS, socket.MSG_CMSG_CLOEXEC
                )
            except ConnectionResetError:
                chunk, fds = b"", []
            self._fds += fds
            if not chunk:
                return None
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise ValueError("a control message is too long")
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: Message = json.loads(line)
        return message

    def take_fds(self) -> list[int]:
        """The fds received so far, now the caller's to close."""
        fds, self._fds = self._fds, []
        return fds

    def has_buffered(self) -> bool:
        return b"\n" in self._buffer

    def close(self) -> None:
        for fd in self.take_fds():
            os.close(fd)
        self.sock.close()


def socketpair() -> tuple[Channel, socket.socket]:
    """(the launcher's channel, the peer's socket to pass on as an inheritable fd)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.set_inheritable(True)
    return Channel(ours), theirs
