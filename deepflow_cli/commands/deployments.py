"""`deepflow deploy`, `deepflow scale` and `deepflow deployments ...`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from controlplane.wire import DeploymentInfo
from deepflow_cli import columns
from deepflow_cli import deployment_options as opts
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


def _one_group(d: DeploymentInfo) -> bool:
    """A deployment of colocated instances only (colocated or semi-pd): sized by `replicas`."""
    return [g.role for g in columns.groups_of(d)] == ["colocated"]


def _summary(d: DeploymentInfo) -> str:
    if _one_group(d):
        sizes = f"{d.replicas} replicas"
    else:
        sizes = ", ".join(f"{g.role} {g.replicas}" for g in columns.groups_of(d))
    if d.autoscaling is None:
        return sizes
    auto = d.autoscaling
    return f"{sizes}, autoscaling {auto.min_replicas}-{auto.max_replicas}"


def _ready_line(d: DeploymentInfo) -> str:
    if _one_group(d):
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


@shortcuts.command()
def deploy(
    ctx: typer.Context,
    name: NameArg,
    model: Annotated[str, typer.Option("--model", "-m", help="Registered model to serve.")],
    replicas: opts.OptionalReplicasOpt = None,
    mode: opts.ModeOpt = None,
    prefill: opts.PrefillOpt = None,
    decode: opts.DecodeOpt = None,
    slo_ttft_ms: opts.SloTtftOpt = None,
    slo_tpot_ms: opts.SloTpotOpt = None,
    semi_pd_split: opts.SemiPDSplitOpt = None,
    semi_pd_static: opts.SemiPDStaticOpt = None,
    min_replicas: opts.MinReplicasOpt = None,
    max_replicas: opts.MaxReplicasOpt = None,
    target_concurrency: opts.TargetOpt = None,
    upscale_delay: opts.UpscaleDelayOpt = None,
    downscale_delay: opts.DownscaleDelayOpt = None,
    scale_to_zero_after: opts.ScaleToZeroOpt = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 300.0,
    json_mode: JsonOpt = False,
) -> None:
    """Create a deployment of a model and wait until its instances are ready.

    --mode colocated (default) runs --replicas instances; disaggregated a prefill group and a
    decode group (--prefill, --decode; 1 each by default); auto all three; semi-pd --replicas
    semi-PD instances, each splitting its device between a prefill and a decode worker to meet
    --slo-ttft-ms and --slo-tpot-ms. Without --max-replicas each group keeps its size; with it,
    each autoscales between --min-replicas (default 0) and --max-replicas."""
    autoscaling = opts.autoscaling_fields(
        min_replicas,
        max_replicas,
        target_concurrency,
        upscale_delay,
        downscale_delay,
        scale_to_zero_after,
    )
    semi_pd = opts.semi_pd_fields(slo_ttft_ms, slo_tpot_ms, semi_pd_split, semi_pd_static)
    with reporting_errors():
        opts.check_groups(mode or opts.Mode.colocated, replicas, prefill, decode)
        opts.check_semi_pd(mode, semi_pd, creating=True)
    if replicas is None and max_replicas is None and mode in (None, opts.Mode.colocated):
        replicas = 1
    with connect(ctx) as client:
        deployment = client.create_deployment(
            name,
            model,
            replicas,
            mode=None if mode is None else mode.value,
            prefill_replicas=prefill,
            decode_replicas=decode,
            **semi_pd,
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
    replicas: opts.OptionalReplicasOpt = None,
    prefill: opts.PrefillOpt = None,
    decode: opts.DecodeOpt = None,
    mode: Annotated[
        opts.Mode | None,
        typer.Option(
            "--mode",
            help="A new mode sharing a group with the current one: colocated and "
            "disaggregated change through auto; semi-pd (needs both SLOs) from colocated or auto.",
            show_default=False,
        ),
    ] = None,
    slo_ttft_ms: opts.SloTtftOpt = None,
    slo_tpot_ms: opts.SloTpotOpt = None,
    semi_pd_split: opts.SemiPDSplitOpt = None,
    semi_pd_static: opts.SemiPDStaticOpt = None,
    min_replicas: opts.MinReplicasOpt = None,
    max_replicas: opts.MaxReplicasOpt = None,
    target_concurrency: opts.TargetOpt = None,
    upscale_delay: opts.UpscaleDelayOpt = None,
    downscale_delay: opts.DownscaleDelayOpt = None,
    scale_to_zero_after: opts.ScaleToZeroOpt = None,
    no_autoscale: Annotated[
        bool, typer.Option("--no-autoscale", help="Turn autoscaling off, keeping the replicas.")
    ] = False,
    json_mode: JsonOpt = False,
) -> None:
    """Change a deployment: its mode, group sizes, semi-PD settings, or autoscaling
    (--max-replicas turns it on). Instances whose semi-PD settings change are replaced, each
    draining once a replacement is ready."""
    semi_pd = opts.semi_pd_fields(slo_ttft_ms, slo_tpot_ms, semi_pd_split, semi_pd_static)
    with reporting_errors():
        if mode == opts.Mode.semi_pd:
            opts.check_groups(mode, replicas, prefill, decode)
        opts.check_semi_pd(mode, semi_pd, creating=False)
    fields = opts.autoscaling_fields(
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
        **semi_pd,
    )
    if no_autoscale:
        fields["autoscaling"] = False
    if all(v is None for v in fields.values()):
        with reporting_errors():
            raise CliError(
                "nothing to change: give --replicas, --prefill, --decode, --mode, a semi-PD "
                "or an autoscaling option",
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
        render(client.list_deployments(), columns.DEPLOYMENT_LIST, json_mode, title="deployments")


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
