"""Mode semi-pd in the CLI: `deploy --mode semi-pd --slo-ttft-ms --slo-tpot-ms [--semi-pd-split]
[--semi-pd-static]`, `deployments update` of the mode and the settings, the usage errors found
before sending, and `deployments get/list` showing the settings."""

from __future__ import annotations

import json

import pytest
from cli_fakes import FakeApi, Invoke, deployment, error_reply

from controlplane import wire
from deepflow_cli.commands import deployments
from deepflow_cli.errors import ExitCode


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deployments, "POLL_INTERVAL_S", 0.0)


def semi(ready: int = 1, replicas: int = 1, split: int | None = None) -> wire.DeploymentInfo:
    info = deployment(replicas=replicas, ready=ready, instances=ready)
    info.mode = "semi-pd"
    info.groups = [wire.GroupInfo(role="colocated", replicas=replicas, ready_replicas=ready)]
    info.semi_pd = wire.SemiPDConfig(slo_ttft_ms=300, slo_tpot_ms=50, split=split)
    for inst in info.instances:
        inst.semi_pd = info.semi_pd
    return info


def test_deploy_semi_pd_sends_the_settings_and_waits(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/api/v1/deployments", semi(ready=0, replicas=2))
    api.on("GET", "/api/v1/deployments/demo", semi(1, 2), semi(2, 2))
    result = cli(
        "deploy", "demo", "-m", "tiny", "--mode", "semi-pd", "--slo-ttft-ms", "300",
        "--slo-tpot-ms", "50", "--replicas", "2", "--semi-pd-split", "40", "--semi-pd-static",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "deployment demo of tiny: 2/2 replicas ready" in result.stdout
    assert api.bodies("POST", "/api/v1/deployments") == [
        {
            "name": "demo",
            "model": "tiny",
            "mode": "semi-pd",
            "replicas": 2,
            "slo_ttft_ms": 300.0,
            "slo_tpot_ms": 50.0,
            "semi_pd_split": 40,
            "semi_pd_static": True,
        }
    ]


def test_deploy_semi_pd_leaves_the_defaults_to_the_control_plane(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/api/v1/deployments", semi(ready=0))
    result = cli(
        "deploy", "demo", "-m", "tiny", "--mode", "semi-pd", "--slo-ttft-ms", "300",
        "--slo-tpot-ms", "50", "--no-wait", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert api.bodies("POST", "/api/v1/deployments") == [
        {
            "name": "demo",
            "model": "tiny",
            "mode": "semi-pd",
            "slo_ttft_ms": 300.0,
            "slo_tpot_ms": 50.0,
        }
    ]
    data = json.loads(result.stdout)
    assert data["mode"] == "semi-pd"
    assert data["semi_pd"] == {
        "slo_ttft_ms": 300.0,
        "slo_tpot_ms": 50.0,
        "split": None,
        "static": False,
    }


SLOS = ["--slo-ttft-ms", "300", "--slo-tpot-ms", "50"]


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--mode", "semi-pd"], "needs both SLOs"),
        (["--mode", "semi-pd", "--slo-ttft-ms", "300"], "--slo-tpot-ms missing"),
        (["--mode", "semi-pd", "--slo-ttft-ms", "0", "--slo-tpot-ms", "5"], "positive"),
        (["--mode", "semi-pd", "--slo-ttft-ms", "inf", "--slo-tpot-ms", "5"], "positive"),
        (["--mode", "semi-pd", "--slo-ttft-ms", "5", "--slo-tpot-ms", "-1"], "positive"),
        (["--mode", "semi-pd", *SLOS, "--prefill", "1"], "own prefill and decode workers"),
        (["--mode", "semi-pd", *SLOS, "--decode", "1"], "own prefill and decode workers"),
        (["--mode", "semi-pd", *SLOS, "--semi-pd-split", "100"], "--semi-pd-split"),
        (SLOS, "mode colocated runs none"),
        (["--semi-pd-static"], "--mode semi-pd"),
        (["--mode", "auto", "--semi-pd-split", "30"], "mode auto runs none"),
    ],
)
def test_bad_semi_pd_flags_are_usage_errors_before_sending(
    api: FakeApi, cli: Invoke, flags: list[str], said: str
) -> None:
    result = cli("deploy", "demo", "-m", "tiny", *flags)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert said in result.output
    assert api.bodies("POST", "/api/v1/deployments") == []


def test_update_to_semi_pd_and_its_settings(api: FakeApi, cli: Invoke) -> None:
    api.on("PATCH", "/api/v1/deployments/demo", semi())
    result = cli("deployments", "update", "demo", "--mode", "semi-pd", *SLOS)
    assert result.exit_code == 0, result.output
    assert "scaled to 1 replicas" in result.stdout
    # Without --mode the control plane knows whether the deployment is semi-pd.
    assert cli("deployments", "update", "demo", "--slo-ttft-ms", "200").exit_code == 0
    assert cli("deployments", "update", "demo", "--semi-pd-dynamic").exit_code == 0
    assert api.bodies("PATCH", "/api/v1/deployments/demo") == [
        {"mode": "semi-pd", "slo_ttft_ms": 300.0, "slo_tpot_ms": 50.0},
        {"slo_ttft_ms": 200.0},
        {"semi_pd_static": False},
    ]
    for flags in (
        ["--mode", "colocated", "--slo-tpot-ms", "5"],
        ["--mode", "semi-pd", "--prefill", "1"],
        ["--slo-tpot-ms", "0"],
    ):
        refused = cli("deployments", "update", "demo", *flags)
        assert refused.exit_code == ExitCode.USAGE, (flags, refused.output)
    assert len(api.bodies("PATCH", "/api/v1/deployments/demo")) == 3
    message = "slo_ttft_ms configure semi-PD instances, which only mode semi-pd runs"
    api.on("PATCH", "/api/v1/deployments/plain", error_reply(400, message))
    refused = cli("deployments", "update", "plain", "--slo-ttft-ms", "100")
    assert refused.exit_code == ExitCode.ERROR and message in refused.stderr


def test_get_and_list_show_the_semi_pd_settings(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/deployments/demo", semi(split=40))
    api.on("GET", "/api/v1/deployments", [semi(), deployment("plain", 2, 1)])
    shown = cli("deployments", "get", "demo")
    assert shown.exit_code == 0, shown.output
    assert "semi-pd" in shown.stdout and "1/1" in shown.stdout
    assert "TTFT 300 ms, TPOT 50 ms, split 40%, dynamic" in shown.stdout
    data = json.loads(cli("deployments", "get", "demo", "--json").stdout)
    assert data["semi_pd"] == {
        "slo_ttft_ms": 300.0,
        "slo_tpot_ms": 50.0,
        "split": 40,
        "static": False,
    }
    assert data["instances"][0]["semi_pd"] == data["semi_pd"]
    listed = cli("deployments", "list")
    assert listed.exit_code == 0, listed.output
    assert "semi-pd" in listed.stdout and "colocated" in listed.stdout
    assert [
        d["semi_pd"] is not None for d in json.loads(cli("deployments", "list", "--json").stdout)
    ] == [
        True,
        False,
    ]
