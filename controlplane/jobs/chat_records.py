"""The records of one chat request being dispatched (jobs/chat.py): its request and job rows,
each task, a task's dispatch, and, when dispatch fails before a stream starts, all of them
settled together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane.db import tables as t
from controlplane.db.recorder import Recorder, Tracked
from controlplane.jobs.chat_run import ChatSpec, new_id
from controlplane.jobs.pd import prompt_text
from controlplane.routing.policy import InstanceLoad
from controlplane.states import JobKind, JobState, RequestKind, RequestState, TaskKind, TaskState


@dataclass(slots=True)
class Attempt:
    """The records of one request being dispatched: settled together if dispatch fails."""

    request: Tracked
    job: Tracked
    tasks: list[Tracked] = field(default_factory=list)


class AttemptRecords:
    """Writes a dispatch attempt's records: the request and its job, each task, a task's
    dispatch, and the settling of all of them when dispatch fails before a stream starts."""

    def __init__(self, recorder: Recorder, clock: Callable[[], float]) -> None:
        self.recorder = recorder
        self.clock = clock

    def create(self, spec: ChatSpec) -> Attempt:
        now = self.clock()
        request = Tracked("request", spec.generate.request_id, RequestState.QUEUED)
        job = Tracked("job", new_id("job"), JobState.PENDING)
        job_kind = JobKind.CHAT if spec.kind == RequestKind.CHAT_COMPLETION else JobKind.COMPLETION
        rows: list[t.Base] = [
            t.Request(
                id=request.id,
                kind=spec.kind.value,
                deployment=spec.deployment,
                state=request.state.value,
                created_at=now,
                prompt_chars=len(prompt_text(spec.generate)),
            ),
            t.Job(
                id=job.id,
                request_id=request.id,
                kind=job_kind.value,
                state=job.state.value,
                created_at=now,
            ),
        ]
        self.recorder.create(rows, [request, job], "accepted")
        return Attempt(request, job)

    def new_task(self, attempt: Attempt, kind: TaskKind, reason: str) -> Tracked:
        task = Tracked("task", new_id("task"), TaskState.PENDING)
        row = t.Task(
            id=task.id,
            job_id=attempt.job.id,
            kind=kind.value,
            state=task.state.value,
            created_at=self.clock(),
        )
        self.recorder.create([row], [task], reason)
        attempt.tasks.append(task)
        return task

    def dispatched(
        self,
        attempt: Attempt,
        task: Tracked,
        instance: InstanceLoad,
        note: str = "",
        **fields: object,
    ) -> None:
        now = self.clock()
        self.recorder.move(
            task,
            TaskState.DISPATCHED,
            f"dispatched to {instance.id}{note}",
            instance_id=instance.id,
            node_id=instance.node_id,
            started_at=now,
        )
        self.recorder.move(attempt.job, JobState.RUNNING, "task dispatched", **fields)
        self.recorder.move(attempt.request, RequestState.RUNNING, "job running")

    def settle_unstarted(self, attempt: Attempt, outcome: RequestState, error: str) -> None:
        now = self.clock()
        for task in attempt.tasks:
            if not task.terminal:
                self.recorder.move(
                    task, TaskState(outcome.value), error, finished_at=now, error=error
                )
        self.recorder.move(
            attempt.job, JobState(outcome.value), error, finished_at=now, error=error
        )
        self.recorder.move(attempt.request, outcome, error, finished_at=now, error=error)
