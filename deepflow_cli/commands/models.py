"""`deepflow models ...`: write model folders locally with the model store, register them.

`dataplane.modelstore` is imported inside the commands that need it, so `deepflow --help` and
every other command start without loading it.
"""

from __future__ import annotations

import re
import shutil
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from deepflow_cli import columns
from deepflow_cli.client import DeepFlowClient
from deepflow_cli.context import connect
from deepflow_cli.errors import CliError
from deepflow_cli.home import models_dir
from deepflow_cli.options import JsonOpt
from deepflow_cli.output import render, say, stage_progress

app = typer.Typer(help="Pull, import, create and list models.", no_args_is_help=True)


class Preset(StrEnum):
    tiny = "tiny"
    small = "small"
    smollm2_135m = "smollm2-135m"
    llama_1b = "llama-1b"
    llama_8b = "llama-8b"


NameArg = Annotated[str, typer.Argument(help="Registered model name.")]
LocalNameOpt = Annotated[
    str | None, typer.Option("--name", "-n", help="Name to register it under.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the local folder if it exists.")]


def sanitize(raw: str) -> str:
    """A registrable model name from a source or folder name (`wire.NAME_PATTERN`)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("._-")[:64].strip("._-")
    if not name:
        raise CliError(f"cannot make a model name from {raw!r}; pass --name")
    return name


def _register(client: DeepFlowClient, name: str, path: Path, source: str) -> None:
    try:
        model = client.create_model(name, str(path), source)
    except CliError as exc:
        if exc.status != 409:
            raise
        existing = client.get_model(name)
        if existing.path != str(path):
            raise CliError(
                f"a model named {name} is already registered with path {existing.path}; "
                f"pick another --name or run `deepflow models delete {name}` first"
            ) from exc
        say(f"model {name} is already registered ({existing.path})")
        return
    say(f"registered model {model.name} ({model.path})", style="green")


def _prepare_destination(dest: Path, force: bool) -> bool:
    """Make way for a new folder at `dest`; True when a valid one is already there to reuse."""
    from dataplane import modelstore

    if not dest.exists():
        return False
    if force:
        shutil.rmtree(dest)
        return False
    try:
        modelstore.inspect_folder(dest)
    except modelstore.ModelStoreError as exc:
        raise CliError(f"{dest} exists but is not a usable model ({exc}); pass --force") from exc
    return True


@app.command()
def pull(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="A known source, e.g. smollm2-135m-instruct.")],
    name: LocalNameOpt = None,
    force: ForceOpt = False,
) -> None:
    """Convert a known source into $DEEPFLOW_HOME/models/<name> and register it."""
    from dataplane import modelstore

    with connect(ctx) as client:
        local_name = name or sanitize(source)
        dest = models_dir() / local_name
        if _prepare_destination(dest, force):
            say(f"using the existing folder {dest} (pass --force to convert again)", style="dim")
        else:
            try:
                with stage_progress() as progress:
                    modelstore.pull(source, dest, progress=progress)
            except modelstore.ModelStoreError as exc:
                raise CliError(str(exc)) from exc
            say(f"wrote {dest}")
        _register(client, local_name, dest, f"pull:{source}")


@app.command("import")
def import_(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A Hugging Face model folder.")],
    name: LocalNameOpt = None,
) -> None:
    """Register an existing model folder (it stays where it is)."""
    from dataplane import modelstore

    with connect(ctx) as client:
        folder = path.expanduser().resolve()
        try:
            modelstore.inspect_folder(folder)
        except modelstore.ModelStoreError as exc:
            raise CliError(str(exc)) from exc
        _register(client, name or sanitize(folder.name), folder, "import")


@app.command("create-random")
def create_random(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name (and folder name).")],
    preset: Annotated[Preset, typer.Option("--preset", "-p", help="Model shape.")],
    seed: Annotated[int, typer.Option("--seed", help="Weights seed.")] = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = (
        "float32"
    ),
    force: ForceOpt = False,
) -> None:
    """Write a random-weight Llama of a preset shape and register it."""
    from dataplane import modelstore

    with connect(ctx) as client:
        local_name = sanitize(name)
        dest = models_dir() / local_name
        if _prepare_destination(dest, force):
            raise CliError(f"{dest} already exists; pass --force to replace it")
        try:
            with stage_progress() as progress:
                modelstore.create_random(
                    dest, preset.value, seed=seed, dtype=dtype, progress=progress
                )
        except modelstore.ModelStoreError as exc:
            raise CliError(str(exc)) from exc
        say(f"wrote {dest}")
        _register(client, local_name, dest, f"random:{preset.value}:seed={seed}:{dtype}")


@app.command("list")
def list_(ctx: typer.Context, json_mode: JsonOpt = False) -> None:
    """List registered models."""
    with connect(ctx) as client:
        render(client.list_models(), columns.MODEL_LIST, json_mode, title="models")


@app.command()
def get(ctx: typer.Context, name: NameArg, json_mode: JsonOpt = False) -> None:
    """Show one model."""
    with connect(ctx) as client:
        render(client.get_model(name), columns.MODEL, json_mode)


@app.command()
def delete(ctx: typer.Context, name: NameArg, json_mode: JsonOpt = False) -> None:
    """Unregister a model (its folder is kept)."""
    with connect(ctx) as client:
        model = client.delete_model(name)
        if json_mode:
            render(model, columns.MODEL, json_mode)
        else:
            say(f"deleted model {model.name}")
