"""The FlowServe instance's HTTP server (see docs/architecture.md, "FlowServe instance protocol").

    GET    /health             InstanceHealth
    POST   /generate           GenerateRequest -> application/x-ndjson stream of GenerateEvent lines
    POST   /abort/{request_id} {"request_id", "aborted"}
    GET    /metrics            Prometheus text
    GET    /semipd             a semi-PD instance's split and its SLO controller's switches
    GET    /kv/{transfer_id}   a prefill's exported K/V (transport "stream"), streamed once
    POST   /kv/{transfer_id}/share   a CUDA IPC handle of them (transport "cuda_ipc"), once
    DELETE /kv/{transfer_id}   {"transfer_id", "deleted"}

The lifespan loads the engine and starts the one thread that drives it (`EngineDriver`). Handlers
hand work to that thread and read events back from a per-request asyncio queue.

PD disaggregation (docs/flowserve.md): a `prefill_only` request's stream is one GenerateDone
whose `kv` is the handle of its stored K/V (`kv_transfer.KVStore`; on the device, for cuda_ipc,
where a same-node hand-off is asked for and the platform shares device memory); a `kv_source`
request first fetches the K/V (409 `kv_mismatch` when they are not of its prompt, 409
`kv_transfer_failed` when they cannot be had), then streams as any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import httpx
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
    GenerateError,
    GenerateRequest,
    InstanceHealth,
    InstanceRole,
    KVHandle,
    KVTransport,
    PrefillOnly,
)
from dataplane.flowserve.device_share import DeviceShare, DeviceShareError
from dataplane.flowserve.driver import EngineDriver, Event
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.errors import InvalidRequest, PromptTooLong
from dataplane.flowserve.kv_cuda_ipc import SharedImports, share_answer
from dataplane.flowserve.kv_transfer import (
    KVStore,
    KVTransferConfig,
    KVTransferError,
    discard,
    fetch,
    hold_export,
)
from dataplane.flowserve.metrics import CONTENT_TYPE, Metrics
from dataplane.flowserve.prompt_kv import KVMismatch
from dataplane.flowserve.prompts import build_prompt
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.flowserve.semipd.engine import SemiPDEngine
from dataplane.flowserve.semipd.metrics import SemiPDCollector
from dataplane.flowserve.startup import StartupClock
from dataplane.flowserve.stream import KVExported, KVSource, RequestStream
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
    kv_store: KVStore
    http: httpx.AsyncClient  # fetches imported K/V
    startup: StartupClock | None = None
    role: InstanceRole = "colocated"
    device_share: DeviceShare | None = None  # its platform's: exports K/V by cuda_ipc
    kv_imports: SharedImports | None = None  # imports K/V by cuda_ipc
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

    async def lines(
        self, export: Callable[[KVExported], Awaitable[Event]] | None = None
    ) -> AsyncIterator[str]:
        """`export` turns a prefill's end into the done event the client sees."""
        while not self.finished:
            event = await self.events.get()
            if isinstance(event, KVExported):
                assert export is not None
                event = await export(event)
            assert not isinstance(event, KVExported)
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
    kv_source = None
    if req.kv_source is not None:
        if req.request_id in inst.in_flight:  # before taking the K/V another request may need
            return _duplicate(req.request_id)
        logprobs = req.sampling.logprobs or req.sampling.top_logprobs > 0
        imported = await _import_kv(inst, req.kv_source, prompt.token_ids, logprobs)
        if not isinstance(imported, KVSource):
            return imported
        kv_source = imported
    # Checked after the last await, so the check and the add below cannot interleave.
    if req.request_id in inst.in_flight:
        return _duplicate(req.request_id)

    stream = RequestStream(
        req.request_id,
        prompt.token_ids,
        params,
        inst.engine.tokenizer,
        inst.token_texts,
        prompt.text if req.echo else None,
        prefill_only=req.prefill_only is not None,
        export_on_device=_export_on_device(inst, req.prefill_only),
        kv_source=kv_source,
    )
    subscription = _Subscription()
    loop = asyncio.get_running_loop()

    def sink(event: Event) -> None:  # called on the engine thread
        loop.call_soon_threadsafe(subscription.events.put_nowait, event)

    def close() -> None:
        inst.in_flight.discard(req.request_id)
        if not subscription.finished:  # the client went away mid-stream
            inst.driver.abort(req.request_id)

    export = None
    if req.prefill_only is not None:
        transport = req.prefill_only.transport
        on_device = stream.export_on_device

        async def export(event: KVExported) -> Event:
            return await _export_kv(inst, _kv_url_base(request), transport, on_device, event)

    inst.in_flight.add(req.request_id)
    inst.driver.submit(stream, sink)
    return EventStream(subscription.lines(export), close)


def _export_on_device(inst: _Instance, prefill_only: PrefillOnly | None) -> bool:
    """A same-node hand-off from a platform that shares device memory: the K/V stay there."""
    return (
        prefill_only is not None
        and prefill_only.transport != "stream"
        and inst.device_share is not None
    )


def _duplicate(request_id: str) -> Response:
    return error_response(
        409,
        f"request id {request_id!r} is already in flight",
        param="request_id",
        code="duplicate_request_id",
    )


async def _import_kv(
    inst: _Instance, handle: KVHandle, prompt_token_ids: list[int], logprobs: bool
) -> KVSource | Response:
    """Fetch a decode request's K/V and check them against its prompt, or the 409 to answer."""
    metrics, engine = inst.metrics, inst.engine
    unfit = None
    if handle.num_tokens != len(prompt_token_ids):
        unfit = (
            f"the K/V are of {handle.num_tokens} tokens but this instance tokenizes the prompt "
            f"to {len(prompt_token_ids)}"
        )
    elif logprobs:  # the prefill instance sampled the first token; its logprob stayed there
        unfit = "imported K/V carry no logprobs for the first token: compute the prompt here"
    if unfit is not None:
        await discard(handle, inst.kv_store.config, inst.http)
        metrics.record_kv_transfer("import", "mismatch")
        return error_response(409, unfit, param="kv_source", code="kv_mismatch")
    try:
        fetched = await fetch(handle, inst.kv_store.config, inst.http, inst.kv_imports)
    except KVTransferError as exc:
        metrics.record_kv_transfer("import", "failed")
        return error_response(409, str(exc), param="kv_source", code="kv_transfer_failed")
    try:
        engine.kv_layout.check(fetched.kv, prompt_token_ids, engine.vocab_size)
    except KVMismatch as exc:
        metrics.record_kv_transfer("import", "mismatch")
        return error_response(409, exc.message, param=exc.param, code=exc.code)
    metrics.record_kv_transfer("import", "ok", fetched.num_bytes)
    return KVSource(fetched.kv, handle.transport, fetched.num_bytes, fetched.fetch_s)


async def _export_kv(
    inst: _Instance, url_base: str, transport: KVTransport, on_device: bool, event: KVExported
) -> Event:
    """Store a prefill's K/V for the decode instance; the done event with their handle."""
    transfer_id = uuid.uuid4().hex
    started = time.perf_counter()
    try:
        stored = await run_in_threadpool(
            lambda: hold_export(
                inst.kv_store, transfer_id, transport, event.kv, on_device=on_device
            )
        )
    except KVTransferError as exc:
        inst.metrics.record_kv_transfer("export", "failed")
        return GenerateError(message=str(exc), code="kv_export_failed")
    inst.metrics.record_kv_transfer("export", "ok", stored.num_bytes)
    handle = KVHandle(
        transfer_id=transfer_id,
        transport=stored.transport,
        location=str(stored.path) if stored.path is not None else f"{url_base}/kv/{transfer_id}",
        num_tokens=event.kv.num_tokens,
        num_bytes=stored.num_bytes,
        first_token_id=event.kv.first_token_id,
        export_s=event.kv.export_s + time.perf_counter() - started,
    )
    return event.done.model_copy(update={"kv": handle})


def _kv_url_base(request: Request) -> str:
    """This server's own address (where it listens), or the one the client reached it at when
    it listens on every interface."""
    server = request.scope.get("server")
    if server is not None and server[1] is not None and server[0] not in ("0.0.0.0", "::", ""):
        host, port = server
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return f"{request.url.scheme}://{request.url.netloc}"


async def kv_get(request: Request) -> Response:
    transfer_id = request.path_params["transfer_id"]
    chunks = _instance(request).kv_store.stream(transfer_id)
    if chunks is None:
        return error_response(
            404,
            f"no K/V transfer {transfer_id!r} here (fetched, expired or never made)",
            code="kv_transfer_not_found",
        )
    return StreamingResponse(chunks, media_type="application/octet-stream")


async def kv_share(request: Request) -> Response:
    """A decode instance of this node asks for a handle of a cuda_ipc transfer's device memory;
    it copies the K/V, then deletes the transfer."""
    inst = _instance(request)
    transfer_id = request.path_params["transfer_id"]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_response(400, "the body is not valid JSON")
    kv = inst.kv_store.claim(transfer_id)
    if kv is None or inst.device_share is None:
        return error_response(
            404,
            f"no K/V transfer {transfer_id!r} to share here (taken, expired or never made)",
            code="kv_transfer_not_found",
        )
    try:
        answer = await run_in_threadpool(share_answer, kv, body, inst.device_share)
    except DeviceShareError as exc:
        inst.kv_store.discard(transfer_id)  # the one decode instance sent it cannot open it
        return error_response(409, str(exc), code="kv_share_refused")
    return JSONResponse(answer)


async def kv_delete(request: Request) -> Response:
    transfer_id = request.path_params["transfer_id"]
    deleted = _instance(request).kv_store.discard(transfer_id)
    return JSONResponse({"transfer_id": transfer_id, "deleted": deleted})


async def _expire_transfers(store: KVStore, metrics: Metrics) -> None:
    """Drop unfetched K/V past their TTL, checking a few times per TTL (at most every second)."""
    while True:
        await asyncio.sleep(min(1.0, store.config.ttl_s / 4))
        for _ in await run_in_threadpool(store.expire):
            metrics.record_kv_transfer("export", "expired")


async def abort(request: Request) -> Response:
    inst = _instance(request)
    request_id = request.path_params["request_id"]
    known = request_id in inst.in_flight
    if known:
        inst.driver.abort(request_id)
    return JSONResponse({"request_id": request_id, "aborted": known})


async def semipd(request: Request) -> Response:
    engine = _instance(request).engine
    if not isinstance(engine, SemiPDEngine):
        return error_response(404, "this instance does not run semi-PD", code="not_semi_pd")
    return JSONResponse(engine.report().to_dict())


async def metrics(request: Request) -> Response:
    return Response(_instance(request).metrics.render(), media_type=CONTENT_TYPE)


def create_app(
    load_engine: Callable[[], Engine],
    *,
    model_name: str,
    instance_id: str | None = None,
    startup: StartupClock | None = None,
    role: InstanceRole = "colocated",
    kv_transfer: KVTransferConfig | None = None,
) -> Starlette:
    """`load_engine` runs once at start-up, off the event loop. `startup`, when given, is
    marked ready once the engine runs, and reported by /health. `kv_transfer`: where exported
    K/V wait and for how long (default: `KVTransferConfig.default_shm_dir()`, 60 s)."""
    kv_config = kv_transfer or KVTransferConfig(KVTransferConfig.default_shm_dir())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = await run_in_threadpool(load_engine)
        # Always in the instance's log, whatever the log level: operators size nodes by it.
        print(f"flowserve {model_name}: {engine.describe_kv_cache()}", file=sys.stderr, flush=True)
        metrics = Metrics(model_name)
        driver = EngineDriver(engine, metrics)
        metrics.watch(lambda: driver.stats)
        if isinstance(engine, SemiPDEngine):
            metrics.registry.register(SemiPDCollector(model_name, engine))
        kv_store = KVStore(kv_config)
        http = httpx.AsyncClient(timeout=kv_config.fetch_timeout_s)
        share = engine.platform.device_share()
        imports = None if share is None else SharedImports(share, kv_config.max_device_bytes)
        app.state.instance = _Instance(
            engine,
            driver,
            metrics,
            TokenTexts(engine.tokenizer),
            model_name,
            instance_id,
            kv_store,
            http,
            startup,
            role,
            device_share=share,
            kv_imports=imports,
        )
        driver.start()
        if startup is not None:
            startup.mark_ready(engine.weights_loaded_at, engine.weights.source)
        expiry = asyncio.create_task(_expire_transfers(kv_store, metrics))
        try:
            yield
        finally:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
            await run_in_threadpool(driver.stop)
            await run_in_threadpool(engine.close)
            await http.aclose()
            kv_store.close()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/abort/{request_id:path}", abort, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/semipd", semipd, methods=["GET"]),
        Route("/kv/{transfer_id}", kv_get, methods=["GET"]),
        Route("/kv/{transfer_id}/share", kv_share, methods=["POST"]),
        Route("/kv/{transfer_id}", kv_delete, methods=["DELETE"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
