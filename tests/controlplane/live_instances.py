"""FlowServe instance servers for the chat executor's tests: uvicorn on loopback in the test's
process, each behind `Faults`, which breaks it the ways a process breaks."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controlplane import wire
from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.kv_transfer import KVTransferConfig
from dataplane.flowserve.server import create_app


class InstanceDied(Exception):
    """Raised in the middle of a response: the server drops the connection, as a dead
    process's socket does."""


class Faults:
    """ASGI middleware in front of an instance server: how a test breaks it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.die_after_lines: int | None = None  # /generate: the stream breaks after N lines
        self.hang_generate = False  # /generate: headers go out, then nothing (SIGSTOP)
        self.hang_kv = False  # GET /kv/...: the K/V never come
        self.generate_calls = 0

    def reset(self) -> None:
        self.die_after_lines, self.hang_generate, self.hang_kv = None, False, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET" and scope["path"].startswith("/kv/"):
            while self.hang_kv:
                await asyncio.sleep(0.02)
        if scope["path"] != "/generate":
            await self.app(scope, receive, send)
            return
        self.generate_calls += 1
        lines = 0

        async def faulty_send(message: Message) -> None:
            nonlocal lines
            if message["type"] == "http.response.body" and message.get("body"):
                while self.hang_generate:
                    await asyncio.sleep(0.02)
                if self.die_after_lines is not None and lines >= self.die_after_lines:
                    raise InstanceDied
                lines += message["body"].count(b"\n")
            await send(message)

        await self.app(scope, receive, faulty_send)


class Instance:
    """One FlowServe server on a free loopback port, in a thread of this process."""

    def __init__(self, model_dir: Path, role: wire.InstanceRole, kv: KVTransferConfig) -> None:
        self.engine = Engine(EngineConfig(str(model_dir), max_num_seqs=4))
        self.app = create_app(lambda: self.engine, model_name="tiny", role=role, kv_transfer=kv)
        self.faults = Faults(self.app)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(self.faults, log_level="critical", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the instance did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.faults.reset()
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    def in_flight(self) -> int:
        health = httpx.get(f"{self.url}/health", timeout=10).json()
        return int(health["num_requests_running"]) + int(health["num_requests_waiting"])


@contextmanager
def running(instances: dict[str, Instance]) -> Iterator[dict[str, Instance]]:
    """Every instance started, and stopped at the end (a module fixture's body)."""
    try:
        for inst in instances.values():
            inst.start()
        yield instances
    finally:
        for inst in instances.values():
            inst.stop()


@contextmanager
def no_faults(instances: dict[str, Instance]) -> Iterator[dict[str, Instance]]:
    """The instances with no fault set, before and after (a test fixture's body)."""
    for inst in instances.values():
        inst.faults.reset()
    try:
        yield instances
    finally:
        for inst in instances.values():
            inst.faults.reset()
