"""`deepflow finetune ...` against a fake control plane: create (uploading local files first),
following a job to its end, list/get/cancel/events/checkpoints, errors and exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest
from cli_fakes import FakeApi, Invoke, error_reply
from fine_tune_fakes import T0, checkpoint, file_object, job, message, metrics, page
from rich.console import Console

from deepflow_cli import fine_tune_follow
from deepflow_cli.client import DeepFlowClient
from deepflow_cli.errors import ExitCode
from deepflow_cli.fine_tune_follow import (
    LiveView,
    PlainView,
    StepMetrics,
    eta_s,
    live_view,
    progress_detail,
    unseen_events,
)

JOBS = "/v1/fine_tuning/jobs"
JOB = f"{JOBS}/ftjob-1"
EVENTS = f"{JOB}/events"
MODEL = "ft:tiny:demo:ftjob-1"

CREATED = message("ftevent-1", "Created fine-tuning job", T0)
STARTED = message("ftevent-2", "Fine-tuning job started", T0 + 10)
STEP_2 = metrics(2, 8, 2.5, T0 + 12)
STEP_4 = metrics(4, 8, 1.75, T0 + 14)
STEP_8 = metrics(8, 8, 1.25, T0 + 18)
DONE = message("ftevent-9", "The job has successfully completed", T0 + 20)


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fine_tune_follow, "POLL_INTERVAL_S", 0.0)
    # However slow the machine, the polls of one test are closer together than this.
    monkeypatch.setattr(fine_tune_follow, "PLAIN_EVERY_S", 60.0)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    return path


# -- create ---------------------------------------------------------------------------------------


def test_create_with_a_file_id_sends_only_the_given_options(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", JOBS, job())
    result = cli(
        "finetune", "create", "-m", "tiny", "-f", "file-abc", "--epochs", "3",
        "--lr-multiplier", "0.5", "--suffix", "demo", "--seed", "7", "--lora-rank", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "ftjob-1" in result.stdout and "queued" in result.stdout
    assert api.bodies("POST", JOBS) == [
        {
            "model": "tiny",
            "training_file": "file-abc",
            "hyperparameters": {"n_epochs": 3, "learning_rate_multiplier": 0.5},
            "suffix": "demo",
            "seed": 7,
            "lora": {"rank": 16},
        }
    ]


def test_create_uploads_local_files_first(api: FakeApi, cli: Invoke, dataset: Path) -> None:
    valid = dataset.with_name("valid.jsonl")
    valid.write_text(dataset.read_text())
    api.on("POST", "/v1/files", file_object("file-train"), file_object("file-valid"))
    api.on("POST", JOBS, job())
    result = cli(
        "finetune", "create", "--model", "tiny", "--file", str(dataset),
        "--validation-file", str(valid), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == "ftjob-1"  # notes went to stderr
    assert "uploaded train.jsonl as file-train" in result.stderr
    uploads = [r for r in api.seen if r.url.path == "/v1/files"]
    assert [b'filename="train.jsonl"' in r.content for r in uploads] == [True, False]
    (body,) = api.bodies("POST", JOBS)
    assert body["training_file"] == "file-train" and body["validation_file"] == "file-valid"


def test_create_checks_everything_before_uploading(
    api: FakeApi, cli: Invoke, dataset: Path
) -> None:
    missing = cli("finetune", "create", "-m", "tiny", "-f", str(dataset), "--validation-file", "x")
    assert missing.exit_code == ExitCode.ERROR
    assert missing.stderr.strip() == "error: x is neither a local file nor a file id (file-...)"

    bad = cli("finetune", "create", "-m", "tiny", "-f", str(dataset), "--suffix", "no spaces!")
    assert bad.exit_code == ExitCode.ERROR and "suffix" in bad.stderr
    assert api.seen == []


def test_create_refused_by_the_api(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", JOBS, error_reply(404, "model nope not found", "not_found"))
    result = cli("finetune", "create", "-m", "nope", "-f", "file-abc")
    assert result.exit_code == ExitCode.NOT_FOUND
    assert result.stderr.strip() == "error: model nope not found"


# -- following ------------------------------------------------------------------------------------


def test_follow_queued_running_succeeded(api: FakeApi, cli: Invoke, dataset: Path) -> None:
    api.on("POST", "/v1/files", file_object("file-train"))
    api.on("POST", JOBS, job())
    api.on(
        "GET",
        JOB,
        job("queued"),
        job("running"),
        job("running"),
        job("succeeded", fine_tuned_model=MODEL),
    )
    api.on(
        "GET",
        EVENTS,
        page([CREATED]),
        page([STEP_2, STARTED, CREATED]),
        page([STEP_4, STEP_2, STARTED, CREATED]),
        page([DONE, STEP_8, STEP_4, STEP_2, STARTED, CREATED]),
    )
    result = cli("finetune", "create", "-m", "tiny", "-f", str(dataset), "--follow")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[0] == f"fine-tuned model: {MODEL}"
    err = result.stderr
    order = [
        err.index(s)
        for s in (
            "uploaded train.jsonl",
            "status: queued",
            "Created fine-tuning job",
            "status: running",
            "Fine-tuning job started",
            "step 2/8 · loss 2.5000 · ETA -",
            "status: succeeded",
            "step 8/8 · loss 1.2500 · ETA 0s",
            "successfully completed",
        )
    ]
    assert order == sorted(order)
    assert err.count("Created fine-tuning job") == 1  # each event shown once
    # Not a terminal: progress as lines, the polls close together throttled to the first and last.
    assert "step 4/8" not in err
    assert "\x1b[" not in err
    assert "deepflow deploy NAME --model " + MODEL in err


def test_follow_a_failed_job_exits_1_with_its_error(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", JOBS, job())
    api.on("GET", JOB, job("running"), job("failed", error="trainer exited with code 1"))
    api.on("GET", EVENTS, page([STARTED]), page([message("ftevent-x", "boom", T0 + 11, "error")]))
    result = cli("finetune", "create", "-m", "tiny", "-f", "file-abc", "--follow")
    assert result.exit_code == ExitCode.ERROR
    assert result.stderr.strip().splitlines()[-1] == (
        "error: fine-tuning job ftjob-1 failed: trainer exited with code 1"
    )
    assert "error: boom" in result.stderr
    assert result.stdout == ""


def test_follow_json_prints_the_final_job_even_when_cancelled(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", JOB, job("cancelled"))
    api.on("GET", EVENTS, page([]))
    result = cli("finetune", "follow", "ftjob-1", "--json")
    assert result.exit_code == ExitCode.ERROR
    assert json.loads(result.stdout)["status"] == "cancelled"
    assert "was cancelled" in result.stderr


def test_ctrl_c_while_following_leaves_the_job_running(api: FakeApi, cli: Invoke) -> None:
    def interrupt(request: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    api.on("POST", JOBS, job())
    api.on("GET", JOB, job("running"), interrupt)
    api.on("GET", EVENTS, page([STARTED]))
    result = cli("finetune", "create", "-m", "tiny", "-f", "file-abc", "--follow")
    assert result.exit_code == ExitCode.INTERRUPTED
    assert "ftjob-1 keeps running" in result.stderr
    assert "deepflow finetune cancel ftjob-1" in result.stderr
    assert not [r for r in api.seen if r.url.path.endswith("/cancel")]


def test_events_follow_prints_each_event_once_then_ends(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", JOB, job("running"), job("succeeded", fine_tuned_model=MODEL))
    api.on(
        "GET",
        EVENTS,
        page([STEP_2, STARTED], has_more=True),
        page([DONE, STEP_8, STEP_4, STEP_2]),
    )
    result = cli("finetune", "events", "ftjob-1", "--follow", "--limit", "2", "--json")
    assert result.exit_code == 0, result.output
    ids = [json.loads(line)["id"] for line in result.stdout.splitlines()]
    assert ids == [STARTED.id, STEP_2.id, STEP_4.id, STEP_8.id, DONE.id]
    # only the newest `--limit` events at first, however many there are
    assert api.seen[1].url.params["limit"] == "2"


# -- the views: a bar on a terminal, lines elsewhere -----------------------------------------------


def _console(**kwargs: object) -> tuple[Console, io.StringIO]:
    sink = io.StringIO()
    return Console(file=sink, width=120, highlight=False, **kwargs), sink  # type: ignore[arg-type]


def test_a_terminal_gets_the_bar_and_anything_else_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TERM", raising=False)
    terminal, _ = _console(force_terminal=True)
    with live_view("ftjob-1", terminal) as view:
        assert isinstance(view, LiveView)
        view(job("running"), [STARTED, STEP_2, STEP_4])
        (task,) = view.bar.tasks
        assert (task.completed, task.total) == (4, 8)
        assert task.fields["detail"] == "step 4/8 · loss 1.7500 · ETA 4s"
    with live_view("ftjob-1", _console()[0]) as view:
        assert isinstance(view, PlainView)
    monkeypatch.setenv("TERM", "dumb")
    with live_view("ftjob-1", terminal) as view:
        assert isinstance(view, PlainView)


def test_plain_lines_at_most_every_few_seconds_and_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fine_tune_follow, "PLAIN_EVERY_S", 5.0)
    console, sink = _console()
    times = iter([0.0, 3.0, 6.0, 7.0, 7.0, 7.0])
    view = PlainView(console, now=lambda: next(times))
    view(job("running"), [STARTED, STEP_2])  # t=0: the first progress
    view(job("running"), [STEP_4])  # t=3: too soon
    view(job("running"), [metrics(6, 8, 1.5, T0 + 16)])  # t=6: 5 s on
    view(job("running"), [STEP_8])  # t=7: too soon, but a message follows
    view(job("running"), [message("ftevent-c", "Checkpoint created at step 8", T0 + 18)])
    view(job("succeeded"), [DONE])
    lines = [line.split("  ", 1)[-1] for line in sink.getvalue().splitlines()]
    assert lines == [
        "status: running",
        "Fine-tuning job started",
        "step 2/8 · loss 2.5000 · ETA -",
        "step 6/8 · loss 1.5000 · ETA 2s",
        "step 8/8 · loss 1.2500 · ETA 0s",
        "Checkpoint created at step 8",
        "status: succeeded",
        "The job has successfully completed",
    ]


def test_plain_lines_show_the_last_progress_when_the_job_ends() -> None:
    console, sink = _console()
    view = PlainView(console)
    view(job("running"), [STEP_2])
    view(job("cancelled"), [STEP_4])  # well within PLAIN_EVERY_S, but the last word
    assert sink.getvalue().splitlines()[-1].endswith("step 4/8 · loss 1.7500 · ETA 4s")


# -- progress (pure) ------------------------------------------------------------------------------


def test_eta_from_the_pace_between_two_observations() -> None:
    first = StepMetrics(at=100.0, step=10, total_steps=110, loss=2.0)
    latest = StepMetrics(at=120.0, step=20, total_steps=110, loss=1.5)
    assert eta_s(first, latest) == pytest.approx(180.0)  # 2 s a step, 90 steps left
    assert eta_s(first, first) is None
    assert progress_detail(first, latest) == "step 20/110 · loss 1.5000 · ETA 3m 00s"
    assert progress_detail(first, first).endswith("ETA -")


def test_unseen_events_pages_back_until_a_seen_event() -> None:
    fake = FakeApi()
    fake.on(
        "GET",
        EVENTS,
        page([STEP_8, STEP_4], has_more=True),
        page([STEP_2, STARTED], has_more=True),
    )
    client = DeepFlowClient("http://cp.test", transport=fake.transport())
    seen = {STARTED.id, CREATED.id}
    fresh = unseen_events(client, "ftjob-1", seen, page_back=True, limit=2)
    assert [e.id for e in fresh] == [STEP_2.id, STEP_4.id, STEP_8.id]
    assert [r.url.params.get("after") for r in fake.seen] == [None, STEP_4.id]
    assert seen >= {STEP_2.id, STEP_4.id, STEP_8.id}


# -- list, get, cancel, events, checkpoints -------------------------------------------------------


def test_list_passes_the_cursor_and_hints_at_the_next_page(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", JOBS, page([job("running", job_id="ftjob-3"), job(job_id="ftjob-2")], True))
    result = cli("finetune", "list", "--limit", "2", "--after", "ftjob-4")
    assert result.exit_code == 0, result.output
    assert "ftjob-3" in result.stdout and "running" in result.stdout
    assert "deepflow finetune list --after ftjob-2" in result.stderr
    assert dict(api.seen[0].url.params) == {"after": "ftjob-4", "limit": "2"}

    data = json.loads(cli("finetune", "list", "--json").stdout)
    assert [j["id"] for j in data] == ["ftjob-3", "ftjob-2"]


def test_get_table_and_json(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", JOB, job("failed", error="out of memory"))
    result = cli("finetune", "get", "ftjob-1")
    assert result.exit_code == 0, result.output
    assert "out of memory" in result.stdout and "file-abc" in result.stdout
    data = json.loads(cli("finetune", "get", "ftjob-1", "--json").stdout)
    assert data["hyperparameters"]["n_epochs"] == 2 and data["error"]["code"] == "train_failed"


def test_get_unknown_exits_4(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/v1/fine_tuning/jobs/nope", error_reply(404, "no fine-tuning job nope"))
    result = cli("finetune", "get", "nope")
    assert result.exit_code == ExitCode.NOT_FOUND
    assert result.stderr.strip() == "error: no fine-tuning job nope"


def test_cancel(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", f"{JOB}/cancel", job("cancelled"))
    result = cli("finetune", "cancel", "ftjob-1")
    assert result.exit_code == 0 and "ftjob-1: cancelled" in result.stdout
    assert json.loads(cli("finetune", "cancel", "ftjob-1", "--json").stdout)["status"] == (
        "cancelled"
    )


def test_cancel_a_finished_job_is_refused(api: FakeApi, cli: Invoke) -> None:
    api.on("POST", f"{JOB}/cancel", error_reply(400, "job ftjob-1 has already succeeded"))
    result = cli("finetune", "cancel", "ftjob-1")
    assert result.exit_code == ExitCode.ERROR
    assert result.stderr.strip() == "error: job ftjob-1 has already succeeded"


def test_events_oldest_first(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", EVENTS, page([STEP_2, STARTED, CREATED]))
    result = cli("finetune", "events", "ftjob-1")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.index("Created") < out.index("started") < out.index("Step 2/8")
    data = json.loads(cli("finetune", "events", "ftjob-1", "--json").stdout)
    assert [e["id"] for e in data] == [CREATED.id, STARTED.id, STEP_2.id]
    assert data[-1]["data"]["train_loss"] == 2.5


def test_checkpoints(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", f"{JOB}/checkpoints", page([checkpoint(8), checkpoint(4)]))
    result = cli("finetune", "checkpoints", "ftjob-1")
    assert result.exit_code == 0, result.output
    assert "ckpt-step-8" in result.stdout and "train_loss=1.25" in result.stdout
    data = json.loads(cli("finetune", "checkpoints", "ftjob-1", "--json").stdout)
    assert [c["step_number"] for c in data] == [8, 4]
