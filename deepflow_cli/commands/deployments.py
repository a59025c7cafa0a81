"""`deepflow deploy`, `deepflow scale` and `deepflow deployments ...`."""

from __future__ import annotations

from typing import Annotated

import typer

from controlplane.wire import DeploymentInfo
from deepflow_cli import columns
from deepflow_cli.client import DeepFlowClient
from deepflow_cli.context import connect
from deepflow_cli.errors import CliError
from deepflow_cli.options import JsonOpt, ReplicasOpt, TimeoutOpt, WaitOpt
from deepflow_cli.output import render, say, wait_for

app = typer.Typer(help="List, inspect, scale and delete deployments.", no_args_is_help=True)
# `deploy` and `scale` sit at the top level; main.py merges this app without a name.
shortcuts = typer.Typer()

NameArg = Annotated[str, typer.Argument(help="Deployment name.")]
POLL_INTERVAL_S = 0.5


def _wait_ready(client: DeepFlowClient, name: str, timeout: float) -> DeploymentInfo:
    latest: list[DeploymentInfo] = []

    def poll() -> tuple[bool, str]:
        deployment = client.get_deployment(name)
        latest[:] = [deployment]
        line = f"{name}: {deployment.ready_replicas}/{deployment.replicas} replicas ready"
        return deployment.ready_replicas >= deployment.replicas, line

    if not wait_for(poll, timeout=timeout, interval=POLL_INTERVAL_S):
        deployment = latest[-1]
        reasons = sorted({i.reason for i in deployment.instances if i.reason})
        why = f" ({'; '.join(reasons)})" if reasons else ""
        raise CliError(
            f"deployment {name} has {deployment.ready_replicas}/{deployment.replicas} replicas "
            f"ready after {timeout:.0f} s{why}; see `deepflow instances list --deployment {name}`"
        )
    return latest[-1]


@shortcuts.command()
def deploy(
    ctx: typer.Context,
    name: NameArg,
    model: Annotated[str, typer.Option("--model", "-m", help="Registered model to serve.")],
    replicas: ReplicasOpt = 1,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 300.0,
    json_mode: JsonOpt = False,
) -> None:
    """Create a deployment of a model and wait until its replicas are ready."""
    with connect(ctx) as client:
        deployment = client.create_deployment(name, model, replicas)
        if wait:
            deployment = _wait_ready(client, name, timeout)
        if json_mode:
            render(deployment, columns.DEPLOYMENT, json_mode)
            return
        ready = f"{deployment.ready_replicas}/{deployment.replicas} replicas ready"
        say(f"deployment {name} of {model}: {ready}", style="green" if wait else None)


@shortcuts.command()
def scale(
    ctx: typer.Context, name: NameArg, replicas: ReplicasOpt, json_mode: JsonOpt = False
) -> None:
    """Set a deployment's number of replicas."""
    update(ctx, name, replicas, json_mode)


@app.command()
def update(
    ctx: typer.Context, name: NameArg, replicas: ReplicasOpt, json_mode: JsonOpt = False
) -> None:
    """Change a deployment (its number of replicas)."""
    with connect(ctx) as client:
        deployment = client.update_deployment(name, replicas=replicas)
        if json_mode:
            render(deployment, columns.DEPLOYMENT, json_mode)
        else:
            say(f"deployment {name} scaled to {deployment.replicas} replicas")


@app.command("list")
def list_(ctx: typer.Context, json_mode: JsonOpt = False) -> None:
    """List deployments."""
    with connect(ctx) as client:
        render(client.list_deployments(), columns.DEPLOYMENT, json_mode, title="deployments")


@app.command()
def get(ctx: typer.Context, name: NameArg, json_mode: JsonOpt = False) -> None:
    """Show a deployment and its instances."""
    with connect(ctx) as client:
        deployment = client.get_deployment(name)
    render(deployment, columns.DEPLOYMENT, json_mode)
    if not json_mode:
        render(deployment.instances, columns.INSTANCE_LIST, False, title="instances")


@app.command()
def delete(ctx: typer.Context, name: NameArg, json_mode: JsonOpt = False) -> None:
    """Delete a deployment (its instances are stopped)."""
    with connect(ctx) as client:
        deployment = client.delete_deployment(name)
        if json_mode:
            render(deployment, columns.DEPLOYMENT, json_mode)
        else:
            say(f"deleted deployment {name}")
