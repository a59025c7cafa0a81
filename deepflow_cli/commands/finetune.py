"""`deepflow finetune ...`: create, follow, list, inspect and cancel fine-tuning jobs.

A job's training file may be given as a file id or as a local path, which is uploaded first.
Following a job (`create --follow`, `follow`) exits 0 when it succeeds and 1 when it fails or is
cancelled; Ctrl-C stops following only, the job keeps running.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from controlplane.wire import FineTuningCheckpoint, FineTuningEvent, FineTuningJob
from deepflow_cli import fine_tune_follow
from deepflow_cli.client import DeepFlowClient, fine_tuning_job_body
from deepflow_cli.commands.files import upload_file
from deepflow_cli.context import connect
from deepflow_cli.errors import CliError, ExitCode
from deepflow_cli.options import JsonOpt
from deepflow_cli.output import Column, field, render, say, stderr, when

app = typer.Typer(help="Fine-tune models (LoRA) and follow the jobs.", no_args_is_help=True)

JOB = [
    field("id"),
    field("model"),
    field("status"),
    field("fine_tuned_model", "fine-tuned model"),
    field("training_file", "training file"),
    field("validation_file", "validation file"),
    Column("epochs", lambda j: j.hyperparameters.n_epochs),
    Column("batch size", lambda j: j.hyperparameters.batch_size),
    Column("lr multiplier", lambda j: j.hyperparameters.learning_rate_multiplier),
    field("seed"),
    field("user_provided_suffix", "suffix"),
    field("trained_tokens", "trained tokens"),
    field("created_at", "created", when),
    field("estimated_finish", "estimated finish", when),
    field("finished_at", "finished", when),
    field("request_id", "request"),
    Column("error", lambda j: j.error.message if j.error else "-"),
]
JOB_LIST = [JOB[i] for i in (0, 1, 2, 3, 12, 14)]

EVENT = [
    field("created_at", "time", when),
    field("level"),
    field("type"),
    Column("message", fine_tune_follow.event_message),
]


def _metrics(checkpoint: FineTuningCheckpoint) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in checkpoint.metrics.items()) or "-"


CHECKPOINT = [
    field("id"),
    field("step_number", "step"),
    Column("metrics", _metrics),
    field("fine_tuned_model_checkpoint", "checkpoint"),
    field("created_at", "created", when),
]

JobArg = Annotated[str, typer.Argument(help="Fine-tuning job id (ftjob-...).")]
LimitOpt = Annotated[int, typer.Option("--limit", min=1, help="Show at most this many.")]
AfterOpt = Annotated[
    str | None, typer.Option("--after", help="Start after this id (the last of the previous page).")
]


def _note(message: str, style: str = "dim") -> None:
    """Say something beside the result: on stderr, so `--json` output stays clean."""
    stderr.print(Text(message, style=style), soft_wrap=True)


def _more(page_items: list[Any], has_more: bool, command: str) -> None:
    if has_more and page_items:
        _note(f"more: deepflow finetune {command} --after {page_items[-1].id}")


# -- files: an id or a local path -----------------------------------------------------------------


def _file_ref(value: str) -> Path | str:
    """A local path to upload, or a file id; a local file wins if both could be meant."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if value.startswith("file-"):
        return value
    raise CliError(f"{value} is neither a local file nor a file id (file-...)")


def _file_id(client: DeepFlowClient, ref: Path | str) -> str:
    if isinstance(ref, str):
        return ref
    file = upload_file(client, ref, "fine-tune")
    _note(f"uploaded {ref.name} as {file.id}")
    return file.id


# -- following ------------------------------------------------------------------------------------


def _follow(client: DeepFlowClient, job_id: str) -> FineTuningJob:
    try:
        with fine_tune_follow.live_view(job_id) as view:
            return fine_tune_follow.watch(client, job_id, view)
    except KeyboardInterrupt:
        raise CliError(
            f"stopped following; job {job_id} keeps running. "
            f"Follow it again with `deepflow finetune follow {job_id}`, "
            f"or cancel it with `deepflow finetune cancel {job_id}`",
            ExitCode.INTERRUPTED,
        ) from None


def _outcome(job: FineTuningJob) -> None:
    """Raise for a job that ended without a model."""
    if job.status == "failed":
        reason = job.error.message if job.error else "no reason given"
        raise CliError(f"fine-tuning job {job.id} failed: {reason}")
    if job.status == "cancelled":
        raise CliError(f"fine-tuning job {job.id} was cancelled")


def _finish(job: FineTuningJob, json_mode: bool) -> None:
    if json_mode:
        render(job, JOB, json_mode)
    _outcome(job)
    if not json_mode:
        say(f"fine-tuned model: {job.fine_tuned_model}", style="green")
        _note(f"serve it with `deepflow deploy NAME --model {job.fine_tuned_model}`")


# -- commands -------------------------------------------------------------------------------------


@app.command()
def create(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option("--model", "-m", help="Base model (a registered model or deployment).")
    ],
    file: Annotated[
        str,
        typer.Option(
            "--file", "-f", "--training-file", help="Training file: an id, or a local JSONL file."
        ),
    ],
    validation_file: Annotated[
        str | None,
        typer.Option("--validation-file", help="Validation file: an id, or a local JSONL file."),
    ] = None,
    suffix: Annotated[
        str | None, typer.Option("--suffix", help="Part of the fine-tuned model's name.")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs.")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Examples per step.")
    ] = None,
    lr_multiplier: Annotated[
        float | None,
        typer.Option("--lr-multiplier", help="Learning rate multiplier (of a base rate of 2e-4)."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Training seed.")] = None,
    lora_rank: Annotated[int | None, typer.Option("--lora-rank", help="LoRA rank.")] = None,
    lora_alpha: Annotated[float | None, typer.Option("--lora-alpha", help="LoRA alpha.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Show progress until the job ends.")
    ] = False,
    json_mode: JsonOpt = False,
) -> None:
    """Start a fine-tuning job (local files are uploaded first)."""
    hyperparameters = {
        "n_epochs": epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": lr_multiplier,
    }
    lora = {"rank": lora_rank, "alpha": lora_alpha}
    with connect(ctx) as client:
        # Every option is checked, and every path found, before anything is uploaded.
        body = fine_tuning_job_body(
            model=model,
            training_file=file,
            validation_file=validation_file,
            hyperparameters={k: v for k, v in hyperparameters.items() if v is not None} or None,
            suffix=suffix,
            seed=seed,
            lora={k: v for k, v in lora.items() if v is not None} or None,
        )
        training_ref = _file_ref(file)
        validation_ref = _file_ref(validation_file) if validation_file is not None else None
        update = {"training_file": _file_id(client, training_ref)}
        if validation_ref is not None:
            update["validation_file"] = _file_id(client, validation_ref)
        job = client.create_fine_tuning_job(body.model_copy(update=update))
        if not follow:
            if json_mode:
                render(job, JOB, json_mode)
            else:
                say(f"created fine-tuning job {job.id} ({job.status})", style="green")
                _note(f"follow it with `deepflow finetune follow {job.id}`")
            return
        _note(f"created fine-tuning job {job.id}")
        _finish(_follow(client, job.id), json_mode)


@app.command("follow")
def follow_(ctx: typer.Context, job_id: JobArg, json_mode: JsonOpt = False) -> None:
    """Show a job's progress until it ends; exit 1 if it fails or is cancelled."""
    with connect(ctx) as client:
        _finish(_follow(client, job_id), json_mode)


@app.command("list")
def list_(
    ctx: typer.Context, limit: LimitOpt = 20, after: AfterOpt = None, json_mode: JsonOpt = False
) -> None:
    """List fine-tuning jobs, newest first."""
    with connect(ctx) as client:
        page = client.list_fine_tuning_jobs(after=after, limit=limit)
    render(page.items, JOB_LIST, json_mode, title="fine-tuning jobs")
    _more(page.items, page.has_more, "list")


@app.command()
def get(ctx: typer.Context, job_id: JobArg, json_mode: JsonOpt = False) -> None:
    """Show a fine-tuning job."""
    with connect(ctx) as client:
        job = client.get_fine_tuning_job(job_id)
    render(job, JOB, json_mode)


@app.command()
def cancel(ctx: typer.Context, job_id: JobArg, json_mode: JsonOpt = False) -> None:
    """Cancel a fine-tuning job (its training stops within seconds)."""
    with connect(ctx) as client:
        job = client.cancel_fine_tuning_job(job_id)
    if json_mode:
        render(job, JOB, json_mode)
    else:
        say(f"fine-tuning job {job.id}: {job.status}")


def _print_events(events: list[FineTuningEvent], json_mode: bool) -> None:
    for event in events:
        if json_mode:
            typer.echo(event.model_dump_json())
        else:
            say(fine_tune_follow.event_line(event))


@app.command()
def events(
    ctx: typer.Context,
    job_id: JobArg,
    limit: LimitOpt = 20,
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep printing new events until the job ends.")
    ] = False,
    json_mode: Annotated[
        bool, typer.Option("--json", help="Print JSON (one object a line with --follow).")
    ] = False,
) -> None:
    """Show a job's latest events, oldest first."""
    with connect(ctx) as client:
        if follow:
            try:
                job = fine_tune_follow.watch(
                    client, job_id, lambda _, new: _print_events(new, json_mode), backlog=limit
                )
            except KeyboardInterrupt:
                raise CliError(
                    f"stopped following; job {job_id} keeps running", ExitCode.INTERRUPTED
                ) from None
            _outcome(job)
            return
        page = client.list_fine_tuning_events(job_id, limit=limit)
    render(page.items[::-1], EVENT, json_mode, title="events")


@app.command()
def checkpoints(
    ctx: typer.Context,
    job_id: JobArg,
    limit: LimitOpt = 10,
    after: AfterOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """List a job's checkpoints, newest first."""
    with connect(ctx) as client:
        page = client.list_fine_tuning_checkpoints(job_id, after=after, limit=limit)
    render(page.items, CHECKPOINT, json_mode, title="checkpoints")
    _more(page.items, page.has_more, f"checkpoints {job_id}")
