"""List/get/--json output and error lines for the read-only commands."""

from __future__ import annotations

import json

import pytest
from cli_fakes import (
    FakeApi,
    Invoke,
    deployment,
    error_reply,
    instance,
    model,
    node,
    platform,
    request_record,
)
from pydantic import BaseModel

from deepflow_cli.errors import ExitCode


def test_models_list_table_and_json(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/models", [model("tiny"), model("other", "/models/other")])
    table = cli("models", "list")
    assert table.exit_code == 0, table.output
    assert "tiny" in table.stdout and "other" in table.stdout and "NAME" in table.stdout

    as_json = cli("models", "list", "--json")
    data = json.loads(as_json.stdout)
    assert [m["name"] for m in data] == ["tiny", "other"]
    assert set(data[0]) >= {"name", "path", "source", "created_at"}


def test_empty_list_says_so(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/deployments", [])
    result = cli("deployments", "list")
    assert result.exit_code == 0
    assert "no deployments" in result.stdout
    assert json.loads(cli("deployments", "list", "--json").stdout) == []


def test_deployment_get_shows_ready_and_instances(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/deployments/demo", deployment(replicas=2, ready=1))
    result = cli("deployments", "get", "demo")
    assert result.exit_code == 0, result.output
    assert "1/2" in result.stdout and "inst-1" in result.stdout

    data = json.loads(cli("deployments", "get", "demo", "--json").stdout)
    assert data["name"] == "demo" and data["ready_replicas"] == 1
    assert data["instances"][0]["id"] == "inst-1"


def test_status_json_includes_url_and_table_lists_nodes(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/status", platform())
    data = json.loads(cli("status", "--json").stdout)
    assert data["url"] == "http://127.0.0.1:8480"
    assert data["nodes"][0]["state"] == "ready"

    table = cli("status")
    assert table.exit_code == 0
    assert "local" in table.stdout and "demo" in table.stdout and "1/1" in table.stdout


def test_url_option_reaches_the_client(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/status", platform())
    assert cli("--url", "http://other:1234/", "status").exit_code == 0
    assert api.urls == ["http://other:1234"]


def test_api_error_prints_one_line_and_exits_1(api: FakeApi, cli: Invoke) -> None:
    api.on("DELETE", "/api/v1/models/tiny", error_reply(409, "model tiny is used by demo"))
    result = cli("models", "delete", "tiny")
    assert result.exit_code == ExitCode.ERROR
    assert result.stderr.strip() == "error: model tiny is used by demo"
    assert result.stdout == ""


def test_not_found_exits_4(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/requests/nope", error_reply(404, "request nope not found"))
    result = cli("requests", "get", "nope")
    assert result.exit_code == ExitCode.NOT_FOUND
    assert result.stderr.strip() == "error: request nope not found"


def test_unreachable_exits_3(api: FakeApi, cli: Invoke) -> None:
    api.unreachable = True
    result = cli("nodes", "list")
    assert result.exit_code == ExitCode.UNREACHABLE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "deepflow up" in lines[0]


def test_requests_list_passes_filters(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/requests", [request_record("failed"), request_record("finished")])
    data = json.loads(cli("requests", "list", "--state", "failed", "--limit", "5", "--json").stdout)
    assert [r["state"] for r in data] == ["failed"]  # narrowed here if the server ignores it
    sent = api.seen[-1].url.params
    assert sent["state"] == "failed" and sent["limit"] == "5"


def test_request_get_shows_jobs_tasks_and_events_in_order(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/requests/req-1", request_record())
    result = cli("requests", "get", "req-1")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "job-1" in out and "task-1" in out
    assert "queued -> running" in out
    # one timeline, oldest first: request queued, job queued, task running, request running
    order = [
        out.index(s) for s in ("request req-1", "job job-1", "task task-1", "queued -> running")
    ]
    assert order == sorted(order)

    data = json.loads(cli("requests", "get", "req-1", "--json").stdout)
    assert data["jobs"][0]["tasks"][0]["id"] == "task-1"
    assert len(data["events"]) == 2


@pytest.mark.parametrize(
    ("noun", "path", "reply", "key"),
    [
        ("jobs", "/api/v1/jobs", [request_record().jobs[0]], "request_id"),
        ("tasks", "/api/v1/tasks", [request_record().jobs[0].tasks[0]], "job_id"),
        ("nodes", "/api/v1/nodes", [node()], "resources"),
        ("instances", "/api/v1/instances", [instance()], "deployment"),
    ],
)
def test_every_record_lists_as_json(
    api: FakeApi, cli: Invoke, noun: str, path: str, reply: list[BaseModel], key: str
) -> None:
    api.on("GET", path, reply)
    result = cli(noun, "list", "--json")
    assert result.exit_code == 0, result.output
    (item,) = json.loads(result.stdout)
    assert key in item
    assert cli(noun, "list").exit_code == 0


def test_instance_and_node_get(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/api/v1/instances/inst-1", instance())
    api.on("GET", "/api/v1/nodes/node-1", node())
    assert "4242" in cli("instances", "get", "inst-1").stdout
    assert json.loads(cli("nodes", "get", "node-1", "--json").stdout)["name"] == "local"
