"""The fine-tune executor: one `fine_tune` request, four jobs, one task each (plus one per restart).

    validate  (control plane)  reads the files again; bad ones fail the job
    train     (a node)         POST /training to the least busy ready node; the agent pushes
                               TrainingReports (progress, checkpoint, result) to `apply_report`
    evaluate  (control plane)  records the validation loss of the result
    register  (control plane)  registers the merged folder as the model ft:<base>:<suffix>:<id>

A trainer that fails, a node that is lost and a node silent past `training_report_timeout_s` all
end the attempt; the training restarts from the last checkpoint on another task, at most
`fine_tune_max_restarts` times, then the job fails. Every change to one job's records happens
under that job's lock, so cancel, reports, the watcher and the steps never interleave. The agent
is asked (`DELETE /training/{task_id}`) to stop or forget any task the control plane no longer
wants: a cancelled job's, a failed attempt's, a finished one's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy.orm import Session

from controlplane import wire
from controlplane.chat_jsonl import check_file
from controlplane.db import file_store
from controlplane.db import fine_tune_store as fts
from controlplane.db.session import Database
from controlplane.errors import Conflict, NotFound
from controlplane.jobs import fine_tune_plan as plan
from controlplane.jobs import fine_tune_steps as steps
from controlplane.jobs.chat_run import new_id
from controlplane.settings import Settings
from controlplane.states import (
    FineTuneState,
    JobKind,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

QUEUE_POLL_S = 1.0


class FineTuneExecutor:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        http: httpx.AsyncClient,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.db = db
        self.http = http
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._last_report: dict[str, float] = {}  # task id -> when its node last reported it
        self._stopping: set[str] = set()  # task ids with a DELETE under way
        self._stale: list[tuple[str, str]] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def recover(self) -> int:
        """Before serving: fail the jobs a previous control plane left in flight. Returns how
        many; their trainings are stopped once `start` runs."""
        now = self.clock()
        ids = self.db.call(fts.in_flight_ids)
        self._stale = self.db.call(lambda s: fts.fail_in_flight(s, now, "control plane restarted"))
        return len(ids)

    def start(self) -> None:
        for url, task_id in self._stale:
            self._spawn(self._stop_training(url, task_id))
        self._stale = []
        self._spawn(self._watch())

    async def close(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _lock(self, fine_tune_id: str) -> asyncio.Lock:
        return self._locks.setdefault(fine_tune_id, asyncio.Lock())

    # -- the API ------------------------------------------------------------------------------

    async def create(self, spec: wire.FineTuningJobCreate) -> wire.FineTuningJob:
        fine_tune_id = new_id("ftjob")
        now = self.clock()
        output_dir = self.settings.fine_tunes_dir / fine_tune_id
        job = await self.db.run(lambda s: steps.create(s, spec, fine_tune_id, output_dir, now))
        self._spawn(self._guarded(fine_tune_id, self._run(fine_tune_id)))
        return job

    async def cancel(self, fine_tune_id: str) -> wire.FineTuningJob:
        now = self.clock()

        def write(s: Session) -> tuple[wire.FineTuningJob, list[tuple[str, str]]]:
            row = fts.get_fine_tune(s, fine_tune_id)
            to_stop = []
            if row.state in fts.IN_FLIGHT:
                to_stop = fts.settle(s, row, FineTuneState.CANCELLED, "cancelled by the user", now)
            elif row.state != FineTuneState.CANCELLED:
                raise Conflict(
                    f"fine-tuning job {fine_tune_id} has already {row.state}; it cannot be "
                    "cancelled",
                    code="job_finished",
                )
            return fts.job_object(row), to_stop

        async with self._lock(fine_tune_id):
            job, to_stop = await self.db.run(write)
        for url, task_id in to_stop:
            self._spawn(self._stop_training(url, task_id))
        return job

    async def apply_report(self, report: wire.TrainingReport) -> None:
        """One report from a node agent (pushed, or carried by a heartbeat)."""
        found = await self.db.run(lambda s: fts.fine_tune_of_task(s, report.task_id))
        if found is None:
            raise NotFound(f"task {report.task_id} not found")
        fine_tune_id = found[2].id
        async with self._lock(fine_tune_id):
            now = self.clock()
            outcome = await self.db.run(lambda s: steps.record_report(s, report, now))
            if isinstance(outcome, steps.Unwanted):
                if outcome.node_url is not None:
                    self._spawn(self._stop_training(outcome.node_url, report.task_id))
                return
            self._last_report[report.task_id] = now
            if isinstance(outcome, steps.AttemptFailed):
                await self._attempt_failed(fine_tune_id, report.task_id, outcome.why)
            elif isinstance(outcome, steps.TrainingDone):
                self._last_report.pop(report.task_id, None)
                try:
                    await self._finish(fine_tune_id)
                except Exception as exc:  # the job must not stay running with nothing to run
                    log.exception("fine-tuning job %s: finishing failed", fine_tune_id)
                    why = f"internal error: {exc.__class__.__name__}: {exc}"
                    await self._fail_locked(fine_tune_id, why, "server_error")

    async def heartbeat(self, node_id: str, reports: list[wire.TrainingReport]) -> None:
        """The node's view of its trainings: each is a report, and a training it should hold
        but does not list (for longer than a heartbeat can lag) has ended without a word."""
        for report in reports:
            try:
                await self.apply_report(report)
            except NotFound:
                log.info("node %s holds unknown training task %s", node_id, report.task_id)
            except Exception:  # noqa: BLE001 - one bad report must not fail the heartbeat
                log.exception("training report %s from node %s", report.task_id, node_id)
        held = {r.task_id for r in reports}
        grace = 3 * self.settings.node_timeout_s
        views, _ = await self.db.run(fts.trainings_in_flight)
        for view in views:
            if view.node_id == node_id and view.task_id not in held:
                if self.clock() - view.dispatched_at > grace:
                    async with self._lock(view.fine_tune_id):
                        why = f"node {view.node_name or node_id} no longer runs it"
                        await self._attempt_failed(view.fine_tune_id, view.task_id, why)

    # -- the steps ----------------------------------------------------------------------------

    async def _guarded(self, fine_tune_id: str, work: Coroutine[Any, Any, None]) -> None:
        """A step that breaks unexpectedly fails its job rather than leaving it in flight."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("fine-tuning job %s: step failed", fine_tune_id)
            why = f"internal error: {exc.__class__.__name__}: {exc}"
            await self._fail(fine_tune_id, why, "server_error")

    async def _fail(self, fine_tune_id: str, why: str, code: str) -> None:
        async with self._lock(fine_tune_id):
            await self._fail_locked(fine_tune_id, why, code)

    async def _fail_locked(self, fine_tune_id: str, why: str, code: str) -> None:
        now = self.clock()

        def write(s: Session) -> list[tuple[str, str]]:
            row = fts.get_fine_tune(s, fine_tune_id)
            if row.state not in fts.IN_FLIGHT:
                return []
            return fts.settle(s, row, FineTuneState.FAILED, why, now, error_code=code)

        for url, task_id in await self.db.run(write):
            self._spawn(self._stop_training(url, task_id))

    async def _run(self, fine_tune_id: str) -> None:
        if await self._validate(fine_tune_id):
            await self._dispatch(fine_tune_id, frozenset())

    async def _validate(self, fine_tune_id: str) -> bool:
        now = self.clock()

        def begin(s: Session) -> list[tuple[str, str, str]] | None:
            row = fts.get_fine_tune(s, fine_tune_id)
            if row.state != FineTuneState.VALIDATING_FILES:
                return None
            fts.start_step(s, row, JobKind.FINE_TUNE_VALIDATE, "validating files", now)
            files = [("training_file", row.training_file)]
            if row.validation_file is not None:
                files.append(("validation_file", row.validation_file))
            return [(param, fid, file_store.get_file(s, fid).path) for param, fid in files]

        async with self._lock(fine_tune_id):
            files = await self.db.run(begin)
        if files is None:
            return False
        problems: list[tuple[str, str]] = []  # (error code, message)
        counts = []
        for param, file_id, path in files:
            check = await asyncio.to_thread(check_file, Path(path))
            counts.append(f"{check.num_examples} {param.split('_')[0]} examples")
            if not check.ok:
                message = f"{param} {file_id} is not valid chat JSONL: {check.describe()}"
                problems.append((f"invalid_{param}", message))
        now = self.clock()

        def end(s: Session) -> bool:
            row = fts.get_fine_tune(s, fine_tune_id)
            if row.state != FineTuneState.VALIDATING_FILES:
                return False
            job = fts.job_of(s, row.request_id, JobKind.FINE_TUNE_VALIDATE)
            task = fts.task_of(s, job.id)
            if problems:
                code, message = problems[0]
                fts.settle(s, row, FineTuneState.FAILED, message, now, error_code=code)
                return False
            fts.finish_step(s, task, "files are valid", now)
            message = f"Files validated ({', '.join(counts)}); waiting for a node"
            fts.move_fine_tune(s, row, FineTuneState.QUEUED, message, now)
            return True

        async with self._lock(fine_tune_id):
            return await self.db.run(end)

    async def _dispatch(self, fine_tune_id: str, avoid: frozenset[str]) -> None:
        """Place the pending train task on a node (waiting for one if none is ready) and send it."""
        deadline = self.clock() + self.settings.training_queue_timeout_s
        while True:
            async with self._lock(fine_tune_id):
                placed = await self.db.run(
                    functools.partial(
                        steps.place, fine_tune_id=fine_tune_id, avoid=avoid, now=self.clock()
                    )
                )
                if isinstance(placed, steps.Dispatch):
                    await self._send(fine_tune_id, placed)
                    return
                if placed is None:
                    return  # the job ended meanwhile
            if self.clock() > deadline:
                wait = self.settings.training_queue_timeout_s
                why = f"no ready node to train on within {wait:.0f} s"
                await self._fail(fine_tune_id, why, "no_capacity")
                return
            await asyncio.sleep(QUEUE_POLL_S)

    async def _send(self, fine_tune_id: str, placed: steps.Dispatch) -> None:
        url = f"{placed.node.url}/training"
        try:
            reply = await self.http.post(url, content=placed.start.model_dump_json())
            if reply.status_code >= 300:
                raise httpx.HTTPStatusError(
                    f"{reply.status_code}: {reply.text[:300]}",
                    request=reply.request,
                    response=reply,
                )
        except httpx.HTTPError as exc:
            why = f"node {placed.node.name} refused the training: {exc}"
            await self._attempt_failed(fine_tune_id, placed.task_id, why)
            return
        now = self.clock()
        self._last_report[placed.task_id] = now

        def started(s: Session) -> None:
            row = fts.get_fine_tune(s, fine_tune_id)
            if row.state == FineTuneState.QUEUED:
                message = f"Fine-tuning job started on node {placed.node.name}"
                fts.move_fine_tune(s, row, FineTuneState.RUNNING, message, now)
            elif placed.restart:
                fts.add_event(s, row.id, f"Training restarted on node {placed.node.name}", now)

        await self.db.run(started)

    async def _attempt_failed(self, fine_tune_id: str, task_id: str, why: str) -> None:
        """Under the job's lock: end one training attempt; restart it or fail the job."""
        now = self.clock()
        limit = self.settings.fine_tune_max_restarts
        self._last_report.pop(task_id, None)
        decision = await self.db.run(lambda s: steps.end_attempt(s, task_id, why, limit, now))
        if decision is None:
            return
        restart, node_url, node_id, to_stop = decision
        if node_url is not None:
            self._spawn(self._stop_training(node_url, task_id))
        for url, other in to_stop:
            self._spawn(self._stop_training(url, other))
        if restart:
            avoid = frozenset({node_id}) if node_id else frozenset()
            self._spawn(self._guarded(fine_tune_id, self._dispatch(fine_tune_id, avoid)))

    async def _finish(self, fine_tune_id: str) -> None:
        """Under the job's lock, after a training succeeded: evaluate, then register."""
        now = self.clock()
        merged = await self.db.run(lambda s: steps.evaluate(s, fine_tune_id, now))
        if merged is None:
            return
        from dataplane.modelstore import ModelStoreError, inspect_folder

        try:
            info = await asyncio.to_thread(inspect_folder, Path(merged))
        except ModelStoreError as exc:
            why = f"the merged model is not a servable folder: {exc}"
            await self._fail_locked(fine_tune_id, why, "register_failed")
            return
        now = self.clock()
        await self.db.run(lambda s: steps.register(s, fine_tune_id, info, now))

    # -- watching and stopping ----------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.training_watch_interval_s)
            try:
                await self.check_trainings()
            except Exception:  # noqa: BLE001 - the watcher must survive one bad pass
                log.exception("checking trainings failed")

    async def check_trainings(self) -> None:
        """End the attempts whose node was lost or went silent."""
        views, nodes = await self.db.run(fts.trainings_in_flight)
        live = {v.task_id for v in views}
        for task_id in list(self._last_report):
            if task_id not in live:
                del self._last_report[task_id]
        found = plan.overdue(
            views,
            nodes,
            self._last_report,
            now=self.clock(),
            report_timeout_s=self.settings.training_report_timeout_s,
        )
        for view, why in found:
            async with self._lock(view.fine_tune_id):
                await self._attempt_failed(view.fine_tune_id, view.task_id, why)

    async def _stop_training(self, node_url: str, task_id: str) -> None:
        if task_id in self._stopping:
            return
        self._stopping.add(task_id)
        try:
            await self.http.delete(f"{node_url}/training/{task_id}", timeout=30.0)
        except httpx.HTTPError as exc:
            log.warning("stopping training %s on %s failed: %s", task_id, node_url, exc)
        finally:
            self._stopping.discard(task_id)
