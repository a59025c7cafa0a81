"""`deepflow instances get/list` show how an instance started: its path and its five stages."""

from __future__ import annotations

import json

from cli_fakes import FakeApi, Invoke, instance

from controlplane import wire


def started(path: str = "fork") -> wire.InstanceInfo:
    return instance().model_copy(
        update={
            "launch_path": path,
            "fallbacks": [] if path == "fork" else ["fork: no zygote of this model"],
            "startup": wire.InstanceStartup(
                path=path,
                pod_ready_s=0.012,
                runtime_preload_s=0.0,
                weight_load_s=0.034,
                post_load_s=0.05,
                weights_source="zygote",
            ),
            "registration_s": 0.104,
        }
    )


def rows(stdout: str) -> dict[str, str]:
    """A `get` table as {field: value}."""
    found = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("│", "|").split("|") if c.strip()]
        if len(cells) == 2:
            found[cells[0]] = cells[1]
    return found


def test_get_shows_path_and_stages(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/instances/inst-1", started())
    result = cli("instances", "get", "inst-1")
    assert result.exit_code == 0, result.output
    shown = rows(result.stdout)
    assert shown["path"] == "fork" and shown["weights from"] == "zygote"
    assert shown["passed over"] == "-"
    assert shown["pod ready"] == "0.012 s" and shown["runtime pre-load"] == "0.000 s"
    assert shown["weight load"] == "0.034 s" and shown["post-load"] == "0.050 s"
    assert shown["registration"] == "0.104 s" and shown["request to routed"] == "0.200 s"

    data = json.loads(cli("instances", "get", "inst-1", "--json").stdout)
    assert data["launch_path"] == "fork" and data["registration_s"] == 0.104
    assert data["startup"]["weight_load_s"] == 0.034


def test_get_of_an_instance_without_stages_shows_dashes(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/instances/inst-1", instance("starting"))
    result = cli("instances", "get", "inst-1")
    assert result.exit_code == 0, result.output
    shown = rows(result.stdout)
    assert shown["path"] == shown["registration"] == shown["weight load"] == "-"


def test_list_has_a_path_column(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/instances", [started("warm_pod")])
    result = cli("instances", "list")
    assert result.exit_code == 0, result.output
    assert "PATH" in result.stdout and "warm_pod" in result.stdout
    data = json.loads(cli("instances", "list", "--json").stdout)
    assert data[0]["launch_path"] == "warm_pod"
    assert data[0]["fallbacks"] == ["fork: no zygote of this model"]
