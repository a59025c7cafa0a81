"""`deepflow chat` streams text; `deepflow invoke` posts raw JSON."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from cli_fakes import NOW, FakeApi, Invoke, error_reply, sse_reply

from controlplane import wire
from deepflow_cli.errors import ExitCode


def completion(text: str) -> wire.ChatCompletion:
    return wire.ChatCompletion(
        id="chatcmpl-1",
        created=int(NOW),
        model="demo",
        choices=[
            wire.ChatChoice(
                index=0, message=wire.AssistantMessage(content=text), finish_reason="stop"
            )
        ],
        usage=wire.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
    )


def test_chat_streams_the_answer(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/v1/chat/completions", sse_reply(["Hello", ", ", "world"]))
    result = cli("chat", "demo", "hi", "--system", "be brief", "--max-tokens", "16", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello, world\n"
    (body,) = api.bodies("POST", "/v1/chat/completions")
    assert body["stream"] is True and body["max_tokens"] == 16 and body["seed"] == 7
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]


def test_chat_no_stream_and_json(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/v1/chat/completions", completion("Hi there"))
    assert cli("chat", "demo", "hi", "--no-stream").stdout == "Hi there\n"
    data = json.loads(cli("chat", "demo", "hi", "--json").stdout)
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == "Hi there"
    assert all(body["stream"] is False for body in api.bodies("POST", "/v1/chat/completions"))


def test_chat_with_a_bad_option_is_one_line(api: FakeApi, cli: Invoke) -> None:
    result = cli("chat", "demo", "hi", "--temperature", "5")
    assert result.exit_code == ExitCode.ERROR
    assert result.stderr.strip().startswith("error: temperature")
    assert api.seen == []


def test_chat_with_an_unknown_deployment(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/v1/chat/completions", error_reply(404, "deployment nope not found"))
    result = cli("chat", "nope", "hi")
    assert result.exit_code == ExitCode.NOT_FOUND
    assert result.stderr.strip() == "error: deployment nope not found"


def test_interactive_chat_keeps_the_history(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/v1/chat/completions", sse_reply(["one"]), sse_reply(["two"]))
    result = cli("chat", "demo", input="first\nsecond\nexit\n")
    assert result.exit_code == 0, result.output
    assert "one\n" in result.stdout and "two\n" in result.stdout
    first, second = api.bodies("POST", "/v1/chat/completions")
    assert [m["content"] for m in first["messages"]] == ["first"]
    assert [(m["role"], m["content"]) for m in second["messages"]] == [
        ("user", "first"),
        ("assistant", "one"),
        ("user", "second"),
    ]


def test_interactive_chat_ends_on_eof(api: FakeApi, cli: Invoke) -> None:
    result = cli("chat", "demo", input="")
    assert result.exit_code == 0, result.output
    assert api.seen == []


def test_invoke_with_data_file_and_stdin(api: FakeApi, cli: Invoke, tmp_path: Path) -> None:
    api.on("POST", "/v1/chat/completions", completion("ok"))
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    by_data = cli("invoke", "/v1/chat/completions", "--data", json.dumps(body))
    assert by_data.exit_code == 0, by_data.output
    assert json.loads(by_data.stdout)["choices"][0]["message"]["content"] == "ok"

    path = tmp_path / "body.json"
    path.write_text(json.dumps(body))
    assert cli("invoke", "/v1/chat/completions", "--file", str(path)).exit_code == 0
    assert cli("invoke", "/v1/chat/completions", input=json.dumps(body)).exit_code == 0
    assert api.bodies("POST", "/v1/chat/completions") == [body, body, body]


def test_invoke_errors(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", "/v1/chat/completions", error_reply(400, "messages: field required"))
    refused = cli("invoke", "/v1/chat/completions", "--data", "{}")
    assert refused.exit_code == ExitCode.ERROR
    assert refused.stderr.strip() == "error: messages: field required"

    api.on("POST", "/v1/missing", error_reply(404, "no such route"))
    missing = cli("invoke", "/v1/missing", "--data", "{}")
    assert missing.exit_code == ExitCode.ERROR  # for scripts: any refusal is 1

    bad_json = cli("invoke", "/v1/x", "--data", "{nope")
    assert bad_json.exit_code == ExitCode.ERROR
    assert "--data is not valid JSON" in bad_json.stderr

    both = cli("invoke", "/v1/x", "--data", "{}", "--file", "x.json")
    assert both.exit_code == ExitCode.USAGE

    api.on("POST", "/v1/text", httpx.Response(200, text="plain"))
    assert cli("invoke", "/v1/text", "--data", "{}").exit_code == ExitCode.ERROR
