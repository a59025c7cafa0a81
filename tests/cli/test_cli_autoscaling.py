"""Autoscaling flags of `deepflow deploy` and `deployments update`, and `deployments scaling`."""

from __future__ import annotations

import json

import pytest
from cli_fakes import NOW, FakeApi, Invoke, deployment, error_reply

from controlplane import wire
from deepflow_cli.commands import deployments
from deepflow_cli.errors import ExitCode


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deployments, "POLL_INTERVAL_S", 0.0)


def autoscaled(replicas: int = 0, ready: int = 0) -> wire.DeploymentInfo:
    info = deployment(replicas=replicas, ready=ready, instances=ready)
    info.autoscaling = wire.AutoscalingInfo(
        min_replicas=0,
        max_replicas=4,
        target_concurrency=2,
        upscale_delay_s=30,
        downscale_delay_s=600,
        scale_to_zero_after_s=60,
    )
    return info


def test_deploy_with_autoscaling_flags(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/api/v1/deployments", autoscaled())
    api.on("GET", "/api/v1/deployments/demo", autoscaled())
    result = cli(
        "deploy",
        "demo",
        "-m",
        "tiny",
        "--min-replicas",
        "0",
        "--max-replicas",
        "4",
        "--target-concurrency",
        "2.5",
        "--upscale-delay",
        "10",
        "--downscale-delay",
        "120",
        "--scale-to-zero-after",
        "30",
    )
    assert result.exit_code == 0, result.output
    assert api.bodies("POST", "/api/v1/deployments") == [
        {
            "name": "demo",
            "model": "tiny",
            "min_replicas": 0,
            "max_replicas": 4,
            "target_concurrency": 2.5,
            "upscale_delay_s": 10.0,
            "downscale_delay_s": 120.0,
            "scale_to_zero_after_s": 30.0,
        }
    ]
    assert "0/0 replicas ready" in result.stdout


def test_deploy_with_replicas_only_stays_fixed(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/api/v1/deployments", deployment(replicas=2, ready=0))
    result = cli("deploy", "demo", "-m", "tiny", "-r", "2", "--no-wait")
    assert result.exit_code == 0, result.output
    assert api.bodies("POST", "/api/v1/deployments") == [
        {"name": "demo", "model": "tiny", "replicas": 2}
    ]


def test_bad_flag_is_refused_before_sending(api: FakeApi, cli: Invoke) -> None:
    result = cli("deploy", "demo", "-m", "tiny", "--max-replicas", "0")
    assert result.exit_code == ExitCode.USAGE
    assert api.bodies("POST", "/api/v1/deployments") == []


def test_update_sets_bounds_and_turns_autoscaling_off(api: FakeApi, cli: Invoke) -> None:
    api.on("PATCH", "/api/v1/deployments/demo", autoscaled(replicas=1, ready=1))
    result = cli("deployments", "update", "demo", "--max-replicas", "4", "--min-replicas", "1")
    assert result.exit_code == 0, result.output
    assert "autoscaling 0-4" in result.stdout
    cli("deployments", "update", "demo", "--no-autoscale", "--json")
    assert api.bodies("PATCH", "/api/v1/deployments/demo") == [
        {"min_replicas": 1, "max_replicas": 4},
        {"autoscaling": False},
    ]


def test_update_with_nothing_to_change_fails(api: FakeApi, cli: Invoke) -> None:
    result = cli("deployments", "update", "demo")
    assert result.exit_code != 0 and "nothing to change" in result.stderr
    assert api.bodies("PATCH", "/api/v1/deployments/demo") == []


def test_scale_out_of_bounds_shows_the_api_error(api: FakeApi, cli: Invoke) -> None:
    message = "deployment 'demo' autoscales between 0 and 4 replicas; 6 is outside them"
    api.on("PATCH", "/api/v1/deployments/demo", error_reply(400, message))
    result = cli("scale", "demo", "--replicas", "6")
    assert result.exit_code == ExitCode.ERROR
    assert message in result.stderr


def test_scaling_events(api: FakeApi, cli: Invoke) -> None:
    event = wire.ScalingEventInfo(
        id=1,
        deployment="demo",
        kind="autoscale",
        from_replicas=0,
        to_replicas=1,
        reason="scale from zero: 3 requests waiting",
        inputs={"load": 3, "waiting": 3},
        at=NOW,
    )
    api.on("GET", "/api/v1/deployments/demo/scaling", [event])
    result = cli("deployments", "scaling", "demo")
    assert result.exit_code == 0, result.output
    assert "scale from zero" in result.stdout and "0 -> 1" in result.stdout
    as_json = cli("deployments", "scaling", "demo", "--json", "--limit", "5")
    assert json.loads(as_json.stdout)[0]["inputs"]["waiting"] == 3
    assert api.seen[-1].url.params["limit"] == "5"
