"""End-to-end fixtures: the real control plane, node agent and FlowServe instances as processes
on loopback, with a tiny random-weight model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from dataplane.modelstore import create_random

START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Platform:
    home: Path
    url: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0)

    def api(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        with self.client() as c:
            return c.request(method, path, **kwargs)  # type: ignore[arg-type]

    def cli(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).parent / "deepflow"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def wait_ready(
        self, deployment: str, replicas: int = 1, timeout: float = START_TIMEOUT_S
    ) -> dict:
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.api("GET", f"/api/v1/deployments/{deployment}").json()
            if info.get("ready_replicas", 0) >= replicas:
                return info
            time.sleep(0.3)
        raise AssertionError(f"{deployment} not ready in {timeout}s: {info}\n{self.logs()}")

    def deploy(self, name: str, model: str = "tiny", replicas: int = 1) -> dict:
        reply = self.api(
            "POST", "/api/v1/deployments", json={"name": name, "model": model, "replicas": replicas}
        )
        assert reply.status_code == 201, reply.text
        return self.wait_ready(name, replicas)

    def request_record(self, request_id: str, *, until_terminal: bool = True) -> dict:
        deadline = time.monotonic() + 30
        record: dict = {}
        while time.monotonic() < deadline:
            record = self.api("GET", f"/api/v1/requests/{request_id}").json()
            if not until_terminal or record.get("state") in ("succeeded", "failed", "cancelled"):
                return record
            time.sleep(0.1)
        raise AssertionError(f"request {request_id} never ended: {record}")

    def logs(self) -> str:
        out = []
        for name in ("controlplane.log", "agent.log"):
            path = self.home / "logs" / name
            if path.exists():
                out.append(f"--- {name}\n" + path.read_text()[-4000:])
        return "\n".join(out)


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("deepflow-home")
    port, agent_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DEEPFLOW_HOME": str(home),
        "DEEPFLOW_URL": url,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DEEPFLOW_CACHE_DIR": str(home / "dram-cache"),  # the node's preloads stay in the test's
    }
    plat = Platform(home=home, url=url, env=env)
    plat.procs["controlplane"] = _spawn(
        [sys.executable, "-m", "controlplane", "--port", str(port)],
        env,
        home / "logs" / "controlplane.log",
    )
    plat.procs["agent"] = _spawn(
        [
            sys.executable,
            "-m",
            "dataplane.agent",
            "--control-plane",
            url,
            "--port",
            str(agent_port),
            "--name",
            "e2e-node",
        ],
        env,
        home / "logs" / "agent.log",
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                status = plat.api("GET", "/api/v1/status").json()
                if any(n["state"] == "ready" for n in status["nodes"]):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("platform did not start\n" + plat.logs())
            time.sleep(0.2)
        model_dir = create_random(home / "models" / "tiny", "tiny", seed=0)
        reply = plat.api("POST", "/api/v1/models", json={"name": "tiny", "path": str(model_dir)})
        assert reply.status_code == 201, reply.text
        yield plat
    finally:
        _stop(plat.procs["agent"])
        _stop(plat.procs["controlplane"])


@pytest.fixture(scope="session")
def chat_deployment(platform: Platform) -> str:
    platform.deploy("tiny-chat", replicas=1)
    return "tiny-chat"
