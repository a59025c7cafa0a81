"""What a chat request is while it runs: `ChatSpec` (the validated ask) and `ChatRun` (the
stream from the colocated or decode instance and the records it settles), made by
`ChatExecutor.start` (chat.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
from pydantic import TypeAdapter, ValidationError

from controlplane import wire
from controlplane.db.recorder import Tracked
from controlplane.errors import UpstreamFailed
from controlplane.jobs.pd_resume import StreamProgress, whole_done
from controlplane.routing.pd_heatmap import Mode
from controlplane.routing.policy import InstanceLoad
from controlplane.states import JobState, RequestKind, RequestState, TaskState

if TYPE_CHECKING:
    from controlplane.jobs.chat import ChatExecutor

_EVENT = TypeAdapter(wire.GenerateEvent)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


@dataclass(slots=True, frozen=True)
class ChatSpec:
    """What one OpenAI call asks of the platform, already validated."""

    deployment: str
    kind: RequestKind
    generate: wire.GenerateRequest
    # Force a mode on a PD deployment (the PD profiler measures each); None: the scheduler picks.
    pd_mode: Mode | None = None


@dataclass(slots=True)
class ChatRun:
    executor: ChatExecutor
    request: Tracked
    job: Tracked
    task: Tracked
    instance: InstanceLoad
    response: httpx.Response
    model: str
    created: int
    usage: wire.GenerateDone | None = None
    completion_tokens: int = 0
    closed: bool = field(default=False)
    # A decode task's run: what the client has, for a resumed task to go on from.
    progress: StreamProgress | None = None
    held: bool = True  # `instance` is claimed for this run (released once, on close or loss)

    @property
    def id(self) -> str:
        return self.request.id

    async def events(self) -> AsyncIterator[wire.GenerateDelta | wire.GenerateDone]:
        """Relay the instance's events. Raises UpstreamFailed if the instance fails or vanishes
        and its task cannot be resumed on another (`ChatExecutor.resume`)."""
        rec = self.executor.recorder
        while self.usage is None:
            lost: InstanceLost | None = None
            try:
                async for line in self.response.aiter_lines():
                    if not line.strip():
                        continue
                    event = _EVENT.validate_json(line)
                    if isinstance(event, wire.GenerateError):
                        raise UpstreamFailed(event.message, code=event.code or "instance_error")
                    if isinstance(event, wire.GenerateDelta):
                        rec.move(self.task, TaskState.RUNNING, "first output")
                        self.completion_tokens += len(event.token_ids)
                        if self.progress is not None:
                            self.progress.add(event)
                    else:
                        event = self.usage = (
                            event if self.progress is None else whole_done(event, self.progress)
                        )
                    yield event
            except (httpx.HTTPError, ValidationError) as exc:
                lost = InstanceLost(
                    f"instance {self.instance.id} failed mid-request: {exc.__class__.__name__}"
                )
                lost.__cause__ = exc
            if self.usage is not None:
                break
            lost = lost or InstanceLost(f"instance {self.instance.id} ended the stream early")
            if not await self.executor.resume(self, lost):
                raise lost
        self._settle(RequestState.SUCCEEDED, "completed", None)

    def fail(self, error: str) -> None:
        self._settle(RequestState.FAILED, error, error)

    async def close(self) -> None:
        """Always called: whatever is still in flight now was abandoned by the client."""
        self._settle(RequestState.CANCELLED, "client disconnected", None)
        if not self.closed:
            self.closed = True
            self.executor.registry.inflight_requests -= 1
            await self.let_go()

    async def let_go(self) -> None:
        """Release the instance and close its stream. Closing drops the connection, which
        aborts the request on the instance."""
        if self.held:
            self.held = False
            self.executor.registry.release(self.instance.id)
        await self.response.aclose()

    def _settle(self, outcome: RequestState, reason: str, error: str | None) -> None:
        if self.request.terminal:
            return
        rec = self.executor.recorder
        now = self.executor.clock()
        task_state = {
            RequestState.SUCCEEDED: TaskState.SUCCEEDED,
            RequestState.FAILED: TaskState.FAILED,
            RequestState.CANCELLED: TaskState.CANCELLED,
        }[outcome]
        job_state = JobState(task_state.value)
        kv = self.usage.kv_import if self.usage is not None else None
        transfer = (
            {} if kv is None else kv_fields(kv.transport, kv.num_bytes, kv.fetch_s + kv.import_s)
        )
        if not self.task.terminal:  # a resumed decode's last task may have failed after the end
            rec.move(self.task, task_state, reason, finished_at=now, error=error, **transfer)
        rec.move(self.job, job_state, reason, finished_at=now, error=error)
        prompt_tokens = self.usage.prompt_tokens if self.usage else None
        rec.move(
            self.request,
            outcome,
            reason,
            finished_at=now,
            error=error,
            prompt_tokens=prompt_tokens,
            completion_tokens=self.completion_tokens,
        )


class KVUnusable(Exception):
    """The decode instance could not take the prefill's K/V (fetch failed, or a mismatch)."""


class InstanceLost(UpstreamFailed):
    """The instance's stream broke off or ended before its done event: it died or vanished."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="instance_failed")


def kv_fields(transport: str, num_bytes: int, seconds: float) -> dict[str, object]:
    return {"kv_transport": transport, "kv_bytes": num_bytes, "kv_transfer_s": seconds}
