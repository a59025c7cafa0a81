"""DeepFlowClient against an in-process transport: parsing, errors, exit codes, URL resolution."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from cli_fakes import FakeApi, deployment, error_reply, model, sse_reply

from controlplane.wire import ChatMessage
from deepflow_cli.client import DeepFlowClient
from deepflow_cli.errors import CliError, ExitCode
from deepflow_cli.home import DEFAULT_URL, RunInfo, resolve_url

USER = [ChatMessage(role="user", content="hi")]


def client_for(fake: FakeApi) -> DeepFlowClient:
    return DeepFlowClient("http://cp.test/", transport=fake.transport())


def test_lists_unwrap_the_envelope_and_parse_wire_models() -> None:
    fake = FakeApi()
    fake.on("GET", "/api/v1/models", [model("a"), model("b")])
    names = [m.name for m in client_for(fake).list_models()]
    assert names == ["a", "b"]


def test_create_sends_only_the_given_fields() -> None:
    fake = FakeApi()
    fake.on("POST", "/api/v1/deployments", deployment())
    fake.on("PATCH", "/api/v1/deployments/demo", deployment(replicas=3))
    client = client_for(fake)
    client.create_deployment("demo", "tiny", 2)
    client.update_deployment("demo", replicas=3)
    assert fake.bodies("POST", "/api/v1/deployments") == [
        {"name": "demo", "model": "tiny", "replicas": 2}
    ]
    assert fake.bodies("PATCH", "/api/v1/deployments/demo") == [{"replicas": 3}]


def test_bad_option_is_refused_before_sending() -> None:
    fake = FakeApi()
    with pytest.raises(CliError, match="name"):
        client_for(fake).create_deployment("Bad Name!", "tiny")
    assert fake.seen == []


def test_error_body_gives_its_message_and_exit_code_1() -> None:
    fake = FakeApi()
    fake.on("POST", "/api/v1/models", error_reply(409, "model tiny already exists"))
    with pytest.raises(CliError) as caught:
        client_for(fake).create_model("tiny", "/m")
    assert caught.value.message == "model tiny already exists"
    assert caught.value.exit_code == ExitCode.ERROR
    assert caught.value.status == 409


def test_404_exits_4_and_a_non_json_error_still_reads_well() -> None:
    fake = FakeApi()
    fake.on("GET", "/api/v1/deployments/gone", error_reply(404, "deployment gone not found"))
    fake.on("GET", "/api/v1/status", httpx.Response(502, text="bad gateway"))
    with pytest.raises(CliError) as caught:
        client_for(fake).get_deployment("gone")
    assert caught.value.exit_code == ExitCode.NOT_FOUND
    with pytest.raises(CliError, match="HTTP 502 Bad Gateway: bad gateway"):
        client_for(fake).status()


def test_connection_refused_exits_3_and_points_at_deepflow_up() -> None:
    fake = FakeApi(unreachable=True)
    with pytest.raises(CliError) as caught:
        client_for(fake).status()
    assert caught.value.exit_code == ExitCode.UNREACHABLE
    assert "http://cp.test" in caught.value.message
    assert "deepflow up" in caught.value.message


def test_chat_stream_yields_deltas_until_done() -> None:
    fake = FakeApi()
    fake.on("POST", "/v1/chat/completions", sse_reply(["Hel", "lo", "!"]))
    deltas = list(client_for(fake).chat_stream("demo", USER, max_tokens=8))
    assert deltas == ["Hel", "lo", "!"]
    (body,) = fake.bodies("POST", "/v1/chat/completions")
    assert body == {
        "model": "demo",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 8,
    }


def test_chat_stream_ignores_what_follows_done_and_reports_error_events() -> None:
    fake = FakeApi()
    text = (
        ": keep-alive\n\n"
        'data: {"id":"c","created":1,"model":"m","choices":'
        '[{"index":0,"delta":{"content":"ok"}}]}\n\n'
        "data: [DONE]\n\ndata: not json\n\n"
    )
    fake.on("POST", "/v1/chat/completions", httpx.Response(200, text=text))
    assert list(client_for(fake).chat_stream("demo", USER)) == ["ok"]

    error = {"error": {"message": "engine failed", "type": "server_error"}}
    fake.on(
        "POST", "/v1/chat/completions", httpx.Response(200, text=f"data: {json.dumps(error)}\n\n")
    )
    with pytest.raises(CliError, match="engine failed"):
        list(client_for(fake).chat_stream("demo", USER))


def test_chat_stream_error_reply_before_streaming() -> None:
    fake = FakeApi()
    fake.on("POST", "/v1/chat/completions", error_reply(404, "deployment nope not found"))
    with pytest.raises(CliError) as caught:
        list(client_for(fake).chat_stream("nope", USER))
    assert caught.value.exit_code == ExitCode.NOT_FOUND


def test_invoke_posts_raw_json() -> None:
    fake = FakeApi()
    fake.on("POST", "/v1/anything", httpx.Response(200, json={"ok": True}))
    assert client_for(fake).invoke("v1/anything", {"x": 1}) == {"ok": True}
    assert fake.bodies("POST", "/v1/anything") == [{"x": 1}]


def test_url_resolution_order(home: Path) -> None:
    assert resolve_url(None) == DEFAULT_URL
    RunInfo(url="http://127.0.0.1:9999", pid=1).save()
    assert resolve_url(None) == "http://127.0.0.1:9999"
    assert resolve_url("http://elsewhere:1/") == "http://elsewhere:1"
