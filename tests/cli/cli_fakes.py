"""An in-process fake of the control plane's HTTP API, and canned records built from wire models."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel
from typer.testing import Result

from controlplane import wire

NOW = 1_700_000_000.0

Invoke = Callable[..., Result]  # the `cli` fixture: run `deepflow ARGS...`
Reply = httpx.Response | BaseModel | list[BaseModel] | Callable[[httpx.Request], Any]


def error_reply(status: int, message: str, type_: str = "invalid_request_error") -> httpx.Response:
    body = wire.ErrorBody(error=wire.ErrorDetail(message=message, type=type_))
    return httpx.Response(status, json=body.model_dump(mode="json"))


def refuse(request: httpx.Request) -> httpx.Response:
    """A reply for `FakeApi.on`: nothing listens (yet)."""
    raise httpx.ConnectError("connection refused", request=request)


def sse_reply(deltas: list[str], model: str = "demo") -> httpx.Response:
    chunks = [
        wire.ChatCompletionChunk(
            id="chatcmpl-1",
            created=int(NOW),
            model=model,
            choices=[wire.ChatChunkChoice(index=0, delta=wire.ChatDelta(role="assistant"))],
        )
    ]
    for text in deltas:
        chunks.append(
            wire.ChatCompletionChunk(
                id="chatcmpl-1",
                created=int(NOW),
                model=model,
                choices=[wire.ChatChunkChoice(index=0, delta=wire.ChatDelta(content=text))],
            )
        )
    body = "".join(f"data: {c.model_dump_json()}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


@dataclass
class FakeApi:
    """Routes `(METHOD, path)` to canned replies; a list of replies is served one per call."""

    routes: dict[tuple[str, str], list[Reply]] = field(default_factory=dict)
    seen: list[httpx.Request] = field(default_factory=list)
    unreachable: bool = False
    urls: list[str] = field(default_factory=list)  # base URLs clients were made for

    def on(self, method: str, path: str, *replies: Reply) -> None:
        self.routes[(method, path)] = list(replies)

    def bodies(self, method: str, path: str) -> list[Any]:
        return [
            json.loads(r.content) if r.content else None
            for r in self.seen
            if r.method == method and r.url.path == path
        ]

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.unreachable:
            raise httpx.ConnectError("connection refused", request=request)
        self.seen.append(request)
        replies = self.routes.get((request.method, request.url.path))
        if not replies:
            return error_reply(404, f"no route {request.method} {request.url.path}", "not_found")
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if callable(reply) and not isinstance(reply, BaseModel):
            reply = reply(request)
        if isinstance(reply, httpx.Response):
            return reply
        if isinstance(reply, list):
            envelope = wire.ListOf(data=[item.model_dump(mode="json") for item in reply])
            return httpx.Response(200, json=envelope.model_dump(mode="json"))
        status = 201 if request.method == "POST" else 200
        return httpx.Response(status, json=reply.model_dump(mode="json"))

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


# -- canned records ------------------------------------------------------------------------------


def model(name: str = "tiny", path: str = "/models/tiny") -> wire.ModelInfo:
    return wire.ModelInfo(
        name=name,
        path=path,
        source="random:tiny",
        architecture="LlamaForCausalLM",
        num_parameters=120_000,
        size_bytes=500_000,
        created_at=NOW,
    )


def instance(state: str = "ready", deployment: str = "demo") -> wire.InstanceInfo:
    return wire.InstanceInfo(
        id="inst-1",
        deployment=deployment,
        model="tiny",
        node_id="node-1",
        state=state,
        url="http://127.0.0.1:9000",
        pid=4242,
        created_at=NOW,
        updated_at=NOW,
    )


def deployment(
    name: str = "demo", replicas: int = 1, ready: int = 1, instances: int = 1
) -> wire.DeploymentInfo:
    return wire.DeploymentInfo(
        name=name,
        model="tiny",
        replicas=replicas,
        ready_replicas=ready,
        created_at=NOW,
        instances=[instance("ready" if ready else "starting", name) for _ in range(instances)],
    )


def node(state: str = "ready") -> wire.NodeInfo:
    return wire.NodeInfo(
        id="node-1",
        name="local",
        url="http://127.0.0.1:8481",
        state=state,
        resources=wire.NodeResources(cpus=8, memory_bytes=16 * 1024**3),
        last_heartbeat_at=NOW,
        created_at=NOW,
    )


def platform(nodes: list[wire.NodeInfo] | None = None) -> wire.PlatformStatus:
    return wire.PlatformStatus(
        version="0.1.0",
        url="http://127.0.0.1:8480",
        database="sqlite:///deepflow.db",
        home="/tmp/deepflow",
        nodes=[node()] if nodes is None else nodes,
        deployments=[deployment()],
    )


def event(kind: str, entity_id: str, old: str | None, new: str, at: float) -> wire.EventInfo:
    return wire.EventInfo(
        entity_kind=kind, entity_id=entity_id, from_state=old, to_state=new, reason="test", at=at
    )


def request_record(state: str = "finished") -> wire.RequestInfo:
    task = wire.TaskInfo(
        id="task-1",
        job_id="job-1",
        kind="colocated",
        state=state,
        instance_id="inst-1",
        created_at=NOW,
        events=[event("task", "task-1", None, "running", NOW + 0.2)],
    )
    job = wire.JobInfo(
        id="job-1",
        request_id="req-1",
        kind="chat",
        state=state,
        created_at=NOW,
        tasks=[task],
        events=[event("job", "job-1", None, "queued", NOW + 0.1)],
    )
    return wire.RequestInfo(
        id="req-1",
        kind="chat",
        deployment="demo",
        state=state,
        prompt_tokens=5,
        completion_tokens=7,
        created_at=NOW,
        jobs=[job],
        events=[
            event("request", "req-1", None, "queued", NOW),
            event("request", "req-1", "queued", "running", NOW + 0.3),
        ],
    )
