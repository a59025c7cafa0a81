"""`python -m dataplane.flowserve` as the node agent starts it: a real process on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dataplane.flowserve.__main__ import parse_args

REPO_ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_parse_args_defaults() -> None:
    args = parse_args(["--model", "/m", "--port", "9000"])
    assert (args.host, args.instance_id, args.dtype, args.max_model_len) == (
        "127.0.0.1",
        None,
        None,
        None,
    )


@pytest.mark.e2e
def test_process_serves_and_exits_on_sigterm(tiny_model_dir: Path) -> None:
    port = free_port()
    command = [
        sys.executable, "-m", "dataplane.flowserve", "--model", str(tiny_model_dir),
        "--port", str(port), "--instance-id", "i-9", "--model-name", "tiny-x",
        "--max-model-len", "256", "--kv-cache-memory", str(256 << 20),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert health is not None, process.stdout.read() if process.stdout else ""
        assert health["status"] == "ok"
        assert (health["instance_id"], health["model"], health["max_model_len"]) == (
            "i-9",
            "tiny-x",
            256,
        )
        # SIGTERM mid-stream: the stream still runs to its end, then the process exits 0.
        sampling = {"max_tokens": 100, "ignore_eos": True}
        body = {"request_id": "r", "prompt": "Hello", "sampling": sampling}
        with httpx.stream("POST", url + "/generate", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert json.loads(next(lines))["type"] == "delta"
            process.send_signal(signal.SIGTERM)
            rest = [json.loads(line) for line in lines]
        assert (rest[-1]["type"], rest[-1]["completion_tokens"]) == ("done", 100)
        assert process.wait(timeout=20) == 0
        output = process.stdout.read().decode() if process.stdout else ""
        # The configured KV budget and what it bought, printed at start whatever the log level.
        kv_line = re.search(
            r"flowserve tiny-x: KV cache: budget 0\.25 GiB \(fixed\), (\d+) blocks of 16 tokens "
            r"\((\d+) tokens\) on \w+",
            output,
        )
        assert kv_line is not None, output
        assert int(kv_line[2]) == 16 * int(kv_line[1]) > 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
