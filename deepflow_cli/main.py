"""The `deepflow` command: the root app, one sub-app per noun.

Tests replace `client_factory` to answer HTTP in-process (an `httpx.MockTransport`).
"""

from __future__ import annotations

import typer

from deepflow_cli.client import DeepFlowClient
from deepflow_cli.commands import (
    chat,
    deployments,
    files,
    finetune,
    models,
    platform,
    profile,
    records,
)
from deepflow_cli.context import AppState, ClientFactory
from deepflow_cli.options import UrlOpt

client_factory: ClientFactory = DeepFlowClient

app = typer.Typer(
    name="deepflow",
    help="DeepFlow: a serverless platform for large language models.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def root(ctx: typer.Context, url: UrlOpt = None) -> None:
    ctx.obj = AppState(url=url, client_factory=client_factory)


# Top-level verbs: merged without a name.
app.add_typer(platform.app)
app.add_typer(deployments.shortcuts)
app.add_typer(chat.app)
# Nouns.
app.add_typer(models.app, name="models")
app.add_typer(deployments.app, name="deployments")
app.add_typer(records.requests_app, name="requests")
app.add_typer(records.jobs_app, name="jobs")
app.add_typer(records.tasks_app, name="tasks")
app.add_typer(records.nodes_app, name="nodes")
app.add_typer(records.instances_app, name="instances")
app.add_typer(files.app, name="files")
app.add_typer(finetune.app, name="finetune")
app.add_typer(profile.app, name="profile")


def main() -> None:
    app(prog_name="deepflow")


if __name__ == "__main__":
    main()
