"""`deepflow files ...`: upload, list, inspect, download and delete files (OpenAI's files API)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from controlplane.wire import FileObject
from deepflow_cli.client import DeepFlowClient
from deepflow_cli.context import connect
from deepflow_cli.errors import CliError
from deepflow_cli.options import JsonOpt
from deepflow_cli.output import field, render, say, size, stage_progress, stderr, when

app = typer.Typer(help="Upload, list, download and delete files.", no_args_is_help=True)

# Smaller files go up in a blink; a bar would only flicker.
PROGRESS_MIN_BYTES = 4 * 1024 * 1024

FILE = [
    field("id"),
    field("filename"),
    field("purpose"),
    field("bytes", "size", size),
    field("status"),
    field("created_at", "created", when),
    field("status_details", "details"),
]
FILE_LIST = FILE[:6]

IdArg = Annotated[str, typer.Argument(help="File id (file-...).")]
PurposeOpt = Annotated[str, typer.Option("--purpose", help="What the file is for.")]


def upload_file(client: DeepFlowClient, path: Path, purpose: str) -> FileObject:
    """Upload `path`, with a progress bar on stderr for a large file."""
    if not path.is_file():
        raise CliError(f"no file at {path}")
    if path.stat().st_size < PROGRESS_MIN_BYTES:
        with stderr.status(f"uploading {path.name}"):
            return client.upload_file(path, purpose)
    with stage_progress() as progress:
        stage = f"uploading {path.name}"
        return client.upload_file(path, purpose, lambda done, total: progress(stage, done, total))


@app.command()
def upload(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="Local file, e.g. chat-format JSONL.")],
    purpose: PurposeOpt = "fine-tune",
    json_mode: JsonOpt = False,
) -> None:
    """Upload a file; fine-tune files are checked line by line on the way in."""
    with connect(ctx) as client:
        file = upload_file(client, path.expanduser(), purpose)
    if json_mode:
        render(file, FILE, json_mode)
    else:
        say(f"uploaded {path.name} as {file.id} ({size(file.bytes)})", style="green")


@app.command("list")
def list_(
    ctx: typer.Context,
    purpose: Annotated[str | None, typer.Option("--purpose", help="Only this purpose.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Show at most this many.")] = (
        None
    ),
    json_mode: JsonOpt = False,
) -> None:
    """List uploaded files, newest first."""
    with connect(ctx) as client:
        files = client.list_files(purpose=purpose, limit=limit)
    render(files, FILE_LIST, json_mode, title="files")


@app.command()
def get(ctx: typer.Context, file_id: IdArg, json_mode: JsonOpt = False) -> None:
    """Show one file."""
    with connect(ctx) as client:
        file = client.get_file(file_id)
    render(file, FILE, json_mode)


@app.command()
def delete(ctx: typer.Context, file_id: IdArg, json_mode: JsonOpt = False) -> None:
    """Delete a file."""
    with connect(ctx) as client:
        deleted = client.delete_file(file_id)
        if json_mode:
            render(deleted, [], json_mode)
        elif not deleted.deleted:
            raise CliError(f"file {deleted.id} was not deleted")
        else:
            say(f"deleted file {deleted.id}")


@app.command()
def content(
    ctx: typer.Context,
    file_id: IdArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")
    ] = None,
) -> None:
    """Download a file's content (to stdout, or to a file with -o)."""
    with connect(ctx) as client:
        if output is None:
            sink = typer.get_binary_stream("stdout")
            for chunk in client.file_content(file_id):
                sink.write(chunk)
            sink.flush()
            return
        written = _download(client, file_id, output.expanduser())
    say(f"wrote {size(written)} to {output}", style="green")


def _download(client: DeepFlowClient, file_id: str, dest: Path) -> int:
    """Write to a temporary neighbour and rename, so `dest` is never left half written."""
    partial = dest.with_name(dest.name + ".part")
    written = 0
    try:
        with partial.open("wb") as sink:
            for chunk in client.file_content(file_id):
                sink.write(chunk)
                written += len(chunk)
        os.replace(partial, dest)
    except OSError as exc:
        raise CliError(f"cannot write {dest}: {exc.strerror}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return written
