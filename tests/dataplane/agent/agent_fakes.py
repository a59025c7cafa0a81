"""Fakes for the node agent tests: an instance script, a control plane, a uvicorn runner."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp

from controlplane.wire import InstanceStart

# A stand-in for `python -m dataplane.flowserve`; `start.model` picks its behaviour.
FAKE_INSTANCE = r"""
import argparse, http.server, json, os, signal, subprocess, sys, threading, time

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--mode", required=True)
args = parser.parse_args()
print(f"fake instance mode={args.mode} pid={os.getpid()}", flush=True)

if args.mode == "hang":  # never answers /health
    time.sleep(600)
if args.mode == "stubborn":  # ignores SIGTERM, so only SIGKILL stops it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if args.mode == "forks":  # leaves a grandchild in its process group
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"grandchild pid={child.pid}", flush=True)
if args.mode == "exit3":  # serves, then dies with code 3 after 0.5 s
    def die():
        time.sleep(0.5)
        print("boom: out of memory", flush=True)
        os._exit(3)
    threading.Thread(target=die, daemon=True).start()


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/health":
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps({"status": "ok", "model": "m", "max_model_len": 16}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", args.port), Health).serve_forever()
"""


def make_start(instance_id: str, mode: str = "ok", **engine_args: Any) -> InstanceStart:
    return InstanceStart(
        instance_id=instance_id, model=mode, model_path="/models/m", engine_args=engine_args
    )


@dataclass(slots=True)
class Call:
    path: str
    body: dict[str, Any]


@dataclass(slots=True)
class FakeControlPlane:
    """The control plane's side of the node agent protocol, recording every call."""

    down_for: int = 0  # the first N calls fail to connect
    heartbeat_interval_s: float = 0.1
    forget: bool = False  # the next heartbeat gets 404
    calls: list[Call] = field(default_factory=list)
    registrations: int = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down_for > 0:
            self.down_for -= 1
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        self.calls.append(Call(path, json.loads(request.content or b"{}")))
        if path == "/api/v1/nodes/register":
            self.registrations += 1
            node_id = f"node-{self.registrations}"
            return httpx.Response(
                200, json={"node_id": node_id, "heartbeat_interval_s": self.heartbeat_interval_s}
            )
        if path.endswith("/heartbeat"):
            if self.forget:
                self.forget = False
                return httpx.Response(404, json={"error": {"message": "unknown node"}})
            return httpx.Response(200, json={})
        if path.endswith("/report"):
            return httpx.Response(200, json={})
        return httpx.Response(404, json={})

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def bodies(self, suffix: str) -> list[dict[str, Any]]:
        return [c.body for c in list(self.calls) if c.path.endswith(suffix)]

    def reports(self, instance_id: str) -> list[dict[str, Any]]:
        return self.bodies(f"/instances/{instance_id}/report")

    def states(self, instance_id: str) -> list[str]:
        return [r["state"] for r in self.reports(instance_id)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve(app: ASGIApp) -> Iterator[str]:
    """Run `app` on real uvicorn in a thread; yields its base URL; stops it (lifespan exit)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 10)
    if not server.started:
        raise RuntimeError("uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until(predicate: Callable[[], object], timeout_s: float, step_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(step_s)


async def async_wait_until(
    predicate: Callable[[], object], timeout_s: float, step_s: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(step_s)


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
