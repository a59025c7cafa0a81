"""The chat job executor: request -> one chat job -> one colocated task on a FlowServe instance
(a semi-PD one too; the job's `schedule` then says so), or two tasks (prefill, then decode) on a
disaggregated pair (docs/pd.md).

`ChatExecutor.start` writes the records, waits for a ready instance (the 503 path), dispatches the
task(s) over HTTP and returns a `ChatRun` streaming from the colocated or decode instance; the API
edge iterates `ChatRun.events()` and always calls `ChatRun.close()`, which settles every record
that is still in flight (a client that went away cancels, an instance that failed fails) and
releases the instance. An instance that dies mid-stream under a decode task, or under a
colocated task of one choice, is replaced under the same run (`ChatExecutor.resume`,
jobs/pd_resume.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import httpx
from pydantic import ValidationError

from controlplane import wire
from controlplane.db.recorder import Recorder, Tracked
from controlplane.errors import (
    DeepFlowError,
    InvalidRequest,
    NotFound,
    Overloaded,
    Unavailable,
    UpstreamFailed,
)
from controlplane.jobs.chat_records import Attempt, AttemptRecords
from controlplane.jobs.chat_run import (
    ChatRun,
    ChatSpec,
    InstanceLost,
    KVUnusable,
    kv_fields,
)
from controlplane.jobs.pd import (
    PolicyBook,
    PrefillFailed,
    drop_transfer,
    prompt_text,
    run_prefill,
    sched_request,
)
from controlplane.jobs.pd_resume import (
    StreamProgress,
    colocated_progress,
    completed_done,
    resumed_request,
)
from controlplane.reconcile.groups import SEMI_PD, pd_scheduled
from controlplane.registry import Registry
from controlplane.routing.dist_sched import (
    Decision,
    Groups,
    RouterThresholds,
    SchedPolicy,
    SchedRequest,
    schedule,
)
from controlplane.routing.pd_heatmap import Mode
from controlplane.routing.policy import InstanceLoad, pick_instance
from controlplane.states import RequestState, TaskKind, TaskState

log = logging.getLogger(__name__)

MAX_DISPATCH_ATTEMPTS = 3


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
        policies: PolicyBook | None = None,
        prefill_timeout_s: float = 120.0,
    ) -> None:
        self.registry = registry
        self.recorder = recorder
        self.http = http
        self.clock = clock
        self.dispatch_timeout_s = dispatch_timeout_s
        self.max_inflight_requests = max_inflight_requests
        self.policies = policies or PolicyBook(
            None, thresholds=RouterThresholds(), refresh_s=30.0, clock=clock
        )
        self.prefill_timeout_s = prefill_timeout_s
        self.records = AttemptRecords(recorder, clock)

    async def start(self, spec: ChatSpec) -> ChatRun:
        if not self.registry.has_deployment(spec.deployment):
            raise NotFound(
                f"The model `{spec.deployment}` does not exist.",
                param="model",
                code="model_not_found",
            )
        if self.registry.inflight_requests >= self.max_inflight_requests:
            raise Overloaded("too many requests in flight; retry later", code="overloaded")
        attempt = self.records.create(spec)
        self.registry.inflight_requests += 1
        try:
            mode = self.registry.mode_of(spec.deployment)
            if not pd_scheduled(mode) and spec.pd_mode is None:
                return await self._dispatch(spec, attempt)
            return await self._dispatch_pd(spec, attempt)
        except BaseException as exc:
            self.registry.inflight_requests -= 1
            error = exc.message if isinstance(exc, DeepFlowError) else repr(exc)
            outcome = RequestState.FAILED if isinstance(exc, Exception) else RequestState.CANCELLED
            self.records.settle_unstarted(attempt, outcome, error)
            raise

    def _run(
        self,
        spec: ChatSpec,
        attempt: Attempt,
        task: Tracked,
        instance: InstanceLoad,
        r: httpx.Response,
        progress: StreamProgress | None = None,
    ) -> ChatRun:
        created = int(self.clock())
        return ChatRun(
            self,
            attempt.request,
            attempt.job,
            task,
            instance,
            r,
            spec.deployment,
            created,
            progress=progress,
        )

    # -- one colocated task ---------------------------------------------------------------------

    async def _dispatch(self, spec: ChatSpec, attempt: Attempt) -> ChatRun:
        task = self.records.new_task(attempt, TaskKind.COLOCATED, "accepted")
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
            if self.registry.runs_semi_pd(instance.id):
                schedule = {"mode": SEMI_PD, "instance": instance.id}
                self.records.dispatched(attempt, task, instance, " (semi-PD)", schedule=schedule)
            else:
                self.records.dispatched(attempt, task, instance)
            return self._run(
                spec, attempt, task, instance, response, colocated_progress(spec.generate)
            )
        raise Unavailable(
            f"deployment {spec.deployment!r} has no ready instance ({last_error}); retry later",
            code="no_ready_instance",
        )

    # -- a PD deployment: the scheduler picks colocated or a prefill/decode pair ----------------

    async def _dispatch_pd(self, spec: ChatSpec, attempt: Attempt) -> ChatRun:
        text = prompt_text(spec.generate)
        request = sched_request(spec.generate, text)
        mode = self.registry.mode_of(spec.deployment)
        default: Mode = "disaggregated" if mode == "disaggregated" else "colocated"
        policy = self.policies.policy(spec.deployment, default)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.dispatch_timeout_s
        tried: set[str] = set()
        last_error = "no ready instance"
        for _ in range(MAX_DISPATCH_ATTEMPTS):
            decision = await self._decide(spec, request, text, policy, frozenset(tried), deadline)
            if decision is None:
                break
            if decision.mode == "colocated":
                assert decision.instance is not None
                task = self.records.new_task(attempt, TaskKind.COLOCATED, "scheduled: colocated")
                run = await self._try_colocated(spec, attempt, task, decision)
                if run is not None:
                    return run
                tried.add(decision.instance.id)
                last_error = f"instance {decision.instance.id} unreachable"
                continue
            assert decision.prefill is not None and decision.decode is not None
            reason = "scheduled: disaggregated"
            prefill_task = self.records.new_task(attempt, TaskKind.PREFILL, reason)
            try:
                handle = await self._prefill(spec, attempt, prefill_task, decision)
            except PrefillFailed as exc:
                self.registry.release(decision.decode.id)
                if not exc.retry:
                    if exc.status is not None and 400 <= exc.status < 500:
                        raise InvalidRequest(exc.message) from exc
                    raise UpstreamFailed(exc.message, code="prefill_failed") from exc
                tried.add(decision.prefill.id)
                last_error = exc.message
                log.warning(last_error)
                continue
            except BaseException:  # the client went away during the prefill
                self.registry.release(decision.decode.id)
                raise
            return await self._decode(spec, attempt, decision, handle, tried)
        raise Unavailable(
            f"deployment {spec.deployment!r} has no ready instance ({last_error}); retry later",
            code="no_ready_instance",
        )

    async def _decide(
        self,
        spec: ChatSpec,
        request: SchedRequest,
        text: str,
        policy: SchedPolicy,
        exclude: frozenset[str],
        deadline: float,
    ) -> Decision | None:
        """Schedule on the ready instances, waiting (the activator) while no group can take the
        request; the chosen instances are claimed. None when the deadline passed first."""
        deployment = spec.deployment
        while True:
            groups = self._groups(spec, exclude)
            matches = self.policies.matches(deployment, text)
            decision = schedule(request, groups, matches, policy, exclude)
            if decision.routed and self.registry.claim(decision.instance_ids):
                chosen = decision.instance if decision.mode == "colocated" else decision.prefill
                assert chosen is not None
                self.policies.remember(deployment, chosen.id, text)
                return decision
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or not await self.registry.wait_for_change(deployment, remaining):
                return None

    def _groups(self, spec: ChatSpec, exclude: frozenset[str]) -> Groups:
        """The ready instances the request may use, by role. With no usable prefill instance
        (none started yet, or every one failed this request) and no colocated group, the decode
        instances stand in as colocated: any instance can run a whole request, so a pair with a
        dead or cold prefill side still answers."""
        roles = self._allowed_roles(spec)

        def group(role: str) -> list[InstanceLoad]:
            return self.registry.candidates(spec.deployment, role) if role in roles else []

        colocated, prefill, decode = group("colocated"), group("prefill"), group("decode")
        usable_prefill = [i for i in prefill if i.id not in exclude]
        if not colocated and not usable_prefill and spec.pd_mode is None:
            colocated = decode
        return Groups(colocated=colocated, prefill=prefill, decode=decode)

    @staticmethod
    def _allowed_roles(spec: ChatSpec) -> frozenset[str]:
        if spec.pd_mode == "colocated":
            return frozenset({"colocated"})
        if spec.pd_mode == "disaggregated":
            return frozenset({"prefill", "decode"})
        return frozenset({"colocated", "prefill", "decode"})

    async def _try_colocated(
        self, spec: ChatSpec, attempt: Attempt, task: Tracked, decision: Decision
    ) -> ChatRun | None:
        instance = decision.instance
        assert instance is not None
        try:
            response = await self._send(instance, spec.generate)
        except httpx.TransportError as exc:
            self.registry.release(instance.id)
            error = f"instance {instance.id} unreachable: {exc.__class__.__name__}"
            self.recorder.move(task, TaskState.FAILED, error, finished_at=self.clock(), error=error)
            return None
        except BaseException:
            self.registry.release(instance.id)
            raise
        self.records.dispatched(attempt, task, instance, schedule=decision.record)
        return self._run(spec, attempt, task, instance, response, colocated_progress(spec.generate))

    async def _prefill(
        self, spec: ChatSpec, attempt: Attempt, task: Tracked, decision: Decision
    ) -> wire.KVHandle:
        """The prefill task: K/V and first token from the prefill instance. Raises PrefillFailed
        with the task failed; a cancel leaves the task for `start` to settle."""
        prefill, decode = decision.prefill, decision.decode
        assert prefill is not None and decode is not None
        transport: wire.KVTransport = (
            "shm" if prefill.node_id is not None and prefill.node_id == decode.node_id else "stream"
        )
        self.records.dispatched(attempt, task, prefill, schedule=decision.record)
        try:
            handle, prompt_tokens = await run_prefill(
                self.http, prefill, spec.generate, transport, self.prefill_timeout_s
            )
        except PrefillFailed as exc:
            self.recorder.move(
                task, TaskState.FAILED, exc.message, finished_at=self.clock(), error=exc.message
            )
            raise
        finally:
            self.registry.release(prefill.id)
        self.recorder.move(
            task,
            TaskState.SUCCEEDED,
            f"{prompt_tokens} prompt tokens prefilled; K/V handed over by {handle.transport}",
            finished_at=self.clock(),
            **kv_fields(handle.transport, handle.num_bytes, handle.export_s),
        )
        return handle

    async def _decode(
        self,
        spec: ChatSpec,
        attempt: Attempt,
        decision: Decision,
        handle: wire.KVHandle,
        tried: set[str],
    ) -> ChatRun:
        """The decode task: the decode instance imports the K/V and streams the answer. An
        unreachable decode instance is replaced by another; K/V it cannot use is recomputed
        from the prompt on the same instance."""
        instance: InstanceLoad | None = decision.decode
        task = self.records.new_task(attempt, TaskKind.DECODE, "prefill done")
        body = spec.generate.model_copy(update={"kv_source": handle})
        note = ""
        last_error = "no decode instance"
        for _ in range(MAX_DISPATCH_ATTEMPTS):
            if instance is None:
                instance = await self.registry.acquire(
                    spec.deployment, self.dispatch_timeout_s, frozenset(tried), role="decode"
                )
                if instance is None:
                    break
            try:
                response = await self._send(instance, body)
            except KVUnusable as exc:
                # The K/V did not arrive or do not fit: the decode instance computes the prompt.
                note = f"; the K/V were unusable ({exc}), so it recomputes the prompt"
                log.warning(
                    "request %s: K/V unusable on %s: %s", attempt.request.id, instance.id, exc
                )
                body = spec.generate
                try:
                    response = await self._send(instance, body)
                except BaseException:
                    self.registry.release(instance.id)
                    raise
            except httpx.TransportError as exc:
                self.registry.release(instance.id)
                last_error = f"decode instance {instance.id} unreachable: {exc.__class__.__name__}"
                log.warning(last_error)
                tried.add(instance.id)
                instance = None
                continue
            except BaseException:
                self.registry.release(instance.id)
                await drop_transfer(self.http, handle)
                raise
            self.records.dispatched(attempt, task, instance, note)
            progress = StreamProgress(spec.generate, prompt_tokens=handle.num_tokens)
            return self._run(spec, attempt, task, instance, response, progress)
        await drop_transfer(self.http, handle)
        raise Unavailable(
            f"deployment {spec.deployment!r} has no decode instance for the request "
            f"({last_error}); retry later",
            code="no_ready_instance",
        )

    async def resume(self, run: ChatRun, lost: InstanceLost) -> bool:
        """The instance of a decode task (or of a colocated task of one choice) died
        mid-stream: fail its task and go on with a new task of its kind on another instance,
        from the first token the client does not have (jobs/pd_resume.py). True when the run
        goes on: its task, instance and stream are the new task's, or its `usage` is set when
        the client already had the whole answer. False when the run cannot be resumed (no
        `progress`), was resumed `MAX_RESUMES` times, or no instance took the new
        task."""
        progress = run.progress
        if progress is None:
            return False
        rec = self.recorder
        rec.move(
            run.task, TaskState.FAILED, lost.message, finished_at=self.clock(), error=lost.message
        )
        progress.lost.add(run.instance.id)
        await run.let_go()
        generate = progress.generate
        if progress.complete(generate.sampling.max_tokens):
            run.usage = completed_done(progress)
            return True
        if not progress.resumable():
            return False
        progress.resumes += 1
        num_streamed = len(progress.token_ids)
        log.warning(
            "request %s: %s after %d tokens; resuming", run.request.id, lost.message, num_streamed
        )
        attempt = Attempt(run.request, run.job)
        run.task = task = self.records.new_task(
            attempt, progress.kind, f"resumes after {num_streamed} tokens: {lost.message}"
        )
        body = resumed_request(progress)
        last_error = "no instance to resume on"
        for _ in range(MAX_DISPATCH_ATTEMPTS):
            instance = await self._resume_instance(run.model, frozenset(progress.lost))
            if instance is None:
                break
            try:
                response = await self._send(instance, body)
            except httpx.TransportError as exc:
                self.registry.release(instance.id)
                progress.lost.add(instance.id)
                last_error = f"instance {instance.id} unreachable: {exc.__class__.__name__}"
                continue
            except (InvalidRequest, UpstreamFailed) as exc:  # refused, and released by _send
                last_error = exc.message
                break
            except BaseException:
                self.registry.release(instance.id)
                raise
            progress.num_in_prompt = num_streamed
            run.instance, run.response, run.held = instance, response, True
            note = f" (resumed: recomputes the prompt and the {num_streamed} tokens streamed)"
            self.records.dispatched(attempt, task, instance, note)
            return True
        rec.move(task, TaskState.FAILED, last_error, finished_at=self.clock(), error=last_error)
        return False

    async def _resume_instance(
        self, deployment: str, exclude: frozenset[str]
    ) -> InstanceLoad | None:
        """Where a resumed decode runs: the least loaded decode instance, else a colocated
        one, else any of the deployment's (each can run a whole request), waiting as a new
        request does while none is ready."""
        for role in ("decode", "colocated"):
            choice = pick_instance(self.registry.candidates(deployment, role), exclude)
            if choice is not None and self.registry.claim([choice.id]):
                return choice
        return await self.registry.acquire(deployment, self.dispatch_timeout_s, exclude)

    async def _send(self, instance: InstanceLoad, body: wire.GenerateRequest) -> httpx.Response:
        """The instance's stream. Raises KVUnusable (the instance is still claimed: the caller
        retries on it), or InvalidRequest / UpstreamFailed with the instance released."""
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
        message, code = _error_of(raw, response.status_code)
        if response.status_code == 409 and code in ("kv_transfer_failed", "kv_mismatch"):
            raise KVUnusable(message)
        self.registry.release(instance.id)
        if 400 <= response.status_code < 500:
            raise InvalidRequest(message, code=code)
        raise UpstreamFailed(message, code=code)


def _error_of(raw: bytes, status: int) -> tuple[str, str | None]:
    try:
        body = wire.ErrorBody.model_validate(json.loads(raw))
        return body.error.message, body.error.code
    except (ValueError, ValidationError):
        return f"instance answered {status}: {raw[:200]!r}", None
