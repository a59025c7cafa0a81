"""Everything the CLI prints: one renderer for tables and `--json`, messages, errors, progress.

Data goes to stdout (a table, or JSON a script can parse); spinners and progress bars go to stderr
so `--json` output stays clean; an error is one red line on stderr.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from deepflow_cli.errors import CliError, ExitCode

PIPED_MAX_WIDTH = 1000
# Consoles look up sys.stdout / sys.stderr when they print, so test runners can capture them.
stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


# -- cells --------------------------------------------------------------------------------------


def when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def clock(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def count(n: int | None) -> str:
    if n is None:
        return "-"
    for div, unit in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


@dataclass(frozen=True, slots=True)
class Column:
    """A table column: its header and how to read a cell from a record."""

    header: str
    value: Callable[[Any], object]


def field(name: str, header: str | None = None, fmt: Callable[[Any], str] = str) -> Column:
    def read(record: Any) -> str:
        value = getattr(record, name)
        return "-" if value is None else fmt(value)

    return Column(header or name.replace("_", " "), read)


# -- the renderer -------------------------------------------------------------------------------


def jsonable(data: object) -> object:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, list | tuple):
        return [jsonable(item) for item in data]
    return data


def render(
    data: BaseModel | Sequence[BaseModel] | Any,
    columns: Sequence[Column],
    json_mode: bool,
    *,
    title: str | None = None,
) -> None:
    """Print `data` as JSON, or as a table: a row per record, or field/value rows for one."""
    if json_mode:
        typer.echo(json.dumps(jsonable(data), indent=2))
        return
    if isinstance(data, Sequence) and not isinstance(data, str):
        if not data:
            stdout.print(Text(f"no {title or 'records'}", style="dim"))
            return
        table = Table(title=title, title_justify="left", title_style="bold")
        for column in columns:
            table.add_column(column.header.upper(), overflow="fold")
        for record in data:
            table.add_row(*(Text(str(column.value(record))) for column in columns))
    else:
        table = Table(title=title, title_justify="left", title_style="bold", show_header=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for column in columns:
            table.add_row(column.header, Text(str(column.value(data))))
    print_table(table)


def print_table(table: Table) -> None:
    if stdout.is_terminal:
        stdout.print(table)
        return
    # Piped or captured: no screen to fit, so keep each row on one line for grep and friends.
    options = stdout.options.update_width(PIPED_MAX_WIDTH)
    width = max(Measurement.get(stdout, options, table).maximum, stdout.width)
    Console(file=stdout.file, width=width, highlight=False).print(table)


# -- messages -----------------------------------------------------------------------------------


def say(message: str, style: str | None = None) -> None:
    stdout.print(Text(message, style=style or ""), soft_wrap=True)


def warn(message: str) -> None:
    stderr.print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)


def error(message: str) -> None:
    stderr.print(Text(f"error: {message}", style="red"), soft_wrap=True)


@contextmanager
def reporting_errors() -> Iterator[None]:
    """The CLI edge: a `CliError` becomes one red line and its exit code."""
    try:
        yield
    except CliError as exc:
        error(exc.message)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        error("interrupted")
        raise typer.Exit(ExitCode.INTERRUPTED) from None


# -- waiting and progress -----------------------------------------------------------------------


def wait_for(
    poll: Callable[[], tuple[bool, str]],
    *,
    timeout: float,
    interval: float = 0.5,
    spinner: bool = True,
) -> bool:
    """Call `poll` until it reports done, showing its latest line beside a spinner.

    Returns False when `timeout` seconds pass first. `spinner=False` waits quietly (when other
    processes write to the same terminal).
    """
    deadline = time.monotonic() + timeout
    with stderr.status("starting") if spinner else nullcontext() as status:
        while True:
            done, line = poll()
            if done:
                return True
            if status is not None:
                status.update(line)
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)


ProgressCallback = Callable[[str, int, int], None]


@contextmanager
def stage_progress() -> Iterator[ProgressCallback]:
    """A progress bar driven by `progress(stage, done, total)` callbacks (the model store's)."""
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    )
    tasks: dict[str, TaskID] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            for task_id in tasks.values():  # a new stage finishes the previous ones
                bar.update(task_id, total=1, completed=1)
            tasks[stage] = bar.add_task(stage, total=None)
        # A total of 0 means "unknown": the bar pulses instead of filling.
        bar.update(tasks[stage], completed=done, total=total or None)

    with bar:
        yield update
