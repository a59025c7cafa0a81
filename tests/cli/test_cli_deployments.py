"""`deepflow deploy` waits for readiness; `scale` and `deployments update` PATCH."""

from __future__ import annotations

import json

import pytest
from cli_fakes import FakeApi, Invoke, deployment, error_reply

from deepflow_cli.commands import deployments
from deepflow_cli.errors import ExitCode


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deployments, "POLL_INTERVAL_S", 0.0)


def test_deploy_waits_until_ready_replicas_equal_replicas(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/api/v1/deployments", deployment(ready=0))
    api.on(
        "GET",
        "/api/v1/deployments/demo",
        deployment(ready=0),
        deployment(ready=0),
        deployment(ready=1),
    )
    result = cli("deploy", "demo", "--model", "tiny")
    assert result.exit_code == 0, result.output
    assert "1/1 replicas ready" in result.stdout
    assert api.bodies("POST", "/api/v1/deployments") == [
        {"name": "demo", "model": "tiny", "replicas": 1}
    ]
    assert len(api.bodies("GET", "/api/v1/deployments/demo")) == 3


def test_deploy_times_out_with_a_clear_message(api: FakeApi, cli: Invoke) -> None:
    stuck = deployment(ready=0)
    stuck.instances[0].reason = "out of memory"
    api.on("POST", "/api/v1/deployments", stuck)
    api.on("GET", "/api/v1/deployments/demo", stuck)
    result = cli("deploy", "demo", "--model", "tiny", "--timeout", "0")
    assert result.exit_code == ExitCode.ERROR
    line = result.stderr.strip()
    assert "\n" not in line
    assert "0/1 replicas ready" in line and "out of memory" in line


def test_deploy_no_wait_returns_at_once(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/api/v1/deployments", deployment(replicas=2, ready=0))
    result = cli("deploy", "demo", "-m", "tiny", "-r", "2", "--no-wait", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["replicas"] == 2
    assert api.bodies("GET", "/api/v1/deployments/demo") == []


def test_deploy_of_unknown_model_fails_with_the_api_message(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/api/v1/deployments", error_reply(404, "model nope not found"))
    result = cli("deploy", "demo", "--model", "nope")
    assert result.exit_code == ExitCode.NOT_FOUND
    assert result.stderr.strip() == "error: model nope not found"


@pytest.mark.parametrize("command", [["scale"], ["deployments", "update"]])
def test_scale_patches_replicas(api: FakeApi, cli: Invoke, command: list[str]) -> None:
    api.on("PATCH", "/api/v1/deployments/demo", deployment(replicas=3, ready=1))
    result = cli(*command, "demo", "--replicas", "3")
    assert result.exit_code == 0, result.output
    assert "3 replicas" in result.stdout
    assert api.bodies("PATCH", "/api/v1/deployments/demo") == [{"replicas": 3}]


def test_scale_needs_replicas(cli: Invoke) -> None:
    assert cli("scale", "demo").exit_code == ExitCode.USAGE


def test_delete(api: FakeApi, cli: Invoke) -> None:
    api.on("DELETE", "/api/v1/deployments/demo", deployment())
    result = cli("deployments", "delete", "demo")
    assert result.exit_code == 0 and "deleted deployment demo" in result.stdout
