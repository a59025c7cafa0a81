"""The FlowServe instance's HTTP server (see docs/architecture.md, "FlowServe instance protocol").

    GET  /health              InstanceHealth
    POST /generate            GenerateRequest -> application/x-ndjson stream of GenerateEvent lines
    POST /abort/{request_id}  {"request_id", "aborted"}
    GET  /metrics             Prometheus text

The lifespan loads the engine and starts the one thread that drives it (`EngineDriver`). Handlers
hand work to that thread and read events back from a per-request asyncio queue.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from controlplane.wire import (
    ErrorBody,
    ErrorDetail,
    GenerateRequest,
    InstanceHealth,
    InstanceRole,
)
from dataplane.flowserve.driver import EngineDriver, Event
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.errors import InvalidRequest, PromptTooLong
from dataplane.flowserve.metrics import CONTENT_TYPE, Metrics
from dataplane.flowserve.prompts import build_prompt
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.startup import StartupClock
from dataplane.flowserve.stream import RequestStream
from dataplane.flowserve.token_text import TokenTexts

NDJSON = "application/x-ndjson"


@dataclass(slots=True)
class _Instance:
    engine: Engine
    driver: EngineDriver
    metrics: Metrics
    token_texts: TokenTexts
    model_name: str
    instance_id: str | None
    startup: StartupClock | None = None
    role: InstanceRole = "colocated"
    in_flight: set[str] = field(default_factory=set)


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    detail = ErrorDetail(message=message, type="invalid_request_error", param=param, code=code)
    return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=status)


@dataclass(slots=True)
class _Subscription:
    """One request's events, on the event loop's side."""

    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    finished: bool = False  # the last event (done or error) was taken

    async def lines(self) -> AsyncIterator[str]:
        while not self.finished:
            event = await self.events.get()
            self.finished = event.type in ("done", "error")
            yield event.model_dump_json() + "\n"


class EventStream(StreamingResponse):
    """A streaming response that always watches for the client going away (Starlette does so only
    for ASGI servers older than spec 2.4), and calls `on_close` however the stream ends, even if
    the body never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type=NDJSON)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_cancel() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_cancel)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self._on_close()


def _instance(request: Request) -> _Instance:
    instance: _Instance = request.app.state.instance
    return instance


async def health(request: Request) -> Response:
    inst = _instance(request)
    body = InstanceHealth(
        status="ok",
        instance_id=inst.instance_id,
        role=inst.role,
        model=inst.model_name,
        max_model_len=inst.engine.max_model_len,
        num_requests_running=inst.driver.num_running,
        num_requests_waiting=inst.driver.num_waiting,
        startup=inst.startup.report() if inst.startup is not None else None,
    )
    return JSONResponse(body.model_dump())


async def generate(request: Request) -> Response:
    inst = _instance(request)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_response(400, "the body is not valid JSON")
    try:
        req = GenerateRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        return error_response(400, first["msg"], param=param)
    try:
        prompt = await run_in_threadpool(
            build_prompt, inst.engine.tokenizer, req, inst.engine.vocab_size
        )
        if len(prompt.token_ids) > inst.engine.max_model_len:
            raise PromptTooLong(len(prompt.token_ids), inst.engine.max_model_len)
        params = [SamplingParams.from_spec(req.sampling, i) for i in range(req.sampling.n)]
    except InvalidRequest as exc:
        return error_response(400, exc.message, param=exc.param, code=exc.code)
    # Checked after the last await, so the check and the add below cannot interleave.
    if req.request_id in inst.in_flight:
        return error_response(
            409,
            f"request id {req.request_id!r} is already in flight",
            param="request_id",
            code="duplicate_request_id",
        )

    stream = RequestStream(
        req.request_id,
        prompt.token_ids,
        params,
        inst.engine.tokenizer,
        inst.token_texts,
        prompt.text if req.echo else None,
    )
    subscription = _Subscription()
    loop = asyncio.get_running_loop()

    def sink(event: Event) -> None:  # called on the engine thread
        loop.call_soon_threadsafe(subscription.events.put_nowait, event)

    def close() -> None:
        inst.in_flight.discard(req.request_id)
        if not subscription.finished:  # the client went away mid-stream
            inst.driver.abort(req.request_id)

    inst.in_flight.add(req.request_id)
    inst.driver.submit(stream, sink)
    return EventStream(subscription.lines(), close)


async def abort(request: Request) -> Response:
    inst = _instance(request)
    request_id = request.path_params["request_id"]
    known = request_id in inst.in_flight
    if known:
        inst.driver.abort(request_id)
    return JSONResponse({"request_id": request_id, "aborted": known})


async def metrics(request: Request) -> Response:
    return Response(_instance(request).metrics.render(), media_type=CONTENT_TYPE)


def create_app(
    load_engine: Callable[[], Engine],
    *,
    model_name: str,
    instance_id: str | None = None,
    startup: StartupClock | None = None,
    role: InstanceRole = "colocated",
) -> Starlette:
    """`load_engine` runs once at start-up, off the event loop. `startup`, when given, is
    marked ready once the engine runs, and reported by /health."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = await run_in_threadpool(load_engine)
        # Always in the instance's log, whatever the log level: operators size nodes by it.
        print(f"flowserve {model_name}: {engine.describe_kv_cache()}", file=sys.stderr, flush=True)
        metrics = Metrics(model_name)
        driver = EngineDriver(engine, metrics)
        metrics.watch(lambda: driver.stats)
        app.state.instance = _Instance(
            engine,
            driver,
            metrics,
            TokenTexts(engine.tokenizer),
            model_name,
            instance_id,
            startup,
            role,
        )
        driver.start()
        if startup is not None:
            startup.mark_ready(engine.weights_loaded_at, engine.weights.source)
        try:
            yield
        finally:
            await run_in_threadpool(driver.stop)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/abort/{request_id:path}", abort, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
