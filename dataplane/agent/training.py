"""Starts, follows and stops the trainer processes of this node (fine-tuning `train` tasks).

Each task has one follower: it reads the trainer's stdout line by line as it comes
(`training_states.parse_line`), turns the lines into reports, and once stdout closes reaps the
process and asks `training_states.judge_exit` how the run ended. `_move` is the one place a
state changes; every report goes to `on_change` (the reporter pushes it to the control plane).
A trainer is a new `python -m dataplane.training` process, or a warm pod taken from the node's
pool that became one (`executor`); both write the same lines to the pipe and stop the same way.

What the control plane receives for one run, in order:

    starting                              spawned, or handed to a warm pod
    running   progress                    each progress line (the first: starting -> running)
    running   progress checkpoint         each checkpoint line
    succeeded progress result             result line, then exit 0
  | failed    progress exit_code reason   error line / non-zero exit / killed / no result
  | stopped   progress exit_code reason   after DELETE or agent shutdown

The result and error lines are not pushed on their own: they ride the terminal report. Every
pushed report carries the latest progress (a gauge), a checkpoint only the report its own line
made (an event). `get`, `reports` (and so the heartbeat) carry the latest checkpoint too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from controlplane.wire import (
    TrainingCheckpoint,
    TrainingProgress,
    TrainingReport,
    TrainingResult,
    TrainingStart,
)
from dataplane.agent import process
from dataplane.agent.errors import ShuttingDown, SpawnFailed, TaskRunning, UnknownTask
from dataplane.agent.training_launch import (
    TrainerCommand,
    check_training_start,
    spawn_trainer,
    trainer_command,
    write_spec,
)
from dataplane.agent.training_states import (
    Exit,
    TrainerError,
    TrainerLine,
    TrainingState,
    check_transition,
    judge_exit,
    parse_line,
)
from dataplane.scaleout.errors import PodUnavailable
from dataplane.scaleout.pool import WarmPool

log = logging.getLogger(__name__)

OnChange = Callable[[TrainingReport], None]
Executor = Literal["warm_pod", "process"]  # what runs the trainer
LINE_LIMIT = 1 << 20  # bytes; a longer stdout line is skipped
# After SIGKILL the group is gone and stdout closes at once; this only bounds a stuck pipe.
FOLLOW_AFTER_KILL_S = 5.0


@dataclass(slots=True)
class TrainingTask:
    start: TrainingStart
    log_path: Path
    proc: subprocess.Popen[bytes]  # the trainer: its own process, or a warm pod become it
    stdout: IO[bytes]  # the trainer's JSON lines
    executor: Executor
    state: TrainingState = TrainingState.STARTING
    progress: TrainingProgress | None = None
    checkpoint: TrainingCheckpoint | None = None  # the latest
    result: TrainingResult | None = None
    error: str | None = None  # the message of the trainer's error line
    exit_code: int | None = None
    reason: str | None = None
    stop_requested: bool = False
    follower: asyncio.Task[None] | None = None
    stopper: asyncio.Task[TrainingReport] | None = None

    def report(self, *, with_checkpoint: bool = True) -> TrainingReport:
        return TrainingReport(
            task_id=self.start.task_id,
            state=self.state.value,
            pid=self.proc.pid,
            executor=self.executor,
            progress=self.progress,
            checkpoint=self.checkpoint if with_checkpoint else None,
            result=self.result if self.state is TrainingState.SUCCEEDED else None,
            exit_code=self.exit_code,
            reason=self.reason,
        )


class TrainingSupervisor:
    def __init__(
        self,
        *,
        log_dir: Path,
        spec_dir: Path,
        on_change: OnChange,
        command_for: TrainerCommand = trainer_command,
        stop_grace_s: float = 5.0,
        pool: WarmPool | None = None,
    ) -> None:
        """`pool`: the node's warm pods; a task takes a ready one (skipping the trainer's torch
        and transformers imports) and runs `command_for`'s process when none is ready."""
        self._log_dir = log_dir
        self._spec_dir = spec_dir
        self._on_change = on_change
        self._command_for = command_for
        self._stop_grace_s = stop_grace_s
        self._pool = pool
        self._tasks: dict[str, TrainingTask] = {}
        self._closing = False

    # -- queries -------------------------------------------------------------------------------

    def reports(self) -> list[TrainingReport]:
        return [task.report() for task in self._tasks.values()]

    def get(self, task_id: str) -> TrainingReport:
        return self._find(task_id).report()

    # -- commands ------------------------------------------------------------------------------

    def start(self, start: TrainingStart) -> TrainingReport:
        """Spawn the trainer and begin following it; returns its report (state `starting`).

        A task id whose earlier run ended is started again (a restart from a checkpoint); one
        still running raises `TaskRunning`.
        """
        if self._closing:
            raise ShuttingDown()
        check_training_start(start)
        existing = self._tasks.get(start.task_id)
        if existing is not None and not existing.state.is_terminal:
            raise TaskRunning(start.task_id)
        log_path = self._log_dir / f"{start.task_id}.log"
        try:
            spec_path = write_spec(self._spec_dir, start)
            task = self._in_warm_pod(start, spec_path, log_path)
            if task is None:
                proc = spawn_trainer(self._command_for(spec_path), log_path)
                assert proc.stdout is not None  # spawned with stdout=PIPE
                task = TrainingTask(start, log_path, proc, proc.stdout, executor="process")
        except OSError as exc:
            raise SpawnFailed(start.task_id, exc, entity="training task") from exc
        self._tasks[start.task_id] = task
        log.info("training %s: %s pid %d", start.task_id, task.executor, task.proc.pid)
        self._on_change(task.report())
        task.follower = asyncio.create_task(self._follow(task), name=f"train-{start.task_id}")
        return task.report()

    async def stop(self, task_id: str) -> TrainingReport:
        """Stop the trainer (SIGTERM, grace, SIGKILL) and forget the task; its last report.

        A live task ends `stopped`; one that had ended keeps its state. Concurrent calls share
        one stop, and a caller that goes away does not interrupt it.
        """
        task = self._find(task_id)
        if task.stopper is None:
            task.stopper = asyncio.create_task(self._stop(task), name=f"stop-train-{task_id}")
        return await asyncio.shield(task.stopper)

    async def stop_all(self) -> None:
        """Refuse new starts and stop every trainer: the agent leaves no orphans."""
        self._closing = True
        ids = list(self._tasks)
        results = await asyncio.gather(*(self.stop(i) for i in ids), return_exceptions=True)
        for task_id, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, UnknownTask):
                log.error("training %s: stop failed: %r", task_id, result)

    # -- internals -----------------------------------------------------------------------------

    def _find(self, task_id: str) -> TrainingTask:
        task = self._tasks.get(task_id)
        if task is None:
            raise UnknownTask(task_id)
        return task

    def _in_warm_pod(
        self, start: TrainingStart, spec_path: Path, log_path: Path
    ) -> TrainingTask | None:
        """The task in a ready pod; the next ready one if a pod will not take it; None when
        none is ready."""
        while (pod := self._pool.take(0.0) if self._pool is not None else None) is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                stdout = pod.start_training(spec_path, log_path)
            except PodUnavailable as exc:
                log.warning("training %s: %s", start.task_id, exc)
                continue
            return TrainingTask(start, log_path, pod.proc, stdout, executor="warm_pod")
        return None

    def _move(self, task: TrainingTask, to_state: TrainingState, reason: str) -> None:
        check_transition(task.state, to_state)
        log.info(
            "training %s: %s -> %s (%s)",
            task.start.task_id,
            task.state.value,
            to_state.value,
            reason.splitlines()[0] if reason else reason,
        )
        task.state = to_state
        task.reason = reason
        self._on_change(task.report(with_checkpoint=False))

    def _apply(self, task: TrainingTask, line: TrainerLine) -> None:
        if isinstance(line, TrainingProgress):
            task.progress = line
            if task.state is TrainingState.STARTING:
                self._move(task, TrainingState.RUNNING, "first step done")
            else:
                self._on_change(task.report(with_checkpoint=False))
        elif isinstance(line, TrainingCheckpoint):
            task.checkpoint = line
            self._on_change(task.report())
        elif isinstance(line, TrainingResult):
            task.result = line  # reported with `succeeded`, once the trainer exits 0
        elif isinstance(line, TrainerError):
            task.error = line.message  # reported with `failed`

    async def _stop(self, task: TrainingTask) -> TrainingReport:
        if not task.state.is_terminal:
            task.stop_requested = True
            await process.terminate(task.proc, self._stop_grace_s)
            if task.follower is not None:
                await self._await_follower(task, task.follower)
        if self._tasks.get(task.start.task_id) is task:
            del self._tasks[task.start.task_id]
        return task.report()

    async def _await_follower(self, task: TrainingTask, follower: asyncio.Task[None]) -> None:
        """The follower ends the task once stdout closes; a pipe some escaped process holds
        open must not hang the stop, so it is cut off after a while."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(follower), FOLLOW_AFTER_KILL_S)
        if not follower.done():
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        if not task.state.is_terminal:
            task.exit_code = await process.reap(task.proc)
            self._move(task, TrainingState.STOPPED, "stopped on request")

    async def _follow(self, task: TrainingTask) -> None:
        try:
            await self._follow_until_exit(task)
        except Exception as exc:
            # A bug here must not pass silently: the task would stay `running` forever.
            log.exception("training %s: follower crashed", task.start.task_id)
            if not task.state.is_terminal:
                process.kill_group(task.proc)
                task.exit_code = await process.reap(task.proc)
                self._move(task, TrainingState.FAILED, f"the node agent lost the trainer: {exc}")

    async def _follow_until_exit(self, task: TrainingTask) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), task.stdout
        )
        try:
            while True:
                try:
                    raw = await reader.readline()
                except ValueError:  # longer than LINE_LIMIT: skipped
                    log.warning("training %s: stdout line too long", task.start.task_id)
                    continue
                if not raw:
                    break
                line = parse_line(raw)
                if line is None:
                    self._keep_stray(task, raw)
                else:
                    self._apply(task, line)
        finally:
            transport.close()
        task.exit_code = await process.reap(task.proc)
        process.kill_group(task.proc)  # whatever it left behind in its group
        ending = judge_exit(
            Exit(
                exit_code=task.exit_code,
                stop_requested=task.stop_requested,
                has_result=task.result is not None,
                error=task.error,
                log_tail=process.log_tail(task.log_path),
            )
        )
        self._move(task, ending.to_state, ending.reason)

    def _keep_stray(self, task: TrainingTask, raw: bytes) -> None:
        """A stdout line outside the protocol (a library's print) goes to the task's log."""
        try:
            with task.log_path.open("ab") as f:
                f.write(b"[stdout] " + raw if raw.endswith(b"\n") else b"[stdout] " + raw + b"\n")
        except OSError as exc:
            log.warning("training %s: cannot write its log: %s", task.start.task_id, exc)
