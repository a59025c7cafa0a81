"""`deepflow deploy`, `deepflow scale` and `deepflow deployments ...`."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from controlplane.wire import DeploymentInfo
from deepflow_cli import columns
from deepflow_cli.client import DeepFlowClient
from deepflow_cli.context import connect
from deepflow_cli.errors import CliError, ExitCode
from deepflow_cli.options import JsonOpt, LimitOpt, TimeoutOpt, WaitOpt
from deepflow_cli.output import render, reporting_errors, say, wait_for

app = typer.Typer(help="List, inspect, scale and delete deployments.", no_args_is_help=True)
# `deploy` and `scale` sit at the top level; main.py merges this app without a name.
shortcuts = typer.Typer()

NameArg = Annotated[str, typer.Argument(help="Deployment name.")]
POLL_INTERVAL_S = 0.5


class Mode(StrEnum):
    """How a deployment serves (docs/pd.md, "Deployment modes and groups")."""

    colocated = "colocated"  # one group: instances that prefill and decode
    disaggregated = "disaggregated"  # a prefill group and a decode group
    auto = "auto"  # all three groups


# Autoscaling (docs/scaling.md, "Autoscaling"): on when --max-replicas is given.
OptionalReplicasOpt = Annotated[
    int | None,
    typer.Option(
        "--replicas",
        "-r",
        min=0,
        help="Colocated instances (default 1 where the mode has them); with autoscaling, the "
        "count to start from.",
        show_default=False,
    ),
]
ModeOpt = Annotated[
    Mode | None,
    typer.Option(
        "--mode",
        help="colocated (default), disaggregated (prefill and decode groups) or auto (all three).",
        show_default=False,
    ),
]
PrefillOpt = Annotated[
    int | None,
    typer.Option(
        "--prefill",
        min=0,
        help="Prefill instances (disaggregated or auto mode; default 1).",
        show_default=False,
    ),
]
DecodeOpt = Annotated[
    int | None,
    typer.Option(
        "--decode",
        min=0,
        help="Decode instances (disaggregated or auto mode; default 1).",
        show_default=False,
    ),
]
MinReplicasOpt = Annotated[
    int | None,
    typer.Option("--min-replicas", min=0, help="Autoscaling: fewest replicas (default 0)."),
]
MaxReplicasOpt = Annotated[
    int | None,
    typer.Option("--max-replicas", min=1, help="Autoscaling: most replicas; turns it on."),
]
TargetOpt = Annotated[
    float | None,
    typer.Option(
        "--target-concurrency",
        min=0.001,
        help="Autoscaling: requests (running + waiting) per replica to aim for (default 2).",
    ),
]
UpscaleDelayOpt = Annotated[
    float | None,
    typer.Option("--upscale-delay", min=0, help="Autoscaling: seconds of load before adding (30)."),
]
DownscaleDelayOpt = Annotated[
    float | None,
    typer.Option(
        "--downscale-delay", min=0, help="Autoscaling: seconds of low load before removing (600)."
    ),
]
ScaleToZeroOpt = Annotated[
    float | None,
    typer.Option(
        "--scale-to-zero-after",
        min=0,
        help="Autoscaling: seconds without requests before the last replica goes (60).",
    ),
]


def _autoscaling(
    min_replicas: int | None,
    max_replicas: int | None,
    target: float | None,
    upscale_delay: float | None,
    downscale_delay: float | None,
    scale_to_zero_after: float | None,
) -> dict[str, Any]:
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_concurrency": target,
        "upscale_delay_s": upscale_delay,
        "downscale_delay_s": downscale_delay,
        "scale_to_zero_after_s": scale_to_zero_after,
    }


def _summary(d: DeploymentInfo) -> str:
    if d.mode == "colocated":
        sizes = f"{d.replicas} replicas"
    else:
        sizes = ", ".join(f"{g.role} {g.replicas}" for g in columns.groups_of(d))
    if d.autoscaling is None:
        return sizes
    auto = d.autoscaling
    return f"{sizes}, autoscaling {auto.min_replicas}-{auto.max_replicas}"


def _ready_line(d: DeploymentInfo) -> str:
    if d.mode == "colocated":
        return f"{d.ready_replicas}/{d.replicas} replicas ready"
    return f"{columns.ready(d)} ready"


def _all_ready(d: DeploymentInfo) -> bool:
    return all(g.ready_replicas >= g.replicas for g in columns.groups_of(d))


def _wait_ready(client: DeepFlowClient, name: str, timeout: float) -> DeploymentInfo:
    latest: list[DeploymentInfo] = []

    def poll() -> tuple[bool, str]:
        deployment = client.get_deployment(name)
        latest[:] = [deployment]
        return _all_ready(deployment), f"{name}: {_ready_line(deployment)}"

    if not wait_for(poll, timeout=timeout, interval=POLL_INTERVAL_S):
        deployment = latest[-1]
        reasons = sorted({i.reason for i in deployment.instances if i.reason})
        why = f" ({'; '.join(reasons)})" if reasons else ""
        raise CliError(
            f"deployment {name} has {_ready_line(deployment)} after {timeout:.0f} s{why}; "
            f"see `deepflow instances list --deployment {name}`"
        )
    return latest[-1]


def _check_groups(
    mode: Mode, replicas: int | None, prefill: int | None, decode: int | None
) -> None:
    """The flags of the groups a mode does not have are usage errors, found before sending."""
    if mode == Mode.colocated and (prefill is not None or decode is not None):
        raise CliError(
            "--prefill and --decode size the groups of --mode disaggregated or auto; a "
            "colocated deployment has only --replicas",
            ExitCode.USAGE,
        )
    if mode == Mode.disaggregated and replicas:
        raise CliError(
            "a disaggregated deployment has no colocated instances: leave out --replicas and "
            "give --prefill and --decode (--mode auto runs all three groups)",
            ExitCode.USAGE,
        )


@shortcuts.command()
def deploy(
    ctx: typer.Context,
    name: NameArg,
    model: Annotated[str, typer.Option("--model", "-m", help="Registered model to serve.")],
    replicas: OptionalReplicasOpt = None,
    mode: ModeOpt = None,
    prefill: PrefillOpt = None,
    decode: DecodeOpt = None,
    min_replicas: MinReplicasOpt = None,
    max_replicas: MaxReplicasOpt = None,
    target_concurrency: TargetOpt = None,
    upscale_delay: UpscaleDelayOpt = None,
    downscale_delay: DownscaleDelayOpt = None,
    scale_to_zero_after: ScaleToZeroOpt = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 300.0,
    json_mode: JsonOpt = False,
) -> None:
    """Create a deployment of a model and wait until its instances are ready.

    --mode colocated (default) runs --replicas instances; disaggregated a prefill group and a
    decode group (--prefill, --decode; 1 each by default); auto all three. Without
    --max-replicas each group keeps its size; with it, each autoscales between --min-replicas
    (default 0) and --max-replicas."""
    autoscaling = _autoscaling(
        min_replicas,
        max_replicas,
        target_concurrency,
        upscale_delay,
        downscale_delay,
        scale_to_zero_after,
    )
    with reporting_errors():
        _check_groups(mode or Mode.colocated, replicas, prefill, decode)
    if replicas is None and max_replicas is None and mode in (None, Mode.colocated):
        replicas = 1
    with connect(ctx) as client:
        deployment = client.create_deployment(
            name,
            model,
            replicas,
            mode=None if mode is None else mode.value,
            prefill_replicas=prefill,
            decode_replicas=decode,
            **autoscaling,
        )
        if wait:
            deployment = _wait_ready(client, name, timeout)
        if json_mode:
            render(deployment, columns.DEPLOYMENT, json_mode)
            return
        say(
            f"deployment {name} of {model}: {_ready_line(deployment)}",
            style="green" if wait else None,
        )


@shortcuts.command()
def scale(
    ctx: typer.Context,
    name: NameArg,
    replicas: Annotated[
        int | None, typer.Option("--replicas", "-r", min=0, help="Colocated instances.")
    ] = None,
    prefill: Annotated[
        int | None, typer.Option("--prefill", min=0, help="Prefill instances.")
    ] = None,
    decode: Annotated[int | None, typer.Option("--decode", min=0, help="Decode instances.")] = None,
    json_mode: JsonOpt = False,
) -> None:
    """Set the size of a deployment's groups: any of --replicas, --prefill, --decode.

    On an autoscaled deployment each sets that group's current count, which must lie within its
    bounds; the autoscaler goes on from there (change the bounds with `deployments update`)."""
    fields = {"replicas": replicas, "prefill_replicas": prefill, "decode_replicas": decode}
    if all(v is None for v in fields.values()):
        with reporting_errors():
            raise CliError(
                "nothing to scale: give --replicas, --prefill or --decode", ExitCode.USAGE
            )
    _update(ctx, name, fields, json_mode)


@app.command()
def update(
    ctx: typer.Context,
    name: NameArg,
    replicas: OptionalReplicasOpt = None,
    prefill: PrefillOpt = None,
    decode: DecodeOpt = None,
    mode: Annotated[
        Mode | None,
        typer.Option(
            "--mode",
            help="A new mode sharing a group with the current one: colocated and "
            "disaggregated change through auto.",
            show_default=False,
        ),
    ] = None,
    min_replicas: MinReplicasOpt = None,
    max_replicas: MaxReplicasOpt = None,
    target_concurrency: TargetOpt = None,
    upscale_delay: UpscaleDelayOpt = None,
    downscale_delay: DownscaleDelayOpt = None,
    scale_to_zero_after: ScaleToZeroOpt = None,
    no_autoscale: Annotated[
        bool, typer.Option("--no-autoscale", help="Turn autoscaling off, keeping the replicas.")
    ] = False,
    json_mode: JsonOpt = False,
) -> None:
    """Change a deployment: its mode, group sizes, or autoscaling (--max-replicas turns it on)."""
    fields = _autoscaling(
        min_replicas,
        max_replicas,
        target_concurrency,
        upscale_delay,
        downscale_delay,
        scale_to_zero_after,
    )
    fields.update(
        replicas=replicas,
        prefill_replicas=prefill,
        decode_replicas=decode,
        mode=None if mode is None else mode.value,
    )
    if no_autoscale:
        fields["autoscaling"] = False
    if all(v is None for v in fields.values()):
        with reporting_errors():
            raise CliError(
                "nothing to change: give --replicas, --prefill, --decode, --mode or an "
                "autoscaling option",
                ExitCode.USAGE,
            )
    _update(ctx, name, fields, json_mode)


def _update(ctx: typer.Context, name: str, fields: dict[str, Any], json_mode: bool) -> None:
    with connect(ctx) as client:
        deployment = client.update_deployment(name, **fields)
        if json_mode:
            render(deployment, columns.DEPLOYMENT, json_mode)
        else:
            say(f"deployment {name} scaled to {_summary(deployment)}")


@app.command()
def scaling(
    ctx: typer.Context, name: NameArg, limit: LimitOpt = 20, json_mode: JsonOpt = False
) -> None:
    """Show a deployment's scaling events, newest first: each change of replicas (by the
    autoscaler or by hand) and each model preload, with what it was decided on."""
    with connect(ctx) as client:
        events = client.scaling_events(name, limit=limit)
    render(events, columns.SCALING_EVENT, json_mode, title=f"scaling of {name}")


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
