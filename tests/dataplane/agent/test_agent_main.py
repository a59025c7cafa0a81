"""`python -m dataplane.agent` as a real process against a real (fake) control plane."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from agent_fakes import free_port, serve, wait_until
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dataplane.agent.__main__ import parse_args, settings_from


def control_plane(calls: list[tuple[str, Any]]) -> Starlette:
    async def register(request: Request) -> Response:
        calls.append(("register", await request.json()))
        return JSONResponse({"node_id": "n-42", "heartbeat_interval_s": 0.2})

    async def heartbeat(request: Request) -> Response:
        calls.append(("heartbeat", request.path_params["node_id"]))
        return JSONResponse({})

    return Starlette(
        routes=[
            Route("/api/v1/nodes/register", register, methods=["POST"]),
            Route("/api/v1/nodes/{node_id}/heartbeat", heartbeat, methods=["POST"]),
        ]
    )


def test_settings_from_args(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("DEEPFLOW_HOME", str(tmp_path))
    args = parse_args(["--control-plane", "http://cp:8480", "--host", "0.0.0.0", "--name", "a"])
    settings = settings_from(args)
    assert settings.url == "http://127.0.0.1:8481"
    assert settings.name == "a" and settings.home == tmp_path
    assert settings.instance_log_dir == tmp_path / "logs" / "instances"


def test_agent_process_registers_heartbeats_and_exits_on_sigterm(tmp_path: Path) -> None:
    calls: list[tuple[str, Any]] = []
    port = free_port()
    with serve(control_plane(calls)) as cp_url:
        env = {**os.environ, "DEEPFLOW_HOME": str(tmp_path)}
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dataplane.agent",
                "--control-plane",
                cp_url,
                "--port",
                str(port),
                "--name",
                "proc-node",
                "--log-level",
                "warning",
            ],
            env=env,
        )
        try:
            wait_until(lambda: ("heartbeat", "n-42") in calls, 15)
            health = httpx.get(f"http://127.0.0.1:{port}/health").json()
            assert health == {"status": "ok", "node_id": "n-42"}
            registration = next(body for kind, body in calls if kind == "register")
            assert registration["name"] == "proc-node"
            assert registration["url"] == f"http://127.0.0.1:{port}"
            assert registration["resources"]["cpus"] == os.cpu_count()
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(15) in (0, -signal.SIGTERM)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
