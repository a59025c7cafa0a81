"""`deepflow profile pd NAME`: measure where disaggregation pays for a deployment, store the
heatmap its scheduler routes by, and show it with the decode-length predictor's accuracy."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rich.table import Table

from controlplane.wire import PDProfileCreate, PDProfileInfo
from deepflow_cli.context import connect
from deepflow_cli.options import JsonOpt
from deepflow_cli.output import print_table, render, say

app = typer.Typer(help="Profile a deployment (the PD heatmap its scheduler routes by).")

NameArg = Annotated[str, typer.Argument(help="Deployment name (mode auto).")]


def _edges(raw: str | None, param: str) -> list[float | None] | None:
    if raw is None:
        return None
    try:
        return [None if p.strip() in ("inf", "") else float(p) for p in raw.split(",")]
    except ValueError as exc:
        raise typer.BadParameter(
            f"a comma-separated list of numbers: {raw!r}", param_hint=param
        ) from exc


def _bin(lo: float | None, hi: float | None) -> str:
    def fmt(x: float | None) -> str:
        return "inf" if x is None or math.isinf(x) else f"{x:g}"

    return f"{fmt(lo)}-{fmt(hi)}"


def heatmap_table(info: PDProfileInfo) -> Table | None:
    """Rows: prompt tokens; columns: decode/prompt ratio; cells JCT(colocated)/JCT(disagg) - 1
    (positive: disaggregated is faster)."""
    heatmap = info.heatmap
    if heatmap is None:
        return None
    prompt_edges, ratio_edges = heatmap["prompt_edges"], heatmap["ratio_edges"]
    table = Table(title=f"PD heatmap of {info.deployment}: JCT(colocated)/JCT(disaggregated) - 1")
    table.add_column("prompt \\ ratio")
    for lo, hi in zip(ratio_edges, ratio_edges[1:], strict=False):
        table.add_column(_bin(lo, hi), justify="right")
    for row, (lo, hi) in zip(
        heatmap["values"], zip(prompt_edges, prompt_edges[1:], strict=False), strict=False
    ):
        cells = ["" if v is None else f"[{'green' if v > 0 else 'red'}]{v:+.2f}[/]" for v in row]
        table.add_row(_bin(lo, hi), *cells)
    return table


def show(info: PDProfileInfo) -> None:
    table = heatmap_table(info)
    if table is None:
        say(f"{info.deployment}: no PD profile yet (deepflow profile pd {info.deployment})")
    else:
        print_table(table)
        say(f"{info.num_measurements} requests measured in {info.duration_s or 0:.1f} s")
    p = info.predictor
    if p.bucket_accuracy is None:
        say(f"decode-length predictor: {p.n_train} finished requests so far, too few to test")
    else:
        say(
            f"decode-length predictor ({p.bucket_tokens}-token buckets): "
            f"{p.bucket_accuracy:.1%} of held-out requests in the right bucket, "
            f"mean error {p.mean_abs_error_tokens:.0f} tokens (trained on {p.n_train}, "
            f"tested on {p.n_test})"
        )


@app.command("pd")
def profile_pd(
    ctx: typer.Context,
    name: NameArg,
    repeats: Annotated[int, typer.Option(min=1, max=64, help="Requests per cell and mode.")] = 2,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Requests at once.")] = 2,
    max_total_tokens: Annotated[
        int | None, typer.Option(min=2, help="Skip cells whose prompt + decode exceed this.")
    ] = None,
    prompt_edges: Annotated[
        str | None, typer.Option(help="Prompt-length bin edges, e.g. 0,64,256,inf.")
    ] = None,
    ratio_edges: Annotated[
        str | None, typer.Option(help="Decode/prompt ratio bin edges, e.g. 0,0.5,2,inf.")
    ] = None,
    show_only: Annotated[
        bool, typer.Option("--show", help="Show the stored profile; measure nothing.")
    ] = False,
    json_mode: JsonOpt = False,
) -> None:
    """Measure JCT colocated vs disaggregated per (prompt length, decode/prompt ratio) cell and
    store the heatmap the deployment's scheduler routes by."""
    with connect(ctx) as client:
        if show_only:
            info = client.get_pd_profile(name)
        else:
            body = PDProfileCreate(
                repeats=repeats,
                concurrency=concurrency,
                max_total_tokens=max_total_tokens,
                prompt_edges=_edges(prompt_edges, "--prompt-edges"),
                ratio_edges=_edges(ratio_edges, "--ratio-edges"),
            )
            if not json_mode:
                say(f"profiling {name}: every cell colocated and disaggregated ...")
            info = client.create_pd_profile(name, body)
    if json_mode:
        render(info, [], True)
    else:
        show(info)
