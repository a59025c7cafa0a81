"""PD failures through the real processes, each side killed mid-request: a decode instance
killed while it generates a non-streamed answer is resumed on the other decode instance, and
the reply is the colocated one; a prefill instance killed while it computes a long prompt is
retried and the request runs whole on a decode instance; a client that leaves while the prefill
task runs (its instance stopped) cancels it at once. And the decode-length predictor's accuracy,
once the deployment has history, is a number in the API and the CLI."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dataplane.modelstore import create_random
from tests.e2e.conftest import Platform
from tests.e2e.test_pd import _client, _deploy, _ready

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STORY: Any = [{"role": "user", "content": "Tell a long story."}]
# About 1,700 prompt tokens: the longest prefill the tiny model's 2,048-token context allows
# with a short answer.
LONG_PROMPT: Any = [
    {"role": "user", "content": " ".join(f"item {i} is {i * 7 % 13}." for i in range(240))}
]


@pytest.fixture(scope="module")
def pd_fail(platform: Platform) -> str:
    _deploy(platform, "pd-fail", "--mode", "disaggregated", "--decode", "2")
    return "pd-fail"


@pytest.fixture(scope="module")
def pd_small(platform: Platform) -> str:
    """A pair of the `small` random model, whose prefill of LONG_PROMPT takes a good part of a
    second on a CPU: long enough to kill the instance while it computes."""
    model_dir = create_random(platform.home / "models" / "small", "small", seed=0)
    reply = platform.api("POST", "/api/v1/models", json={"name": "small", "path": str(model_dir)})
    assert reply.status_code == 201, reply.text
    done = platform.cli("deploy", "pd-small", "-m", "small", "--mode", "disaggregated")
    assert done.returncode == 0, done.stdout + done.stderr
    return "pd-small"


def _whole_on(instance: dict[str, Any], messages: Any, max_tokens: int) -> str:
    """The greedy answer of one instance running the request alone (colocated)."""
    body = {
        "request_id": f"ref-{time.monotonic_ns()}",
        "messages": messages,
        "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
    }
    reply = httpx.post(f"{instance['url']}/generate", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    lines = [json.loads(line) for line in reply.text.splitlines()]
    return "".join(line["text"] for line in lines if line["type"] == "delta")


def _answer(platform: Platform, model: str, messages: Any, max_tokens: int) -> str:
    reply = _client(platform).chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return reply.choices[0].message.content or ""


def _in_background(fn: Callable[[], str]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["answer"] = fn()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _running_request(platform: Platform, deployment: str) -> dict[str, Any] | None:
    listed = platform.api("GET", "/api/v1/requests?state=running&limit=20").json()["data"]
    mine = [r for r in listed if r["deployment"] == deployment]
    return platform.request_record(mine[0]["id"], until_terminal=False) if mine else None


def _pid(platform: Platform, instance_id: str) -> int:
    return int(platform.api("GET", f"/api/v1/instances/{instance_id}").json()["pid"])


def _replaced(platform: Platform, deployment: str, instance_id: str) -> None:
    """Wait until a killed instance is off the ready list and its group is whole again."""
    deadline = time.monotonic() + 60
    while platform.api("GET", f"/api/v1/instances/{instance_id}").json()["state"] == "ready":
        assert time.monotonic() < deadline, f"{instance_id} was never seen dead"
        time.sleep(0.2)
    _ready(platform, deployment)


def _idle(instance: dict[str, Any]) -> bool:
    health = httpx.get(f"{instance['url']}/health", timeout=10).json()
    return bool(health["num_requests_running"] + health["num_requests_waiting"] == 0)


def test_a_decode_killed_mid_answer_is_resumed_on_another(
    platform: Platform, chat_deployment: str, pd_fail: str
) -> None:
    _ready(platform, pd_fail)
    expected = _answer(platform, chat_deployment, STORY, 1000)
    thread, out = _in_background(lambda: _answer(platform, pd_fail, STORY, 1000))
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and thread.is_alive():
        assert time.monotonic() < deadline, "the decode task never ran"
        record = _running_request(platform, pd_fail)
        tasks = record["jobs"][0]["tasks"] if record and record["jobs"] else []
        if tasks and tasks[-1]["kind"] == "decode" and tasks[-1]["state"] == "running":
            killed = tasks[-1]["instance_id"]
            os.kill(_pid(platform, killed), signal.SIGKILL)
        time.sleep(0.01)
    thread.join(120)
    assert killed is not None, "the answer was done before the decode instance was killed"
    assert out.get("answer") == expected, out

    listed = platform.api("GET", "/api/v1/requests?limit=5").json()["data"]
    record = platform.request_record(next(r for r in listed if r["deployment"] == pd_fail)["id"])
    assert (record["state"], record["completion_tokens"]) == ("succeeded", 1000)
    (job,) = record["jobs"]
    assert job["state"] == "succeeded"
    prefill, dead, resumed = job["tasks"]
    assert (prefill["kind"], prefill["state"]) == ("prefill", "succeeded")
    assert (dead["kind"], dead["state"], dead["instance_id"]) == ("decode", "failed", killed)
    assert dead["error"].startswith(f"instance {killed} failed mid-request")
    assert (resumed["kind"], resumed["state"]) == ("decode", "succeeded")
    assert resumed["instance_id"] != killed
    dispatched = [e["reason"] for e in resumed["events"] if e["to_state"] == "dispatched"]
    assert "recomputes the prompt and the" in dispatched[0]
    _replaced(platform, pd_fail, killed)


def test_a_prefill_killed_mid_prefill_is_retried(platform: Platform, pd_small: str) -> None:
    groups = _ready(platform, pd_small)
    (prefill,), (decode,) = groups["prefill"], groups["decode"]
    expected = _whole_on(decode, LONG_PROMPT, 8)
    thread, out = _in_background(lambda: _answer(platform, pd_small, LONG_PROMPT, 8))
    killed = None
    while killed is None and thread.is_alive():
        record = _running_request(platform, pd_small)
        tasks = record["jobs"][0]["tasks"] if record and record["jobs"] else []
        if tasks and tasks[-1]["kind"] == "prefill" and tasks[-1]["state"] == "dispatched":
            os.kill(prefill["pid"], signal.SIGKILL)  # it holds the request, computing it
            killed = prefill["id"]
        time.sleep(0.01)
    thread.join(120)
    assert killed is not None, "the prefill task was never seen running"
    assert out.get("answer") == expected, out

    listed = platform.api("GET", "/api/v1/requests?limit=5").json()["data"]
    record = platform.request_record(next(r for r in listed if r["deployment"] == pd_small)["id"])
    assert record["state"] == "succeeded"
    failed, whole = record["jobs"][0]["tasks"]
    assert (failed["kind"], failed["state"], failed["instance_id"]) == ("prefill", "failed", killed)
    # It died holding the request (it did not refuse the connection) ...
    assert "failed: " in failed["error"] and "ConnectError" not in failed["error"]
    # ... and with no other prefill instance, the decode instance ran the request whole.
    assert (whole["kind"], whole["state"], whole["instance_id"]) == (
        "colocated",
        "succeeded",
        decode["id"],
    )
    _replaced(platform, pd_small, killed)


def test_a_client_that_leaves_during_the_prefill_cancels_it(
    platform: Platform, pd_fail: str
) -> None:
    groups = _ready(platform, pd_fail)
    (prefill,) = groups["prefill"]
    body = {"model": pd_fail, "messages": STORY, "max_tokens": 16, "stream": True}
    os.kill(prefill["pid"], signal.SIGSTOP)  # the prefill task runs as long as it is stopped
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{platform.url}/v1/chat/completions",
                json=body,
                timeout=httpx.Timeout(10.0, read=2.0),
            )  # the client gives up and hangs up
        left = time.monotonic()
        listed = platform.api("GET", "/api/v1/requests?limit=5").json()["data"]
        request_id = next(r for r in listed if r["deployment"] == pd_fail)["id"]
        record = platform.request_record(request_id)
        # Cancelled at once, not after the prefill timeout (60 s here) and a retry.
        assert time.monotonic() - left < 10
    finally:
        os.kill(prefill["pid"], signal.SIGCONT)
    assert record["state"] == "cancelled" and record["jobs"][0]["state"] == "cancelled"
    assert [(t["kind"], t["state"]) for t in record["jobs"][0]["tasks"]] == [
        ("prefill", "cancelled")
    ]
    # Nothing is left running on either side, and the pair serves the next request.
    deadline = time.monotonic() + 30
    while not all(_idle(i) for role in ("prefill", "decode") for i in groups[role]):
        assert time.monotonic() < deadline, "a cancelled prefill kept running"
        time.sleep(0.2)
    assert _answer(platform, pd_fail, STORY, 8)


def test_the_decode_length_predictor_reports_its_accuracy(platform: Platform) -> None:
    """Ten finished requests are enough for the predictor to be tested on a held-out fifth:
    every answer here is 8 tokens, so each falls in the first 128-token bucket (predicted
    right) and the prediction, the bucket's middle, is 56 tokens off."""
    _deploy(platform, "pd-predict", "--mode", "disaggregated")
    client = _client(platform)
    before = platform.api("GET", "/api/v1/deployments/pd-predict/pd-profile").json()
    assert before["predictor"]["bucket_accuracy"] is None
    for i in range(12):
        client.completions.create(
            model="pd-predict",
            prompt=f"Request number {i} asks for a few words.",
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    info = platform.api("GET", "/api/v1/deployments/pd-predict/pd-profile").json()
    predictor = info["predictor"]
    assert (predictor["n_train"], predictor["n_test"], predictor["bucket_tokens"]) == (10, 2, 128)
    assert isinstance(predictor["bucket_accuracy"], float) and predictor["bucket_accuracy"] == 1.0
    assert predictor["mean_abs_error_tokens"] == pytest.approx(56.0)

    shown = platform.cli("profile", "pd", "pd-predict", "--show")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert (
        "decode-length predictor (128-token buckets): 100.0% of held-out requests in the "
        "right bucket, mean error 56 tokens (trained on 10, tested on 2)"
    ) in " ".join(shown.stdout.split())
    as_json = platform.cli("profile", "pd", "pd-predict", "--show", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["predictor"] == predictor
