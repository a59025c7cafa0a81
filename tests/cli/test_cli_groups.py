"""Deployment modes and instance groups in the CLI: `deploy --mode --prefill --decode`, `scale`
and `deployments update` of any group, `deployments get/list` and `instances list` showing them."""

from __future__ import annotations

import json

import pytest
from cli_fakes import FakeApi, Invoke, deployment, error_reply, instance
from pydantic import BaseModel

from controlplane import wire
from deepflow_cli.commands import deployments
from deepflow_cli.errors import ExitCode


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deployments, "POLL_INTERVAL_S", 0.0)


def pd(
    prefill: tuple[int, int], decode: tuple[int, int], mode: str = "disaggregated"
) -> wire.DeploymentInfo:
    """A deployment with (ready, desired) prefill and decode groups."""
    info = deployment(replicas=0, ready=0, instances=0)
    info.mode = mode
    info.groups = [
        wire.GroupInfo(role="prefill", ready_replicas=prefill[0], replicas=prefill[1]),
        wire.GroupInfo(role="decode", ready_replicas=decode[0], replicas=decode[1]),
    ]
    info.instances = [
        instance().model_copy(update={"id": f"inst-{role}", "role": role})
        for role in ("prefill", "decode")
    ]
    return info


def test_deploy_disaggregated_waits_for_every_group(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/api/v1/deployments", pd((0, 2), (0, 1)))
    api.on(
        "GET",
        "/api/v1/deployments/demo",
        pd((2, 2), (0, 1)),  # prefill ready, decode not yet: keep waiting
        pd((2, 2), (1, 1)),
    )
    result = cli(
        "deploy", "demo", "-m", "tiny", "--mode", "disaggregated", "--prefill", "2", "--decode", "1"
    )
    assert result.exit_code == 0, result.output
    assert "prefill 2/2, decode 1/1 ready" in result.stdout
    assert api.bodies("POST", "/api/v1/deployments") == [
        {
            "name": "demo",
            "model": "tiny",
            "mode": "disaggregated",
            "prefill_replicas": 2,
            "decode_replicas": 1,
        }
    ]
    assert len(api.bodies("GET", "/api/v1/deployments/demo")) == 2


def test_deploy_auto_leaves_the_defaults_to_the_control_plane(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/api/v1/deployments", pd((0, 1), (0, 1), mode="auto"))
    result = cli("deploy", "demo", "-m", "tiny", "--mode", "auto", "--no-wait", "--json")
    assert result.exit_code == 0, result.output
    assert api.bodies("POST", "/api/v1/deployments") == [
        {"name": "demo", "model": "tiny", "mode": "auto"}
    ]
    data = json.loads(result.stdout)
    assert data["mode"] == "auto" and [g["role"] for g in data["groups"]] == ["prefill", "decode"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--prefill", "1"],  # colocated by default
        ["--mode", "colocated", "--decode", "2"],
        ["--mode", "disaggregated", "--replicas", "2"],
        ["--mode", "split"],
        ["--mode", "auto", "--prefill", "-1"],
    ],
)
def test_bad_combinations_are_usage_errors_before_sending(
    api: FakeApi, cli: Invoke, flags: list[str]
) -> None:
    result = cli("deploy", "demo", "-m", "tiny", *flags)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert api.bodies("POST", "/api/v1/deployments") == []


def test_group_flags_say_which_mode_they_need(api: FakeApi, cli: Invoke) -> None:
    result = cli("deploy", "demo", "-m", "tiny", "--prefill", "1")
    assert "--mode disaggregated or auto" in result.stderr
    result = cli("deploy", "demo", "-m", "tiny", "--mode", "disaggregated", "-r", "1")
    assert "no colocated instances" in result.stderr


def test_scale_any_subset_of_groups(api: FakeApi, cli: Invoke) -> None:
    api.on("PATCH", "/api/v1/deployments/demo", pd((1, 3), (1, 1)), pd((1, 3), (1, 2)))
    result = cli("scale", "demo", "--prefill", "3")
    assert result.exit_code == 0, result.output
    assert "scaled to prefill 3, decode 1" in result.stdout
    assert cli("scale", "demo", "--decode", "2", "--prefill", "3").exit_code == 0
    assert api.bodies("PATCH", "/api/v1/deployments/demo") == [
        {"prefill_replicas": 3},
        {"prefill_replicas": 3, "decode_replicas": 2},
    ]
    nothing = cli("scale", "demo")
    assert nothing.exit_code == ExitCode.USAGE and "--prefill" in nothing.stderr


def test_update_mode_and_groups_and_the_api_refusal(api: FakeApi, cli: Invoke) -> None:
    api.on("PATCH", "/api/v1/deployments/demo", pd((0, 1), (0, 2), mode="auto"))
    result = cli("deployments", "update", "demo", "--mode", "auto", "--decode", "2")
    assert result.exit_code == 0, result.output
    assert api.bodies("PATCH", "/api/v1/deployments/demo") == [
        {"mode": "auto", "decode_replicas": 2}
    ]
    message = "deployment 'demo' cannot go from colocated to disaggregated at once"
    api.on("PATCH", "/api/v1/deployments/other", error_reply(400, message))
    refused = cli("deployments", "update", "other", "--mode", "disaggregated")
    assert refused.exit_code == ExitCode.ERROR and message in refused.stderr


def test_get_and_list_show_mode_and_groups(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/deployments/demo", pd((1, 1), (0, 2)))
    api.on("GET", "/api/v1/deployments", [pd((1, 1), (0, 2)), deployment("plain", 2, 1)])
    shown = cli("deployments", "get", "demo")
    assert shown.exit_code == 0, shown.output
    assert "disaggregated" in shown.stdout and "prefill 1/1, decode 0/2" in shown.stdout
    assert "inst-prefill" in shown.stdout
    data = json.loads(cli("deployments", "get", "demo", "--json").stdout)
    assert data["mode"] == "disaggregated"
    assert data["groups"][1] == {"role": "decode", "replicas": 2, "ready_replicas": 0}
    listed = cli("deployments", "list")
    assert "MODE" in listed.stdout and "colocated" in listed.stdout
    assert [d["mode"] for d in json.loads(cli("deployments", "list", "--json").stdout)] == [
        "disaggregated",
        "colocated",
    ]


def test_instances_list_shows_each_role(api: FakeApi, cli: Invoke) -> None:
    instances: list[BaseModel] = list(pd((1, 1), (1, 1)).instances)
    api.on("GET", "/api/v1/instances", instances)
    result = cli("instances", "list")
    assert result.exit_code == 0, result.output
    assert "ROLE" in result.stdout
    assert "prefill" in result.stdout and "decode" in result.stdout
    data = json.loads(cli("instances", "list", "--json").stdout)
    assert [i["role"] for i in data] == ["prefill", "decode"]
