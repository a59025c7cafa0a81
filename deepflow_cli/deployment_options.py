"""The options of `deploy`, `scale` and `deployments update` (mode, groups, semi-PD settings,
autoscaling) as `Annotated` aliases, and the usage checks of their combinations, made before
anything is sent."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Any

import typer

from deepflow_cli.errors import CliError, ExitCode


class Mode(StrEnum):
    """How a deployment serves (docs/pd.md, "Deployment modes and groups")."""

    colocated = "colocated"  # one group: instances that prefill and decode
    disaggregated = "disaggregated"  # a prefill group and a decode group
    auto = "auto"  # all three groups
    semi_pd = "semi-pd"  # one group of semi-PD instances: a prefill and a decode worker in each


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
        help="colocated (default), disaggregated (prefill and decode groups), auto (all three) "
        "or semi-pd (colocated instances splitting their device between prefill and decode; "
        "needs --slo-ttft-ms and --slo-tpot-ms).",
        show_default=False,
    ),
]
# Mode semi-pd (docs/pd.md, "semi-PD deployments"): FlowServe's --semi-pd flags for its instances.
SloTtftOpt = Annotated[
    float | None,
    typer.Option(
        "--slo-ttft-ms",
        help="semi-pd: the P90 time-to-first-token target, in milliseconds.",
        show_default=False,
    ),
]
SloTpotOpt = Annotated[
    float | None,
    typer.Option(
        "--slo-tpot-ms",
        help="semi-pd: the P90 time-per-output-token target, in milliseconds.",
        show_default=False,
    ),
]
SemiPDSplitOpt = Annotated[
    int | None,
    typer.Option(
        "--semi-pd-split",
        min=1,
        max=99,
        help="semi-pd: the prefill worker's starting share of the device, percent (default 50).",
        show_default=False,
    ),
]
SemiPDStaticOpt = Annotated[
    bool | None,
    typer.Option(
        "--semi-pd-static/--semi-pd-dynamic",
        help="semi-pd: keep the split (the SLOs are only observed), or let the SLO controller "
        "move it (the default).",
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


def autoscaling_fields(
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


def semi_pd_fields(
    slo_ttft_ms: float | None,
    slo_tpot_ms: float | None,
    split: int | None,
    static: bool | None,
) -> dict[str, Any]:
    return {
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
        "semi_pd_split": split,
        "semi_pd_static": static,
    }


SEMI_PD_FLAGS = {
    "slo_ttft_ms": "--slo-ttft-ms",
    "slo_tpot_ms": "--slo-tpot-ms",
    "semi_pd_split": "--semi-pd-split",
    "semi_pd_static": "--semi-pd-static/--semi-pd-dynamic",
}


def check_semi_pd(mode: Mode | None, settings: dict[str, Any], *, creating: bool) -> None:
    """Mode semi-pd's flags are usage errors where the mode is known not to be semi-pd (given,
    or the default colocated of a new deployment), and a new semi-pd deployment needs both SLOs.
    An update without --mode leaves the rest to the control plane, which knows the mode."""
    for key in ("slo_ttft_ms", "slo_tpot_ms"):
        value = settings[key]
        if value is not None and not (math.isfinite(value) and value > 0):
            raise CliError(
                f"{SEMI_PD_FLAGS[key]} must be a positive number of milliseconds, not {value}",
                ExitCode.USAGE,
            )
    given = [SEMI_PD_FLAGS[k] for k, v in settings.items() if v is not None]
    effective = mode if mode is not None or not creating else Mode.colocated
    if given and effective is not None and effective != Mode.semi_pd:
        raise CliError(
            f"{', '.join(given)} configure the instances of --mode semi-pd, and mode "
            f"{effective.value} runs none",
            ExitCode.USAGE,
        )
    if creating and effective == Mode.semi_pd:
        missing = [SEMI_PD_FLAGS[k] for k in ("slo_ttft_ms", "slo_tpot_ms") if settings[k] is None]
        if missing:
            raise CliError(
                f"--mode semi-pd needs both SLOs, --slo-ttft-ms and --slo-tpot-ms (its instances "
                f"move compute between prefill and decode to meet them); {' and '.join(missing)} "
                f"missing",
                ExitCode.USAGE,
            )


def check_groups(mode: Mode, replicas: int | None, prefill: int | None, decode: int | None) -> None:
    """The flags of the groups a mode does not have are usage errors, found before sending."""
    if mode in (Mode.colocated, Mode.semi_pd) and (prefill is not None or decode is not None):
        instances = (
            "each semi-PD instance runs its own prefill and decode workers (size the "
            "deployment with --replicas)"
            if mode == Mode.semi_pd
            else "a colocated deployment has only --replicas"
        )
        raise CliError(
            f"--prefill and --decode size the groups of --mode disaggregated or auto; {instances}",
            ExitCode.USAGE,
        )
    if mode == Mode.disaggregated and replicas:
        raise CliError(
            "a disaggregated deployment has no colocated instances: leave out --replicas and "
            "give --prefill and --decode (--mode auto runs all three groups)",
            ExitCode.USAGE,
        )
