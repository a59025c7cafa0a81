"""Options shared by several commands, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="DEEPFLOW_URL",
        help="Control plane URL (default: the one `deepflow up` started, else http://127.0.0.1:8480).",
        show_default=False,
    ),
]
LimitOpt = Annotated[int, typer.Option("--limit", min=1, help="Show at most this many.")]
StateOpt = Annotated[str | None, typer.Option("--state", help="Only records in this state.")]
ReplicasOpt = Annotated[int, typer.Option("--replicas", "-r", min=0, help="Number of replicas.")]
WaitOpt = Annotated[
    bool, typer.Option("--wait/--no-wait", help="Wait until it is ready, showing progress.")
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0, help="Seconds to wait.")]
