"""`deepflow chat` (one prompt or a conversation) and `deepflow invoke` (raw JSON, for scripts)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.prompt import Prompt

from controlplane.wire import ChatMessage
from deepflow_cli.client import DeepFlowClient
from deepflow_cli.context import connect
from deepflow_cli.errors import CliError
from deepflow_cli.output import render, stderr, stdout

app = typer.Typer()

EXIT_WORDS = {"exit", "quit", "/exit", "/quit"}


def _answer(
    client: DeepFlowClient,
    model: str,
    messages: list[ChatMessage],
    sampling: dict[str, Any],
    *,
    stream: bool,
    json_mode: bool,
) -> str:
    """Print the assistant's reply as it arrives and return its text."""
    if json_mode or not stream:
        completion = client.chat(model, messages, **sampling)
        text = (completion.choices[0].message.content or "") if completion.choices else ""
        if json_mode:
            render(completion, [], json_mode=True)
        else:
            sys.stdout.write(text + "\n")
        return text
    deltas = client.chat_stream(model, messages, **sampling)
    with stderr.status(f"waiting for {model}"):  # a replica may still be starting
        first = next(deltas, None)
    parts = []
    for delta in itertools.chain([first] if first is not None else [], deltas):
        sys.stdout.write(delta)
        sys.stdout.flush()
        parts.append(delta)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


@app.command()
def chat(
    ctx: typer.Context,
    deployment: Annotated[str, typer.Argument(help="Deployment to talk to.")],
    prompt: Annotated[
        str | None, typer.Argument(help="One prompt; leave out for a conversation.")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=1, help="Most tokens to generate.")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", "-t", help="Sampling temperature, 0 to 2.")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed.")] = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the reply at once.")] = (
        False
    ),
    json_mode: Annotated[
        bool, typer.Option("--json", help="Print the whole chat.completion object.")
    ] = False,
) -> None:
    """Chat with a deployment: stream the answer to one prompt, or hold a conversation."""
    sampling: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    messages = [ChatMessage(role="system", content=system)] if system else []
    with connect(ctx) as client:
        if prompt is not None:
            messages.append(ChatMessage(role="user", content=prompt))
            _answer(
                client, deployment, messages, sampling, stream=not no_stream, json_mode=json_mode
            )
            return
        stdout.print(f"chatting with [bold]{deployment}[/]; `exit` or Ctrl-D ends", style="dim")
        while True:
            try:
                line = Prompt.ask("[bold cyan]you[/]", console=stdout)
            except EOFError:
                stdout.print()
                return
            if line.strip().lower() in EXIT_WORDS:
                return
            if not line.strip():
                continue
            messages.append(ChatMessage(role="user", content=line))
            reply = _answer(
                client, deployment, messages, sampling, stream=not no_stream, json_mode=json_mode
            )
            messages.append(ChatMessage(role="assistant", content=reply))


def _read_body(data: str | None, file: Path | None) -> Any:
    if data is not None and file is not None:
        raise typer.BadParameter("give --data or --file, not both")
    if data is not None:
        raw, origin = data, "--data"
    elif file is not None and str(file) != "-":
        try:
            raw, origin = file.read_text(), str(file)
        except OSError as exc:
            raise CliError(f"cannot read {file}: {exc.strerror}") from exc
    elif file is None and sys.stdin.isatty():
        raise typer.BadParameter("give --data, --file or pipe the JSON body on stdin")
    else:
        raw, origin = sys.stdin.read(), "stdin"
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise CliError(f"{origin} is not valid JSON: {exc}") from exc


@app.command()
def invoke(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="API path, e.g. /v1/chat/completions.")],
    data: Annotated[str | None, typer.Option("--data", "-d", help="JSON body.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="File with the JSON body (- for stdin).")
    ] = None,
) -> None:
    """POST a JSON body (from --data, --file or stdin) to any path and print the JSON reply."""
    with connect(ctx) as client:
        body = _read_body(data, file)
        render(client.invoke(path, body), [], json_mode=True)
