"""PD disaggregation through the real processes: a disaggregated pair answers token for token as
a colocated instance does, with both tasks and the K/V hand-off on the records; a dead prefill or
decode instance never hangs or loses a request; a client that leaves cancels the decode task;
`deepflow profile pd` stores a heatmap that routes an auto deployment."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from dataplane.flowserve.kv_transfer import KVTransferConfig
from tests.e2e.conftest import START_TIMEOUT_S, Platform

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = [
    "Tell me about the sea.",
    "List three colours and a number, then say goodbye to everyone in the room.",
    "Why?",
]


def _deploy(platform: Platform, name: str, *flags: str) -> dict[str, list[dict[str, Any]]]:
    done = platform.cli("deploy", name, "-m", "tiny", *flags)
    assert done.returncode == 0, done.stdout + done.stderr
    return _ready(platform, name)


def _ready(platform: Platform, name: str) -> dict[str, list[dict[str, Any]]]:
    """The deployment's ready instances by role, once every group is at its count."""
    deadline = time.monotonic() + START_TIMEOUT_S
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = platform.api("GET", f"/api/v1/deployments/{name}").json()
        ready = [i for i in info["instances"] if i["state"] == "ready"]
        if len(ready) == sum(g["replicas"] for g in info["groups"]):
            by_role: dict[str, list[dict[str, Any]]] = {}
            for inst in ready:
                by_role.setdefault(inst["role"], []).append(inst)
            return by_role
        time.sleep(0.3)
    raise AssertionError(f"{name} not ready: {info}\n{platform.logs()}")


def _client(platform: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{platform.url}/v1", api_key="x", max_retries=0, timeout=120)


def _greedy(client: openai.OpenAI, model: str, prompt: str, *, stream: bool = False) -> str:
    messages: Any = [{"role": "user", "content": prompt}]
    if stream:
        chunks = client.chat.completions.create(
            model=model, messages=messages, max_tokens=24, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0
    )
    return reply.choices[0].message.content or ""


def _latest_request(platform: Platform, deployment: str) -> dict[str, Any]:
    listed = platform.api("GET", "/api/v1/requests?limit=50").json()["data"]
    mine = [r for r in listed if r["deployment"] == deployment]
    return platform.request_record(mine[0]["id"])


def test_a_pair_answers_as_colocated_and_records_the_hand_off(
    platform: Platform, chat_deployment: str
) -> None:
    groups = _deploy(platform, "pd-pair", "--mode", "disaggregated")
    client = _client(platform)
    for prompt in PROMPTS:
        expected = _greedy(client, chat_deployment, prompt)
        assert _greedy(client, "pd-pair", prompt) == expected
        assert _greedy(client, "pd-pair", prompt, stream=True) == expected

    record = _latest_request(platform, "pd-pair")
    assert record["state"] == "succeeded" and record["prompt_chars"] > 0
    (job,) = record["jobs"]
    assert job["schedule"]["mode"] == "disaggregated"
    prefill, decode = job["tasks"]
    assert (prefill["kind"], prefill["state"]) == ("prefill", "succeeded")
    assert (decode["kind"], decode["state"]) == ("decode", "succeeded")
    assert prefill["instance_id"] == groups["prefill"][0]["id"]
    assert decode["instance_id"] == groups["decode"][0]["id"]
    # Same node: shared memory. Bytes and seconds on both sides of the hand-off.
    assert prefill["kv_transport"] == decode["kv_transport"] == "shm"
    assert prefill["kv_bytes"] > 0 and decode["kv_bytes"] == prefill["kv_bytes"]
    assert prefill["kv_transfer_s"] >= 0 and decode["kv_transfer_s"] >= 0
    assert prefill["started_at"] <= prefill["finished_at"] <= decode["started_at"]

    shown = platform.cli("requests", "get", record["id"], "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["jobs"][0]["tasks"][1]["kv_bytes"]


def test_a_client_that_leaves_cancels_the_decode_task(platform: Platform) -> None:
    groups = _deploy(platform, "pd-cancel", "--mode", "disaggregated")
    body = {
        "model": "pd-cancel",
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 4000,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=platform.url, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as reply:
            assert reply.status_code == 200
            request_id = reply.headers["x-request-id"]
            lines = reply.iter_lines()
            assert any(next(lines).startswith("data: ") for _ in range(6))
    record = platform.request_record(request_id)
    assert record["state"] == "cancelled"
    prefill, decode = record["jobs"][0]["tasks"]
    assert prefill["state"] == "succeeded" and decode["state"] == "cancelled"
    decode_url = groups["decode"][0]["url"]
    deadline = time.monotonic() + 10
    while httpx.get(f"{decode_url}/health").json()["num_requests_running"] != 0:
        assert time.monotonic() < deadline, "the decode instance kept generating"
        time.sleep(0.2)


def test_dead_instances_never_hang_or_lose_a_request(
    platform: Platform, chat_deployment: str
) -> None:
    groups = _deploy(platform, "pd-kill", "--mode", "disaggregated", "--decode", "2")
    client = _client(platform)
    expected = _greedy(client, "pd-kill", PROMPTS[0])

    # The prefill side dies: requests retry, and a decode instance computes them whole.
    os.kill(groups["prefill"][0]["pid"], signal.SIGKILL)
    started = time.monotonic()
    answers = [_greedy(client, "pd-kill", PROMPTS[0]) for _ in range(4)]
    assert answers == [expected] * 4
    assert time.monotonic() - started < 60
    listed = platform.api("GET", "/api/v1/requests?limit=50").json()["data"]
    records = [platform.request_record(r["id"]) for r in listed if r["deployment"] == "pd-kill"]
    assert all(r["state"] == "succeeded" for r in records)
    kinds = [[t["kind"] for t in r["jobs"][0]["tasks"]] for r in records]
    assert ["prefill", "colocated"] in kinds  # a failed prefill task, then the whole request
    failed = [t for r in records for t in r["jobs"][0]["tasks"] if t["state"] == "failed"]
    assert failed and all(t["kind"] == "prefill" and t["error"] for t in failed)

    # A decode instance dies mid-stream: the other one resumes the answer after the tokens
    # streamed so far (recomputed), and the client reads one unbroken answer, the colocated one.
    _ready(platform, "pd-kill")  # the prefill instance was replaced
    story: Any = [{"role": "user", "content": "Tell a long story."}]
    long: Any = {"max_tokens": 600, "temperature": 0, "extra_body": {"ignore_eos": True}}
    want = client.chat.completions.create(model=chat_deployment, messages=story, **long)
    stream = client.chat.completions.create(model="pd-kill", messages=story, stream=True, **long)
    request_id, texts, killed = None, [], None
    for i, chunk in enumerate(stream):
        request_id = chunk.id
        texts += [c.delta.content or "" for c in chunk.choices]
        if i == 3:
            record = platform.request_record(request_id, until_terminal=False)
            killed = record["jobs"][0]["tasks"][-1]["instance_id"]
            pid = platform.api("GET", f"/api/v1/instances/{killed}").json()["pid"]
            os.kill(pid, signal.SIGKILL)
    assert "".join(texts) == want.choices[0].message.content
    assert request_id is not None
    record = platform.request_record(request_id)
    assert record["state"] == "succeeded" and record["completion_tokens"] == 600
    tasks = [(t["kind"], t["state"], t["instance_id"]) for t in record["jobs"][0]["tasks"]]
    # The prefill ran on a prefill instance (which one: the replacement, or another the
    # reconciler started meanwhile), the decode on the one killed.
    assert tasks[0][:2] == ("prefill", "succeeded") and tasks[1] == ("decode", "failed", killed)
    prefill = platform.api("GET", f"/api/v1/instances/{tasks[0][2]}").json()
    assert prefill["role"] == "prefill"
    assert tasks[2][:2] == ("decode", "succeeded") and tasks[2][2] != killed
    # And the deployment goes on serving on what is left.
    assert _greedy(client, "pd-kill", PROMPTS[0]) == expected


def test_profile_pd_stores_a_heatmap_that_routes_auto(platform: Platform) -> None:
    _deploy(platform, "pd-auto-prof", "--mode", "auto")
    profiled = platform.cli(
        "profile", "pd", "pd-auto-prof", "--repeats", "1", "--concurrency", "1",
        "--prompt-edges", "0,32,inf", "--ratio-edges", "0,0.5,inf", "--max-total-tokens", "200",
        "--json",
    )  # fmt: skip
    assert profiled.returncode == 0, profiled.stdout + profiled.stderr
    info = json.loads(profiled.stdout)
    heatmap = info["heatmap"]
    assert len(heatmap["values"]) == 2 and all(len(row) == 2 for row in heatmap["values"])
    measured = [v for row in heatmap["values"] for v in row if v is not None]
    assert measured and info["num_measurements"] == 2 * len(measured)
    shown = platform.cli("profile", "pd", "pd-auto-prof", "--show")
    assert shown.returncode == 0 and "PD heatmap" in shown.stdout, shown.stdout + shown.stderr
    assert "decode-length predictor" in shown.stdout

    # The stored map routes: the decision names its cell and value, and the mode it implies.
    client = _client(platform)
    _greedy(client, "pd-auto-prof", PROMPTS[1])
    job = _latest_request(platform, "pd-auto-prof")["jobs"][0]
    schedule = job["schedule"]
    assert schedule["heatmap_cell"] is not None and schedule["heatmap_value"] is not None
    want = "disaggregated" if schedule["heatmap_value"] > 0 else "colocated"
    assert schedule["mode"] == want
    assert [t["kind"] for t in job["tasks"]] == (
        ["prefill", "decode"] if want == "disaggregated" else ["colocated"]
    )

    refused = platform.cli("profile", "pd", "tiny-chat")
    assert refused.returncode != 0 and "mode auto" in refused.stderr


def test_lost_or_unusable_kv_is_recomputed_on_the_decode_instance(
    platform: Platform, chat_deployment: str
) -> None:
    """K/V that vanish before the decode instance fetches them (deleted from shared memory as
    soon as they are written) or that it cannot use (a request for logprobs: the first token's
    stays on the prefill side) are recomputed there: same answer, noted on the decode task."""
    _deploy(platform, "pd-lost", "--mode", "disaggregated")
    client = _client(platform)
    expected = _greedy(client, chat_deployment, PROMPTS[1])
    shm_dir = KVTransferConfig.default_shm_dir()
    stop = threading.Event()

    def delete_transfers() -> None:
        while not stop.is_set():
            for path in shm_dir.glob("*.kv"):
                path.unlink(missing_ok=True)

    deleter = threading.Thread(target=delete_transfers, daemon=True)
    deleter.start()
    try:
        answers = [_greedy(client, "pd-lost", PROMPTS[1]) for _ in range(3)]
    finally:
        stop.set()
        deleter.join()
    assert answers == [expected] * 3
    listed = platform.api("GET", "/api/v1/requests?limit=50").json()["data"]
    records = [platform.request_record(r["id"]) for r in listed if r["deployment"] == "pd-lost"]
    decodes = [r["jobs"][0]["tasks"][-1] for r in records]
    recomputed = [
        d for d in decodes if any("recomputes the prompt" in e["reason"] for e in d["events"])
    ]
    assert recomputed and all(d["kind"] == "decode" and d["kv_bytes"] is None for d in recomputed)

    # Logprobs: the decode instance refuses the K/V (409 kv_mismatch) and computes the prompt.
    messages: Any = [{"role": "user", "content": PROMPTS[0]}]
    want = client.chat.completions.create(
        model=chat_deployment, messages=messages, max_tokens=8, temperature=0, logprobs=True
    )
    got = client.chat.completions.create(
        model="pd-lost", messages=messages, max_tokens=8, temperature=0, logprobs=True
    )
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.choices[0].logprobs is not None and want.choices[0].logprobs is not None
    assert [t.token for t in got.choices[0].logprobs.content or []] == [
        t.token for t in want.choices[0].logprobs.content or []
    ]
