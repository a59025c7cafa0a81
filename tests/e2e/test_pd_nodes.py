"""PD disaggregation across nodes, through real processes on loopback: a control plane (with a
short prefill timeout) and two node agents of different names, so the planner places a pair's
prefill and decode instances on different nodes and their K/V go by the `stream` transport.
A prefill instance that hangs (SIGSTOP) hits the prefill timeout and its request still
succeeds."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dataplane.modelstore import create_random
from tests.e2e.conftest import START_TIMEOUT_S, Platform, _spawn, _stop, free_port
from tests.e2e.test_pd import _client, _deploy, _ready
from tests.e2e.test_pd_failures import _whole_on

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PREFILL_TIMEOUT_S = 3.0
NODES = ("node-a", "node-b")

# The control plane as `python -m controlplane` runs it, with a prefill timeout a test can wait.
CONTROL_PLANE = """
import dataclasses, logging, sys
import uvicorn
from controlplane.app import create_app
from controlplane.settings import Settings
logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
port, prefill_timeout_s = int(sys.argv[1]), float(sys.argv[2])
settings = Settings.from_env(port=port)
settings = dataclasses.replace(settings, prefill_timeout_s=prefill_timeout_s)
uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
"""


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("deepflow-two-nodes")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DEEPFLOW_HOME": str(home),
        "DEEPFLOW_URL": url,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DEEPFLOW_WARM_POOL_SIZE": "0",  # cold starts: fewer processes on a small machine
        "DEEPFLOW_ZYGOTES": "off",
    }
    plat = Platform(home=home, url=url, env=env)
    plat.procs["controlplane"] = _spawn(
        [sys.executable, "-c", CONTROL_PLANE, str(port), str(PREFILL_TIMEOUT_S)],
        env,
        home / "logs" / "controlplane.log",
    )
    for name in NODES:
        agent_home = home / name
        plat.procs[name] = _spawn(
            [
                sys.executable, "-m", "dataplane.agent", "--control-plane", url,
                "--port", str(free_port()), "--name", name,
                "--cache-dir", str(agent_home / "dram-cache"),
            ],
            {**env, "DEEPFLOW_HOME": str(agent_home)},
            home / "logs" / "agent.log",
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                nodes = plat.api("GET", "/api/v1/status").json()["nodes"]
                if sorted(n["name"] for n in nodes if n["state"] == "ready") == list(NODES):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the two nodes did not come up\n" + plat.logs())
            time.sleep(0.2)
        model_dir = create_random(home / "models" / "tiny", "tiny", seed=0)
        reply = plat.api("POST", "/api/v1/models", json={"name": "tiny", "path": str(model_dir)})
        assert reply.status_code == 201, reply.text
        yield plat
    finally:
        for name in NODES:
            _stop(plat.procs[name])
        _stop(plat.procs["controlplane"])


MESSAGES: Any = [{"role": "user", "content": "List three colours and a number, then say goodbye."}]


def _ask(platform: Platform, model: str) -> tuple[str, str]:
    reply = _client(platform).chat.completions.with_raw_response.create(
        model=model,
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return reply.headers["x-request-id"], reply.parse().choices[0].message.content or ""


def test_a_pair_on_two_nodes_streams_its_kv(two_nodes: Platform) -> None:
    groups = _deploy(two_nodes, "pd-nodes", "--mode", "disaggregated")
    (prefill,), (decode,) = groups["prefill"], groups["decode"]
    assert prefill["node_id"] != decode["node_id"]  # the planner spreads the pair
    expected = _whole_on(decode, MESSAGES, 24)

    request_id, answer = _ask(two_nodes, "pd-nodes")
    assert answer == expected
    record = two_nodes.request_record(request_id)
    assert record["state"] == "succeeded"
    (job,) = record["jobs"]
    assert job["schedule"]["mode"] == "disaggregated"
    prefill_task, decode_task = job["tasks"]
    assert (prefill_task["kind"], prefill_task["state"]) == ("prefill", "succeeded")
    assert (decode_task["kind"], decode_task["state"]) == ("decode", "succeeded")
    assert (prefill_task["node_id"], decode_task["node_id"]) == (
        prefill["node_id"],
        decode["node_id"],
    )
    # Across nodes: the decode instance streamed the K/V from the prefill instance.
    assert prefill_task["kv_transport"] == decode_task["kv_transport"] == "stream"
    assert prefill_task["kv_bytes"] > 0 and decode_task["kv_bytes"] == prefill_task["kv_bytes"]
    assert prefill_task["kv_transfer_s"] >= 0 and decode_task["kv_transfer_s"] > 0

    shown = two_nodes.cli("requests", "get", request_id)
    assert shown.returncode == 0 and "stream" in shown.stdout, shown.stdout + shown.stderr


def test_a_hung_prefill_instance_hits_the_prefill_timeout(two_nodes: Platform) -> None:
    groups = _ready(two_nodes, "pd-nodes")
    (prefill,), (decode,) = groups["prefill"], groups["decode"]
    expected = _whole_on(decode, MESSAGES, 24)
    os.kill(prefill["pid"], signal.SIGSTOP)
    try:
        started = time.monotonic()
        request_id, answer = _ask(two_nodes, "pd-nodes")
        waited = time.monotonic() - started
    finally:
        os.kill(prefill["pid"], signal.SIGCONT)
    assert answer == expected
    assert PREFILL_TIMEOUT_S <= waited < PREFILL_TIMEOUT_S + 30
    record = two_nodes.request_record(request_id)
    assert record["state"] == "succeeded"
    prefill_task, whole = record["jobs"][0]["tasks"]
    assert (prefill_task["kind"], prefill_task["state"]) == ("prefill", "failed")
    assert f"took longer than {PREFILL_TIMEOUT_S:g} s" in prefill_task["error"]
    # The only prefill instance failed it: the decode instance ran the request whole.
    assert (whole["kind"], whole["state"]) == ("colocated", "succeeded")
    assert whole["instance_id"] == decode["id"]
    # Once it runs again, the prefill instance is used again and holds nothing in flight.
    deadline = time.monotonic() + 30
    while httpx.get(f"{prefill['url']}/health", timeout=10).json()["num_requests_running"]:
        assert time.monotonic() < deadline, "the timed-out prefill kept running"
        time.sleep(0.2)
    request_id, answer = _ask(two_nodes, "pd-nodes")
    tasks = two_nodes.request_record(request_id)["jobs"][0]["tasks"]
    assert answer == expected and [t["kind"] for t in tasks] == ["prefill", "decode"]
