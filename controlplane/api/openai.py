"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from controlplane import wire
from controlplane.api.errors import parse_body
from controlplane.db import fine_tune_store
from controlplane.db.session import Database
from controlplane.errors import DeepFlowError, InvalidRequest, NotFound, UpstreamFailed
from controlplane.jobs.chat import ChatExecutor
from controlplane.jobs.chat_run import ChatRun, ChatSpec, new_id
from controlplane.states import RequestKind

FINGERPRINT = "deepflow-flowserve"


def sampling_of(body: wire.SamplingFields, max_tokens: int | None) -> wire.SamplingSpec:
    logprobs = False
    top_logprobs = 0
    if isinstance(body, wire.ChatCompletionRequest):
        logprobs = body.logprobs
        top_logprobs = body.top_logprobs or 0
    elif isinstance(body, wire.CompletionRequest) and body.logprobs is not None:
        logprobs = True
        top_logprobs = body.logprobs
    return wire.SamplingSpec(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=-1 if body.top_k is None else body.top_k,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=body.seed,
        stop=body.stop_list(),
        ignore_eos=body.ignore_eos,
        n=body.n,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        priority=body.priority,
    )


def chat_spec(body: wire.ChatCompletionRequest) -> ChatSpec:
    generate = wire.GenerateRequest(
        request_id=new_id("chatcmpl"),
        messages=body.messages,
        sampling=sampling_of(body, body.token_limit()),
    )
    return ChatSpec(body.model, RequestKind.CHAT_COMPLETION, generate)


def completion_spec(body: wire.CompletionRequest) -> ChatSpec:
    if body.echo and body.stream:
        raise InvalidRequest("echo is not supported with stream", param="echo")
    prompt = body.prompt
    generate = wire.GenerateRequest(
        request_id=new_id("cmpl"),
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=prompt if isinstance(prompt, list) else None,  # type: ignore[arg-type]
        sampling=sampling_of(body, body.max_tokens),
        echo=body.echo,
    )
    return ChatSpec(body.model, RequestKind.COMPLETION, generate)


def usage_of(run: ChatRun) -> wire.Usage:
    prompt = run.usage.prompt_tokens if run.usage else 0
    completion = run.usage.completion_tokens if run.usage else run.completion_tokens
    return wire.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def chat_logprobs(delta: wire.GenerateDelta) -> wire.ChoiceLogprobs | None:
    return None if delta.logprobs is None else wire.ChoiceLogprobs(content=delta.logprobs)


def completion_logprobs(delta: wire.GenerateDelta, offset: int) -> wire.CompletionLogprobs | None:
    if delta.logprobs is None:
        return None
    out = wire.CompletionLogprobs()
    for entry in delta.logprobs:
        out.tokens.append(entry.token)
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append({alt.token: alt.logprob for alt in entry.top_logprobs})
        out.text_offset.append(offset)
        offset += len(entry.token)
    return out


def sse(payload: wire.Open | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, wire.Open) else json.dumps(payload)
    return f"data: {data}\n\n"


class OpenAIRoutes:
    def __init__(
        self, executor: ChatExecutor, max_body_bytes: int, db: Database | None = None
    ) -> None:
        self.executor = executor
        self.max_body_bytes = max_body_bytes
        self.db = db  # for the fine-tuned models, which are listed besides the deployments

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{name}", self.get_model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]

    async def list_models(self, _request: Request) -> Response:
        cards = [self._card(name) for name in self.executor.registry.deployment_names()]
        cards += await self._fine_tuned()
        return JSONResponse(wire.ModelList(data=cards).model_dump())

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if self.executor.registry.has_deployment(name):
            return JSONResponse(self._card(name).model_dump())
        for card in await self._fine_tuned():
            if card.id == name:
                return JSONResponse(card.model_dump())
        raise_unknown_model(name)

    async def _fine_tuned(self) -> list[wire.ModelCard]:
        """Fine-tuned models (`ft:...`): registered models, served once deployed."""
        if self.db is None:
            return []
        rows = await self.db.run(fine_tune_store.fine_tuned_models)
        return [wire.ModelCard(id=r.name, created=int(r.created_at)) for r in rows]

    def _card(self, name: str) -> wire.ModelCard:
        return wire.ModelCard(id=name, created=0)

    async def chat_completions(self, request: Request) -> Response:
        body = await parse_body(request, wire.ChatCompletionRequest, self.max_body_bytes)
        return await self._serve(request, chat_spec(body), body, chat=True)

    async def completions(self, request: Request) -> Response:
        body = await parse_body(request, wire.CompletionRequest, self.max_body_bytes)
        return await self._serve(request, completion_spec(body), body, chat=False)

    async def _serve(
        self, request: Request, spec: ChatSpec, body: wire.SamplingFields, *, chat: bool
    ) -> Response:
        run = await _start_until_disconnect(request, self.executor, spec)
        model = body.model
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            encode = _chat_chunks if chat else _completion_chunks
            return StreamingResponse(
                _stream(run, encode(run, model), include_usage, chat),
                media_type="text/event-stream",
                headers={"X-Request-Id": run.id, "Cache-Control": "no-cache"},
            )
        collect = _collect_chat if chat else _collect_completion
        reply = await _until_disconnect(request, run, collect)
        return JSONResponse(reply.model_dump(), headers={"X-Request-Id": run.id})


def raise_unknown_model(name: str) -> NoReturn:
    raise NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found")


Encoder = Callable[[wire.GenerateDelta], list[wire.Open]]


def _chat_chunks(run: ChatRun, model: str) -> Encoder:
    started: set[int] = set()

    def encode(delta: wire.GenerateDelta) -> list[wire.Open]:
        chunks: list[wire.Open] = []

        def chunk(choice: wire.ChatChunkChoice) -> wire.ChatCompletionChunk:
            return wire.ChatCompletionChunk(
                id=run.id,
                created=run.created,
                model=model,
                choices=[choice],
                system_fingerprint=FINGERPRINT,
            )

        if delta.index not in started:
            started.add(delta.index)
            role = wire.ChatDelta(role="assistant", content="")
            chunks.append(chunk(wire.ChatChunkChoice(index=delta.index, delta=role)))
        if delta.text or delta.logprobs:
            content = wire.ChatDelta(content=delta.text)
            choice = wire.ChatChunkChoice(
                index=delta.index, delta=content, logprobs=chat_logprobs(delta)
            )
            chunks.append(chunk(choice))
        if delta.finish_reason is not None:
            end = wire.ChatChunkChoice(
                index=delta.index, delta=wire.ChatDelta(), finish_reason=delta.finish_reason
            )
            chunks.append(chunk(end))
        return chunks

    return encode


def _completion_chunks(run: ChatRun, model: str) -> Encoder:
    offsets: dict[int, int] = {}

    def encode(delta: wire.GenerateDelta) -> list[wire.Open]:
        offset = offsets.get(delta.index, 0)
        offsets[delta.index] = offset + len(delta.text)
        choice = wire.CompletionChoice(
            index=delta.index,
            text=delta.text,
            logprobs=completion_logprobs(delta, offset),
            finish_reason=delta.finish_reason,
        )
        return [
            wire.Completion(
                id=run.id,
                created=run.created,
                model=model,
                choices=[choice],
                system_fingerprint=FINGERPRINT,
            )
        ]

    return encode


async def _stream(
    run: ChatRun, encode: Encoder, include_usage: bool, chat: bool
) -> AsyncIterator[str]:
    try:
        async for event in run.events():
            if isinstance(event, wire.GenerateDelta):
                for chunk in encode(event):
                    yield sse(chunk)
        if include_usage:
            final: wire.Open
            if chat:
                final = wire.ChatCompletionChunk(
                    id=run.id, created=run.created, model=run.model, choices=[], usage=usage_of(run)
                )
            else:
                final = wire.Completion(
                    id=run.id, created=run.created, model=run.model, choices=[], usage=usage_of(run)
                )
            yield sse(final)
        yield "data: [DONE]\n\n"
    except DeepFlowError as exc:
        run.fail(exc.message)
        yield sse(
            {"error": {"message": exc.message, "type": exc.type, "param": None, "code": exc.code}}
        )
    except Exception as exc:
        run.fail(repr(exc))
        yield sse(
            {
                "error": {
                    "message": "internal error",
                    "type": "internal_error",
                    "param": None,
                    "code": None,
                }
            }
        )
    finally:
        await run.close()


async def _start_until_disconnect(
    request: Request, executor: ChatExecutor, spec: ChatSpec
) -> ChatRun:
    """Start the request, cancelling it if the client goes away meanwhile: a PD request's
    prefill task runs before any reply, and a cancel aborts it on its instance."""
    start = asyncio.ensure_future(executor.start(spec))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({start, gone}, return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            return start.result()
        start.cancel()
        try:
            run = await start
        except asyncio.CancelledError:
            pass
        else:  # it had just started after all
            await run.close()
        raise asyncio.CancelledError("client disconnected")
    finally:
        gone.cancel()
        if not start.done():
            start.cancel()


async def _until_disconnect(
    request: Request, run: ChatRun, collect: Callable[[ChatRun], Any]
) -> Any:
    """Collect a non-streamed reply, cancelling the task if the client goes away meanwhile."""
    work = asyncio.ensure_future(collect(run))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        raise asyncio.CancelledError("client disconnected")
    except UpstreamFailed as exc:
        run.fail(exc.message)
        raise
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
        await run.close()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect_chat(run: ChatRun) -> wire.ChatCompletion:
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, list[wire.TokenLogprob]] = {}
    finish: dict[int, wire.FinishReason | None] = {}
    async for event in run.events():
        if isinstance(event, wire.GenerateDelta):
            texts.setdefault(event.index, []).append(event.text)
            if event.logprobs is not None:
                logprobs.setdefault(event.index, []).extend(event.logprobs)
            if event.finish_reason is not None:
                finish[event.index] = event.finish_reason
    choices = [
        wire.ChatChoice(
            index=i,
            message=wire.AssistantMessage(content="".join(texts[i])),
            logprobs=wire.ChoiceLogprobs(content=logprobs[i]) if i in logprobs else None,
            finish_reason=finish.get(i),
        )
        for i in sorted(texts)
    ]
    return wire.ChatCompletion(
        id=run.id,
        created=run.created,
        model=run.model,
        choices=choices,
        usage=usage_of(run),
        system_fingerprint=FINGERPRINT,
    )


async def _collect_completion(run: ChatRun) -> wire.Completion:
    texts: dict[int, list[str]] = {}
    finish: dict[int, wire.FinishReason | None] = {}
    lps: dict[int, wire.CompletionLogprobs] = {}
    for_offset: dict[int, int] = {}
    async for event in run.events():
        if isinstance(event, wire.GenerateDelta):
            texts.setdefault(event.index, []).append(event.text)
            offset = for_offset.get(event.index, 0)
            for_offset[event.index] = offset + len(event.text)
            part = completion_logprobs(event, offset)
            if part is not None:
                acc = lps.setdefault(event.index, wire.CompletionLogprobs())
                acc.tokens += part.tokens
                acc.token_logprobs += part.token_logprobs
                acc.top_logprobs += part.top_logprobs
                acc.text_offset += part.text_offset
            if event.finish_reason is not None:
                finish[event.index] = event.finish_reason
    prefix = run.usage.prompt_text if run.usage and run.usage.prompt_text else ""
    choices = [
        wire.CompletionChoice(
            index=i,
            text=prefix + "".join(texts[i]),
            logprobs=lps.get(i),
            finish_reason=finish.get(i),
        )
        for i in sorted(texts)
    ]
    return wire.Completion(
        id=run.id,
        created=run.created,
        model=run.model,
        choices=choices,
        usage=usage_of(run),
        system_fingerprint=FINGERPRINT,
    )
