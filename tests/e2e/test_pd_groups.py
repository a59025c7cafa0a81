"""Deployments made of instance groups through the real processes: `deepflow deploy --mode
disaggregated` and `--mode auto` start instances of each role, every instance's /health reports
its role, and scaling one group leaves the others alone."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import START_TIMEOUT_S, Platform

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _ready(platform: Platform, name: str) -> dict[str, list[dict[str, Any]]]:
    """The deployment's ready instances by role, once every group has its count ready."""
    deadline = time.monotonic() + START_TIMEOUT_S
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = platform.api("GET", f"/api/v1/deployments/{name}").json()
        if all(g["ready_replicas"] == g["replicas"] for g in info["groups"]):
            ready = [i for i in info["instances"] if i["state"] == "ready"]
            if len(ready) == sum(g["replicas"] for g in info["groups"]):
                by_role: dict[str, list[dict[str, Any]]] = {}
                for inst in ready:
                    by_role.setdefault(inst["role"], []).append(inst)
                return by_role
        time.sleep(0.3)
    raise AssertionError(f"{name} not ready: {info}\n{platform.logs()}")


def _health_role(instance: dict[str, Any]) -> str:
    reply = httpx.get(f"{instance['url']}/health", timeout=10.0)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["role"])


def test_disaggregated_and_auto_deployments_run_their_groups(platform: Platform) -> None:
    deploy = platform.cli(
        "deploy", "pd-split", "-m", "tiny", "--mode", "disaggregated", "--prefill", "1",
        "--decode", "1", "--json",
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    shown = json.loads(deploy.stdout)
    assert shown["mode"] == "disaggregated" and shown["replicas"] == 0
    split = _ready(platform, "pd-split")
    assert sorted(split) == ["decode", "prefill"]
    assert [len(split["prefill"]), len(split["decode"])] == [1, 1]
    for role, instances in split.items():
        assert [_health_role(i) for i in instances] == [role]

    auto = platform.cli("deploy", "pd-auto", "-m", "tiny", "--mode", "auto")
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "colocated 1/1, prefill 1/1, decode 1/1 ready" in auto.stdout
    mixed = _ready(platform, "pd-auto")
    assert {role: len(found) for role, found in mixed.items()} == {
        "colocated": 1,
        "prefill": 1,
        "decode": 1,
    }
    for role, instances in mixed.items():
        assert [_health_role(i) for i in instances] == [role]

    listed = platform.cli("instances", "list", "--deployment", "pd-auto", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(i["role"] for i in json.loads(listed.stdout)) == [
        "colocated",
        "decode",
        "prefill",
    ]

    # Scaling the decode group starts one decode instance; the prefill one is untouched.
    scaled = platform.cli("scale", "pd-split", "--decode", "2")
    assert scaled.returncode == 0, scaled.stderr
    after = _ready(platform, "pd-split")
    assert [i["id"] for i in after["prefill"]] == [i["id"] for i in split["prefill"]]
    assert len(after["decode"]) == 2
    assert split["decode"][0]["id"] in {i["id"] for i in after["decode"]}
    assert {_health_role(i) for i in after["decode"]} == {"decode"}
    events = platform.api("GET", "/api/v1/deployments/pd-split/scaling").json()["data"]
    manual = [e for e in events if e["kind"] == "manual"]
    assert [(e["role"], e["from_replicas"], e["to_replicas"]) for e in manual] == [("decode", 1, 2)]

    for name in ("pd-split", "pd-auto"):
        assert platform.cli("deployments", "delete", name).returncode == 0
