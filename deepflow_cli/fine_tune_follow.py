"""Following a fine-tuning job: poll it and its events until it ends, show step, loss and ETA.

The events API lists newest first (as OpenAI's does), so new events are found by paging back from
the newest until one already seen. Progress events have type "metrics" and data
`{step, total_steps, train_loss, ...}`; the ETA comes from the pace between the first and the
latest of them that the CLI saw. On a terminal they show on a live bar; anywhere else (a log, CI,
a pipe), where a live bar prints nothing, as plain lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
)
from rich.text import Text

from controlplane.wire import FineTuningEvent, FineTuningJob
from deepflow_cli.client import DeepFlowClient
from deepflow_cli.output import clock, stderr

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
POLL_INTERVAL_S = 2.0
EVENTS_PAGE = 100

Show = Callable[[FineTuningJob, list[FineTuningEvent]], None]


# -- reading progress (pure) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepMetrics:
    at: float  # the event's created_at
    step: int
    total_steps: int
    loss: float | None


def step_metrics(event: FineTuningEvent) -> StepMetrics | None:
    """The progress in a metrics event, or None for any other event."""
    data = event.data or {}
    if event.type != "metrics" or "step" not in data or "total_steps" not in data:
        return None
    loss = data.get("train_loss", data.get("loss"))
    return StepMetrics(
        at=float(event.created_at),
        step=int(data["step"]),
        total_steps=int(data["total_steps"]),
        loss=None if loss is None else float(loss),
    )


def eta_s(first: StepMetrics, latest: StepMetrics) -> float | None:
    """Seconds left at the pace from `first` to `latest`; None until there is a pace."""
    steps = latest.step - first.step
    if steps <= 0 or latest.at <= first.at:
        return None
    return (latest.at - first.at) / steps * max(latest.total_steps - latest.step, 0)


def duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def progress_detail(first: StepMetrics, latest: StepMetrics) -> str:
    parts = [f"step {latest.step}/{latest.total_steps}"]
    if latest.loss is not None:
        parts.append(f"loss {latest.loss:.4f}")
    left = eta_s(first, latest)
    parts.append(f"ETA {duration(left)}" if left is not None else "ETA -")
    return " · ".join(parts)


def event_message(event: FineTuningEvent) -> str:
    """The event's message; for a metrics event without one, its step and loss."""
    metrics = step_metrics(event)
    if event.message or metrics is None:
        return event.message
    loss = "" if metrics.loss is None else f": loss {metrics.loss:.4f}"
    return f"step {metrics.step}/{metrics.total_steps}{loss}"


def event_line(event: FineTuningEvent) -> str:
    level = "" if event.level == "info" else f"{event.level}: "
    return f"{clock(event.created_at)[:8]}  {level}{event_message(event)}"


# -- polling --------------------------------------------------------------------------------------


def unseen_events(
    client: DeepFlowClient, job_id: str, seen: set[str], *, page_back: bool, limit: int
) -> list[FineTuningEvent]:
    """Events not in `seen` (added to it), oldest first.

    With `page_back`, earlier pages are read until a seen event; without, only the newest page.
    """
    fresh: list[FineTuningEvent] = []
    after: str | None = None
    while True:
        page = client.list_fine_tuning_events(job_id, after=after, limit=limit)
        new = [e for e in page.items if e.id not in seen]
        fresh += new
        if len(new) < len(page.items) or not page.has_more or not page.items or not page_back:
            break
        after = page.items[-1].id
    seen.update(e.id for e in fresh)
    return fresh[::-1]


def watch(
    client: DeepFlowClient, job_id: str, show: Show, *, backlog: int | None = None
) -> FineTuningJob:
    """Poll until the job ends, handing `show` the job and its new events each time.

    `backlog` limits the events shown at first to the newest ones; None shows them all.
    """
    seen: set[str] = set()
    first = True
    while True:
        # The job before its events: once the job has ended, its last events are already written.
        job = client.get_fine_tuning_job(job_id)
        limit = backlog if first and backlog is not None else EVENTS_PAGE
        page_back = not first or backlog is None
        show(job, unseen_events(client, job_id, seen, page_back=page_back, limit=limit))
        if job.status in TERMINAL:
            return job
        first = False
        time.sleep(POLL_INTERVAL_S)


# -- the views ------------------------------------------------------------------------------------

# A log gets a progress line at most this often (and always at the first progress, before a message
# and when the job ends); a terminal's bar shows every step.
PLAIN_EVERY_S = 5.0


def _show_status(console: Console, shown: str | None, job: FineTuningJob) -> str:
    if job.status != shown:
        console.print(Text(f"status: {job.status}", style="bold"))
    return job.status


def _show_event(console: Console, event: FineTuningEvent) -> None:
    style = "red" if event.level == "error" else "dim"
    console.print(Text(event_line(event), style=style), soft_wrap=True)


@dataclass(slots=True)
class LiveView:
    """A job's status, steps, loss and ETA on one bar (stderr), its messages printed above it."""

    bar: Progress
    task: TaskID
    status: str | None = None
    first: StepMetrics | None = None

    def __call__(self, job: FineTuningJob, events: list[FineTuningEvent]) -> None:
        self.status = _show_status(self.bar.console, self.status, job)
        detail = None
        for event in events:
            metrics = step_metrics(event)
            if metrics is None:
                _show_event(self.bar.console, event)
                continue
            self.first = self.first or metrics
            detail = progress_detail(self.first, metrics)
            self.bar.update(self.task, completed=metrics.step, total=metrics.total_steps)
        self.bar.update(self.task, description=job.status)
        if detail is not None:
            self.bar.update(self.task, detail=detail)


@dataclass(slots=True)
class PlainView:
    """The same as `LiveView` for a log or CI, where a live bar prints nothing: the step, loss and
    ETA as lines of their own, at most every `PLAIN_EVERY_S`, and also before a message and when
    the job ends, so that lines stay in order and the last progress is never left out."""

    console: Console
    now: Callable[[], float] = time.monotonic
    status: str | None = None
    first: StepMetrics | None = None
    pending: StepMetrics | None = None  # the latest progress not yet printed
    printed_at: float | None = None

    def __call__(self, job: FineTuningJob, events: list[FineTuningEvent]) -> None:
        now = self.now()
        self.status = _show_status(self.console, self.status, job)
        for event in events:
            metrics = step_metrics(event)
            if metrics is None:
                self._show_progress(now)  # what happened before the message, shown before it
                _show_event(self.console, event)
                continue
            self.first = self.first or metrics
            self.pending = metrics
        if (
            job.status in TERMINAL
            or self.printed_at is None
            or now - self.printed_at >= PLAIN_EVERY_S
        ):
            self._show_progress(now)

    def _show_progress(self, now: float) -> None:
        if self.pending is None or self.first is None:
            return
        line = f"{clock(self.pending.at)[:8]}  {progress_detail(self.first, self.pending)}"
        self.console.print(Text(line), soft_wrap=True)
        self.pending, self.printed_at = None, now


@contextmanager
def live_view(job_id: str, console: Console | None = None) -> Iterator[Show]:
    """A bar on a terminal (stderr by default); plain lines anywhere else."""
    console = console or stderr
    if not console.is_terminal or console.is_dumb_terminal:
        yield PlainView(console)
        return
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        transient=True,
    )
    with bar:
        yield LiveView(bar, bar.add_task(job_id, total=None, detail=""))
