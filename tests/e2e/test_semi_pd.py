"""A semi-pd deployment through the real processes: `deepflow deploy --mode semi-pd` stores the
SLOs, the agent starts FlowServe with `--semi-pd` (its /semipd endpoint answers with them), the
official openai client chats through it as one colocated task recorded as semi-PD, and changing
the SLOs with `deepflow deployments update` replaces the instance with one running the new ones."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import START_TIMEOUT_S, Platform

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "Say something about the sea."}]


def _serving(platform: Platform, name: str, slo_ttft_ms: float) -> dict[str, Any]:
    """The deployment's one ready instance, once it is the only one and runs these SLOs."""
    deadline = time.monotonic() + START_TIMEOUT_S
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = platform.api("GET", f"/api/v1/deployments/{name}").json()
        live = info["instances"]
        if len(live) == 1 and live[0]["state"] == "ready":
            if live[0]["semi_pd"]["slo_ttft_ms"] == slo_ttft_ms:
                return dict(live[0])
        time.sleep(0.3)
    raise AssertionError(f"{name} not serving {slo_ttft_ms} ms: {info}\n{platform.logs()}")


def _semipd(instance: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.get(f"{instance['url']}/semipd", timeout=10.0)
    assert reply.status_code == 200, reply.text  # 404 not_semi_pd on a plain instance
    return dict(reply.json())


def test_semi_pd_deployment_serves_chat_on_semi_pd_instances(platform: Platform) -> None:
    deploy = platform.cli(
        "deploy", "semi", "-m", "tiny", "--mode", "semi-pd", "--slo-ttft-ms", "500",
        "--slo-tpot-ms", "100", "--semi-pd-split", "40", "--replicas", "1", "--json",
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    shown = json.loads(deploy.stdout)
    assert shown["mode"] == "semi-pd" and shown["ready_replicas"] == 1
    assert shown["semi_pd"] == {
        "slo_ttft_ms": 500,
        "slo_tpot_ms": 100,
        "split": 40,
        "static": False,
    }
    got = platform.cli("deployments", "get", "semi")
    assert got.returncode == 0, got.stderr
    assert "TTFT 500 ms, TPOT 100 ms, split 40%, dynamic" in got.stdout

    instance = _serving(platform, "semi", 500)
    assert instance["role"] == "colocated" and instance["semi_pd"] == shown["semi_pd"]
    report = _semipd(instance)
    assert (report["slo_ttft_s"], report["slo_tpot_s"]) == (0.5, 0.1)
    assert report["prefill_share"] == 40 and report["static"] is False
    assert httpx.get(f"{instance['url']}/health").json()["role"] == "colocated"

    client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="semi",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8
    stream = client.chat.completions.create(
        model="semi",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == reply.choices[0].message.content  # greedy: the same either way

    record = platform.request_record(reply.id)
    assert record["state"] == "succeeded" and record["deployment"] == "semi"
    (job,) = record["jobs"]
    (task,) = job["tasks"]
    assert task["kind"] == "colocated" and task["instance_id"] == instance["id"]
    assert job["schedule"] == {"mode": "semi-pd", "instance": instance["id"]}
    assert any("(semi-PD)" in e["reason"] for e in task["events"])

    # New SLOs: a replacement starts with them, and the old instance drains once it is ready.
    updated = platform.cli("deployments", "update", "semi", "--slo-ttft-ms", "250", "--json")
    assert updated.returncode == 0, updated.stdout + updated.stderr
    assert json.loads(updated.stdout)["semi_pd"]["slo_ttft_ms"] == 250
    replacement = _serving(platform, "semi", 250)
    assert replacement["id"] != instance["id"]
    assert _semipd(replacement)["slo_ttft_s"] == 0.25
    again = client.chat.completions.create(model="semi", messages=MESSAGES, max_tokens=4)
    assert again.usage.completion_tokens >= 1

    assert platform.cli("deployments", "delete", "semi").returncode == 0
