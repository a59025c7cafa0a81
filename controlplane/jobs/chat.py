"""The chat job executor: request -> one chat job -> one colocated task on a FlowServe instance.

`ChatExecutor.start` writes the records, waits for a ready instance (the 503 path), dispatches the
task over HTTP and returns a `ChatRun`; the API edge iterates `ChatRun.events()` and always calls
`ChatRun.close()`, which settles every record that is still in flight (a client that went away
cancels, an instance that failed fails) and releases the instance.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
from pydantic import TypeAdapter, ValidationError

from controlplane import wire
from controlplane.db import tables as t
from controlplane.db.recorder import Recorder, Tracked
from controlplane.errors import (
    DeepFlowError,
    InvalidRequest,
    NotFound,
    Overloaded,
    Unavailable,
    UpstreamFailed,
)
from controlplane.registry import Registry
from controlplane.routing.policy import InstanceLoad
from controlplane.states import JobKind, JobState, RequestKind, RequestState, TaskKind, TaskState

log = logging.getLogger(__name__)

_EVENT = TypeAdapter(wire.GenerateEvent)
MAX_DISPATCH_ATTEMPTS = 3


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


@dataclass(slots=True, frozen=True)
class ChatSpec:
    """What one OpenAI call asks of the platform, already validated."""

    deployment: str
    kind: RequestKind
    generate: wire.GenerateRequest


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

    @property
    def id(self) -> str:
        return self.request.id

    async def events(self) -> AsyncIterator[wire.GenerateDelta | wire.GenerateDone]:
        """Relay the instance's events. Raises UpstreamFailed if the instance fails or vanishes."""
        rec = self.executor.recorder
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
                else:
                    self.usage = event
                yield event
        except (httpx.HTTPError, ValidationError) as exc:
            raise UpstreamFailed(
                f"instance {self.instance.id} failed mid-request: {exc.__class__.__name__}",
                code="instance_failed",
            ) from exc
        if self.usage is None:
            raise UpstreamFailed(
                f"instance {self.instance.id} ended the stream early", code="instance_failed"
            )
        self._settle(RequestState.SUCCEEDED, "completed", None)

    def fail(self, error: str) -> None:
        self._settle(RequestState.FAILED, error, error)

    async def close(self) -> None:
        """Always called: whatever is still in flight now was abandoned by the client."""
        self._settle(RequestState.CANCELLED, "client disconnected", None)
        if not self.closed:
            self.closed = True
            self.executor.registry.release(self.instance.id)
            self.executor.registry.inflight_requests -= 1
            # Closing the stream drops the connection, which aborts the request on the instance.
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
        rec.move(self.task, task_state, reason, finished_at=now, error=error)
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


class ChatExecutor:
    def __init__(
        self,
        *,
        registry: Registry,
        recorder: Recorder,
        http: httpx.AsyncClient,
        clock: Callable[[], float],
        dispatch_timeout_s: float,
        max_inflight_requests: int,
    ) -> None:
        self.registry = registry
        self.recorder = recorder
        self.http = http
        self.clock = clock
        self.dispatch_timeout_s = dispatch_timeout_s
        self.max_inflight_requests = max_inflight_requests

    async def start(self, spec: ChatSpec) -> ChatRun:
        if not self.registry.has_deployment(spec.deployment):
            raise NotFound(
                f"The model `{spec.deployment}` does not exist.",
                param="model",
                code="model_not_found",
            )
        if self.registry.inflight_requests >= self.max_inflight_requests:
            raise Overloaded("too many requests in flight; retry later", code="overloaded")
        request, job, task = self._create_records(spec)
        self.registry.inflight_requests += 1
        try:
            return await self._dispatch(spec, request, job, task)
        except BaseException as exc:
            self.registry.inflight_requests -= 1
            error = exc.message if isinstance(exc, DeepFlowError) else repr(exc)
            outcome = RequestState.FAILED if isinstance(exc, Exception) else RequestState.CANCELLED
            self._settle_unstarted(request, job, task, outcome, error)
            raise

    def _create_records(self, spec: ChatSpec) -> tuple[Tracked, Tracked, Tracked]:
        now = self.clock()
        request = Tracked("request", spec.generate.request_id, RequestState.QUEUED)
        job = Tracked("job", new_id("job"), JobState.PENDING)
        task = Tracked("task", new_id("task"), TaskState.PENDING)
        job_kind = JobKind.CHAT if spec.kind == RequestKind.CHAT_COMPLETION else JobKind.COMPLETION
        rows: list[t.Base] = [
            t.Request(
                id=request.id,
                kind=spec.kind.value,
                deployment=spec.deployment,
                state=request.state.value,
                created_at=now,
            ),
            t.Job(
                id=job.id,
                request_id=request.id,
                kind=job_kind.value,
                state=job.state.value,
                created_at=now,
            ),
            t.Task(
                id=task.id,
                job_id=job.id,
                kind=TaskKind.COLOCATED.value,
                state=task.state.value,
                created_at=now,
            ),
        ]
        self.recorder.create(rows, [request, job, task], "accepted")
        return request, job, task

    async def _dispatch(
        self, spec: ChatSpec, request: Tracked, job: Tracked, task: Tracked
    ) -> ChatRun:
        tried: set[str] = set()
        last_error = "no ready instance"
        for _ in range(MAX_DISPATCH_ATTEMPTS):
            instance = await self.registry.acquire(
                spec.deployment, self.dispatch_timeout_s, frozenset(tried)
            )
            if instance is None:
                break
            tried.add(instance.id)
            try:
                response = await self._send(instance, spec.generate)
            except httpx.TransportError as exc:
                # The instance is gone or not listening: try another one.
                self.registry.release(instance.id)
                last_error = f"instance {instance.id} unreachable: {exc.__class__.__name__}"
                log.warning(last_error)
                continue
            except BaseException:
                self.registry.release(instance.id)
                raise
            now = self.clock()
            self.recorder.move(
                task,
                TaskState.DISPATCHED,
                f"dispatched to {instance.id}",
                instance_id=instance.id,
                node_id=instance.node_id,
                started_at=now,
            )
            self.recorder.move(job, JobState.RUNNING, "task dispatched")
            self.recorder.move(request, RequestState.RUNNING, "job running")
            return ChatRun(self, request, job, task, instance, response, spec.deployment, int(now))
        raise Unavailable(
            f"deployment {spec.deployment!r} has no ready instance ({last_error}); retry later",
            code="no_ready_instance",
        )

    async def _send(self, instance: InstanceLoad, body: wire.GenerateRequest) -> httpx.Response:
        request = self.http.build_request(
            "POST", f"{instance.url}/generate", content=body.model_dump_json(exclude_none=True)
        )
        response = await self.http.send(request, stream=True)
        if response.status_code == 200:
            return response
        try:
            raw = await response.aread()
        finally:
            await response.aclose()
            self.registry.release(instance.id)
        message, code = _error_of(raw, response.status_code)
        if 400 <= response.status_code < 500:
            raise InvalidRequest(message, code=code)
        raise UpstreamFailed(message, code=code)

    def _settle_unstarted(
        self, request: Tracked, job: Tracked, task: Tracked, outcome: RequestState, error: str
    ) -> None:
        now = self.clock()
        self.recorder.move(task, TaskState(outcome.value), error, finished_at=now, error=error)
        self.recorder.move(job, JobState(outcome.value), error, finished_at=now, error=error)
        self.recorder.move(request, outcome, error, finished_at=now, error=error)


def _error_of(raw: bytes, status: int) -> tuple[str, str | None]:
    try:
        body = wire.ErrorBody.model_validate(json.loads(raw))
        return body.error.message, body.error.code
    except (ValueError, ValidationError):
        return f"instance answered {status}: {raw[:200]!r}", None
