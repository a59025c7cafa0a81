"""The CLI's only HTTP caller: a typed client for the management API and the chat endpoint.

Every failure leaves this module as a `CliError` carrying the exit code: an OpenAI error body gives
its message (404 -> `NOT_FOUND`, anything else -> `ERROR`); a refused or timed-out connection gives
`UNREACHABLE` with a hint to run `deepflow up`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from controlplane.wire import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    DeploymentCreate,
    DeploymentInfo,
    DeploymentUpdate,
    ErrorBody,
    FileDeleted,
    FileObject,
    FineTuningCheckpoint,
    FineTuningEvent,
    FineTuningJob,
    FineTuningJobCreate,
    InstanceInfo,
    JobInfo,
    ListOf,
    ModelCreate,
    ModelInfo,
    NodeInfo,
    Page,
    PDProfileCreate,
    PDProfileInfo,
    PlatformStatus,
    RequestInfo,
    ScalingEventInfo,
    TaskInfo,
)
from deepflow_cli.errors import CliError, ExitCode

DEFAULT_TIMEOUT_S = 30.0
# Generation may wait for a replica to start or produce many tokens; only connecting is quick.
GENERATE_READ_TIMEOUT_S = 600.0
M = TypeVar("M", bound=BaseModel)
UploadProgress = Callable[[int, int], None]  # (bytes sent, total bytes)


@dataclass(frozen=True, slots=True)
class Paged(Generic[M]):
    """One page of an OpenAI list, newest first; pass `items[-1].id` as `after` for the next."""

    items: list[M]
    has_more: bool


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])


def _error_message(response: httpx.Response) -> str:
    try:
        return ErrorBody.model_validate_json(response.content).error.message
    except ValidationError:
        text = response.text.strip()
        reason = response.reason_phrase or "error"
        return f"HTTP {response.status_code} {reason}" + (f": {text[:200]}" if text else "")


def _narrow(records: list[M], state: str | None, limit: int | None) -> list[M]:
    """Apply `state` and `limit` here too, for routes that ignore the query parameters."""
    if state is not None:
        records = [r for r in records if getattr(r, "state", None) == state]
    return records[:limit] if limit is not None else records


class DeepFlowClient:
    """Talks to one control plane; `transport` lets tests answer in-process (`MockTransport`)."""

    def __init__(
        self,
        base_url: str,
        transport: httpx.BaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, transport=transport, timeout=timeout)
        self._generate_timeout = httpx.Timeout(timeout, read=max(timeout, GENERATE_READ_TIMEOUT_S))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DeepFlowClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _unreachable(self, exc: httpx.TransportError) -> CliError:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return CliError(
                f"cannot reach the control plane at {self.base_url}; start it with `deepflow up`",
                ExitCode.UNREACHABLE,
            )
        if isinstance(exc, httpx.TimeoutException):
            return CliError(f"no reply from the control plane at {self.base_url} in time")
        return CliError(
            f"lost the connection to the control plane at {self.base_url}: {exc}",
            ExitCode.UNREACHABLE,
        )

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.is_success:
            return
        response.read()
        code = ExitCode.NOT_FOUND if response.status_code == 404 else ExitCode.ERROR
        raise CliError(_error_message(response), code, status=response.status_code)

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | Any = None,
        params: dict[str, str | int] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        payload = (
            body.model_dump(mode="json", exclude_unset=True)
            if isinstance(body, BaseModel)
            else body
        )
        try:
            response = self._http.request(
                method, path, json=payload, params=params, timeout=timeout or self._http.timeout
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        self._check(response)
        return response

    def _one(
        self,
        model: type[M],
        method: str,
        path: str,
        body: BaseModel | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> M:
        response = self._send(method, path, body=body, timeout=timeout)
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise CliError(f"unexpected reply from {path}: {_first_error(exc)}") from exc

    def _many(
        self,
        model: type[M],
        path: str,
        params: dict[str, str | int | None] | None = None,
    ) -> list[M]:
        sent = {k: v for k, v in (params or {}).items() if v is not None}
        response = self._send("GET", path, params=sent)
        try:
            envelope = ListOf.model_validate_json(response.content)
            return [model.model_validate(item) for item in envelope.data]
        except ValidationError as exc:
            raise CliError(f"unexpected reply from {path}: {_first_error(exc)}") from exc

    def _page(
        self,
        model: type[M],
        path: str,
        params: dict[str, str | int | None] | None = None,
    ) -> Paged[M]:
        sent = {k: v for k, v in (params or {}).items() if v is not None}
        response = self._send("GET", path, params=sent)
        try:
            page = Page.model_validate_json(response.content)
            items = [model.model_validate(item) for item in page.data]
        except ValidationError as exc:
            raise CliError(f"unexpected reply from {path}: {_first_error(exc)}") from exc
        return Paged(items, page.has_more)

    # -- platform ------------------------------------------------------------------------------

    def status(self) -> PlatformStatus:
        return self._one(PlatformStatus, "GET", "/api/v1/status")

    # -- models --------------------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        return self._many(ModelInfo, "/api/v1/models")

    def create_model(self, name: str, path: str, source: str = "import") -> ModelInfo:
        body = _build(ModelCreate, name=name, path=path, source=source)
        return self._one(ModelInfo, "POST", "/api/v1/models", body)

    def get_model(self, name: str) -> ModelInfo:
        return self._one(ModelInfo, "GET", f"/api/v1/models/{name}")

    def delete_model(self, name: str) -> ModelInfo:
        return self._one(ModelInfo, "DELETE", f"/api/v1/models/{name}")

    # -- deployments ---------------------------------------------------------------------------

    def list_deployments(self) -> list[DeploymentInfo]:
        return self._many(DeploymentInfo, "/api/v1/deployments")

    def create_deployment(
        self,
        name: str,
        model: str,
        replicas: int | None = 1,
        *,
        mode: str | None = None,
        prefill_replicas: int | None = None,
        decode_replicas: int | None = None,
        slo_ttft_ms: float | None = None,
        slo_tpot_ms: float | None = None,
        semi_pd_split: int | None = None,
        semi_pd_static: bool | None = None,
        **autoscaling: Any,
    ) -> DeploymentInfo:
        """`mode`, the group sizes and mode semi-pd's settings: docs/pd.md (None leaves them to
        the control plane); `autoscaling`: DeploymentCreate's fields (max_replicas turns
        autoscaling on)."""
        body = _build(
            DeploymentCreate,
            name=name,
            model=model,
            mode=mode,
            replicas=replicas,
            prefill_replicas=prefill_replicas,
            decode_replicas=decode_replicas,
            slo_ttft_ms=slo_ttft_ms,
            slo_tpot_ms=slo_tpot_ms,
            semi_pd_split=semi_pd_split,
            semi_pd_static=semi_pd_static,
            **autoscaling,
        )
        return self._one(DeploymentInfo, "POST", "/api/v1/deployments", body)

    def get_deployment(self, name: str) -> DeploymentInfo:
        return self._one(DeploymentInfo, "GET", f"/api/v1/deployments/{name}")

    def update_deployment(
        self,
        name: str,
        *,
        replicas: int | None = None,
        prefill_replicas: int | None = None,
        decode_replicas: int | None = None,
        mode: str | None = None,
        slo_ttft_ms: float | None = None,
        slo_tpot_ms: float | None = None,
        semi_pd_split: int | None = None,
        semi_pd_static: bool | None = None,
        **autoscaling: Any,
    ) -> DeploymentInfo:
        """Change what is given (None leaves it): group sizes, mode, semi-PD and autoscaling
        settings."""
        body = _build(
            DeploymentUpdate,
            replicas=replicas,
            prefill_replicas=prefill_replicas,
            decode_replicas=decode_replicas,
            mode=mode,
            slo_ttft_ms=slo_ttft_ms,
            slo_tpot_ms=slo_tpot_ms,
            semi_pd_split=semi_pd_split,
            semi_pd_static=semi_pd_static,
            **autoscaling,
        )
        return self._one(DeploymentInfo, "PATCH", f"/api/v1/deployments/{name}", body)

    def scaling_events(self, name: str, *, limit: int = 50) -> list[ScalingEventInfo]:
        path = f"/api/v1/deployments/{name}/scaling"
        return self._many(ScalingEventInfo, path, {"limit": limit})

    def get_pd_profile(self, name: str) -> PDProfileInfo:
        return self._one(PDProfileInfo, "GET", f"/api/v1/deployments/{name}/pd-profile")

    def create_pd_profile(self, name: str, body: PDProfileCreate) -> PDProfileInfo:
        """Runs the profile: minutes on a slow machine, so no read timeout."""
        path = f"/api/v1/deployments/{name}/pd-profile"
        timeout = httpx.Timeout(10.0, read=None)
        return self._one(PDProfileInfo, "POST", path, body, timeout=timeout)

    def delete_deployment(self, name: str) -> DeploymentInfo:
        return self._one(DeploymentInfo, "DELETE", f"/api/v1/deployments/{name}")

    # -- records -------------------------------------------------------------------------------

    def list_nodes(self, *, state: str | None = None, limit: int | None = None) -> list[NodeInfo]:
        nodes = self._many(NodeInfo, "/api/v1/nodes", {"state": state, "limit": limit})
        return _narrow(nodes, state, limit)

    def get_node(self, node_id: str) -> NodeInfo:
        return self._one(NodeInfo, "GET", f"/api/v1/nodes/{node_id}")

    def list_instances(
        self,
        *,
        deployment: str | None = None,
        state: str | None = None,
        limit: int | None = None,
    ) -> list[InstanceInfo]:
        params: dict[str, str | int | None] = {
            "deployment": deployment,
            "state": state,
            "limit": limit,
        }
        return _narrow(self._many(InstanceInfo, "/api/v1/instances", params), state, limit)

    def get_instance(self, instance_id: str) -> InstanceInfo:
        return self._one(InstanceInfo, "GET", f"/api/v1/instances/{instance_id}")

    def list_requests(
        self, *, state: str | None = None, limit: int | None = None
    ) -> list[RequestInfo]:
        params: dict[str, str | int | None] = {"state": state, "limit": limit}
        return _narrow(self._many(RequestInfo, "/api/v1/requests", params), state, limit)

    def get_request(self, request_id: str) -> RequestInfo:
        return self._one(RequestInfo, "GET", f"/api/v1/requests/{request_id}")

    def list_jobs(
        self,
        *,
        request_id: str | None = None,
        state: str | None = None,
        limit: int | None = None,
    ) -> list[JobInfo]:
        params: dict[str, str | int | None] = {
            "request_id": request_id,
            "state": state,
            "limit": limit,
        }
        return _narrow(self._many(JobInfo, "/api/v1/jobs", params), state, limit)

    def get_job(self, job_id: str) -> JobInfo:
        return self._one(JobInfo, "GET", f"/api/v1/jobs/{job_id}")

    def list_tasks(
        self,
        *,
        job_id: str | None = None,
        state: str | None = None,
        limit: int | None = None,
    ) -> list[TaskInfo]:
        params: dict[str, str | int | None] = {"job_id": job_id, "state": state, "limit": limit}
        return _narrow(self._many(TaskInfo, "/api/v1/tasks", params), state, limit)

    def get_task(self, task_id: str) -> TaskInfo:
        return self._one(TaskInfo, "GET", f"/api/v1/tasks/{task_id}")

    # -- OpenAI API ----------------------------------------------------------------------------

    def chat(self, model: str, messages: Sequence[ChatMessage], **sampling: Any) -> ChatCompletion:
        body = _build(
            ChatCompletionRequest, model=model, messages=list(messages), stream=False, **sampling
        )
        return self._one(
            ChatCompletion, "POST", "/v1/chat/completions", body, self._generate_timeout
        )

    def chat_stream(
        self, model: str, messages: Sequence[ChatMessage], **sampling: Any
    ) -> Iterator[str]:
        """Yield the text of choice 0 as it arrives, until `data: [DONE]`."""
        body = _build(
            ChatCompletionRequest, model=model, messages=list(messages), stream=True, **sampling
        )
        payload = body.model_dump(mode="json", exclude_unset=True)
        try:
            with self._http.stream(
                "POST", "/v1/chat/completions", json=payload, timeout=self._generate_timeout
            ) as response:
                self._check(response)
                yield from _sse_text(response.iter_lines())
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def invoke(self, path: str, body: Any) -> Any:
        """POST raw JSON to any path and return the JSON reply, for scripts.

        Any refusal (404 included) is `ExitCode.ERROR`; only an unreachable control plane differs.
        """
        try:
            response = self._send(
                "POST", "/" + path.lstrip("/"), body=body, timeout=self._generate_timeout
            )
        except CliError as exc:
            if exc.status is not None:
                exc.exit_code = ExitCode.ERROR
            raise
        try:
            return response.json()
        except ValueError as exc:
            raise CliError(
                f"the reply from {path} is not JSON ({response.headers.get('content-type')}); "
                "use `deepflow chat` to stream"
            ) from exc

    # -- files (OpenAI) ------------------------------------------------------------------------

    def upload_file(
        self, path: Path, purpose: str, progress: UploadProgress | None = None
    ) -> FileObject:
        """Send a local file as multipart form data; `progress` hears of every chunk read."""
        try:
            file = path.open("rb") if progress is None else _ReadProgress(path, progress)
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror}") from exc
        with file:
            try:
                response = self._http.post(
                    "/v1/files",
                    files={"file": (path.name, file, "application/octet-stream")},
                    data={"purpose": purpose},
                    # The server checks every line before it answers.
                    timeout=self._generate_timeout,
                )
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from exc
        self._check(response)
        try:
            return FileObject.model_validate_json(response.content)
        except ValidationError as exc:
            raise CliError(f"unexpected reply from /v1/files: {_first_error(exc)}") from exc

    def list_files(
        self, *, purpose: str | None = None, limit: int | None = None
    ) -> list[FileObject]:
        files = self._page(FileObject, "/v1/files", {"purpose": purpose, "limit": limit}).items
        if purpose is not None:
            files = [f for f in files if f.purpose == purpose]
        return files[:limit] if limit is not None else files

    def get_file(self, file_id: str) -> FileObject:
        return self._one(FileObject, "GET", f"/v1/files/{file_id}")

    def delete_file(self, file_id: str) -> FileDeleted:
        return self._one(FileDeleted, "DELETE", f"/v1/files/{file_id}")

    def file_content(self, file_id: str) -> Iterator[bytes]:
        """Yield a file's bytes as they arrive."""
        try:
            with self._http.stream("GET", f"/v1/files/{file_id}/content") as response:
                self._check(response)
                yield from response.iter_bytes()
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    # -- fine-tuning (OpenAI) ------------------------------------------------------------------

    def create_fine_tuning_job(self, body: FineTuningJobCreate) -> FineTuningJob:
        return self._one(FineTuningJob, "POST", "/v1/fine_tuning/jobs", body)

    def list_fine_tuning_jobs(
        self, *, after: str | None = None, limit: int | None = None
    ) -> Paged[FineTuningJob]:
        params: dict[str, str | int | None] = {"after": after, "limit": limit}
        return self._page(FineTuningJob, "/v1/fine_tuning/jobs", params)

    def get_fine_tuning_job(self, job_id: str) -> FineTuningJob:
        return self._one(FineTuningJob, "GET", f"/v1/fine_tuning/jobs/{job_id}")

    def cancel_fine_tuning_job(self, job_id: str) -> FineTuningJob:
        return self._one(FineTuningJob, "POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")

    def list_fine_tuning_events(
        self, job_id: str, *, after: str | None = None, limit: int | None = None
    ) -> Paged[FineTuningEvent]:
        params: dict[str, str | int | None] = {"after": after, "limit": limit}
        return self._page(FineTuningEvent, f"/v1/fine_tuning/jobs/{job_id}/events", params)

    def list_fine_tuning_checkpoints(
        self, job_id: str, *, after: str | None = None, limit: int | None = None
    ) -> Paged[FineTuningCheckpoint]:
        params: dict[str, str | int | None] = {"after": after, "limit": limit}
        path = f"/v1/fine_tuning/jobs/{job_id}/checkpoints"
        return self._page(FineTuningCheckpoint, path, params)


def fine_tuning_job_body(**fields: Any) -> FineTuningJobCreate:
    """Validate the fields of a new fine-tuning job (None leaves one out) before any upload."""
    return _build(FineTuningJobCreate, **fields)


def _build(schema: type[M], /, **fields: Any) -> M:
    """Validate a request body here, so a bad option is reported before anything is sent."""
    try:
        return schema.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise CliError(_first_error(exc)) from exc


def _sse_text(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments and `event:` lines
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise CliError(f"malformed event in the stream: {data[:200]}") from exc
        if isinstance(raw, dict) and "error" in raw:
            try:
                message = ErrorBody.model_validate(raw).error.message
            except ValidationError:
                message = str(raw["error"])
            raise CliError(message)
        try:
            chunk = ChatCompletionChunk.model_validate(raw)
        except ValidationError as exc:
            raise CliError(f"malformed chunk in the stream: {_first_error(exc)}") from exc
        for choice in chunk.choices:
            if choice.index == 0 and choice.delta.content:
                yield choice.delta.content


class _ReadProgress(io.BufferedReader):
    """A file opened for reading that reports how far multipart encoding has read it."""

    def __init__(self, path: Path, report: UploadProgress) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._total = path.stat().st_size
        self._report = report

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self._report(self.tell(), self._total)
        return chunk
