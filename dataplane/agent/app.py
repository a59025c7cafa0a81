"""The node agent's HTTP API and lifespan.

The lifespan owns everything: the control plane client, the reporter, the supervisor and the
registration/heartbeat loop. On the way out it stops every instance before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controlplane.wire import ErrorBody, ErrorDetail, InstanceStart, NodeRegister, NodeResources
from dataplane.agent.control_plane import ControlPlaneClient, Reporter
from dataplane.agent.errors import (
    AgentError,
    InstanceConflict,
    InvalidStart,
    ShuttingDown,
    UnknownInstance,
)
from dataplane.agent.heartbeat import NodeLink
from dataplane.agent.launch import CommandFor, flowserve_command
from dataplane.agent.resources import detect_resources
from dataplane.agent.settings import AgentSettings
from dataplane.agent.supervisor import Supervisor

log = logging.getLogger(__name__)

REPORT_DRAIN_S = 3.0


@dataclass(slots=True)
class Agent:
    settings: AgentSettings
    supervisor: Supervisor
    link: NodeLink


def create_app(
    settings: AgentSettings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    command_for: CommandFor | None = None,
    resources: NodeResources | None = None,
) -> Starlette:
    """The agent app. `transport` replaces the network to the control plane, `command_for` the
    FlowServe command line, `resources` the detected hardware (all three for tests)."""

    def default_command(start: InstanceStart, port: int) -> list[str]:
        return flowserve_command(start, port, settings.instance_host)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        found = resources if resources is not None else await asyncio.to_thread(detect_resources)
        client = ControlPlaneClient(
            settings.control_plane_url, timeout_s=settings.request_timeout_s, transport=transport
        )
        reporter = Reporter(client)
        supervisor = Supervisor(
            log_dir=settings.instance_log_dir,
            command_for=command_for or default_command,
            on_change=reporter.push,
            start_timeout_s=settings.start_timeout_s,
            stop_grace_s=settings.stop_grace_s,
            poll_interval_s=settings.poll_interval_s,
            instance_host=settings.instance_host,
        )
        link = NodeLink(
            client,
            NodeRegister(name=settings.name, url=settings.url, resources=found),
            supervisor.reports,
            backoff_s=settings.register_backoff_s,
            backoff_max_s=settings.register_backoff_max_s,
        )
        app.state.agent = Agent(settings=settings, supervisor=supervisor, link=link)
        tasks = [
            asyncio.create_task(reporter.run(), name="reporter"),
            asyncio.create_task(link.run(), name="node-link"),
        ]
        try:
            yield
        finally:
            tasks[1].cancel()
            await supervisor.aclose()
            await reporter.drain(REPORT_DRAIN_S)
            tasks[0].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()
            log.info("node agent stopped")

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/instances", list_instances, methods=["GET"]),
            Route("/instances", start_instance, methods=["POST"]),
            Route("/instances/{instance_id}", get_instance, methods=["GET"]),
            Route("/instances/{instance_id}", stop_instance, methods=["DELETE"]),
        ],
        lifespan=lifespan,
        exception_handlers={
            AgentError: agent_error,
            HTTPException: http_error,
            Exception: server_error,
        },
    )


def _agent(request: Request) -> Agent:
    agent: Agent = request.app.state.agent
    return agent


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "node_id": _agent(request).link.node_id})


async def list_instances(request: Request) -> Response:
    reports = _agent(request).supervisor.reports()
    return JSONResponse([r.model_dump(mode="json") for r in reports])


async def get_instance(request: Request) -> Response:
    report = _agent(request).supervisor.get(request.path_params["instance_id"])
    return JSONResponse(report.model_dump(mode="json"))


async def start_instance(request: Request) -> Response:
    try:
        start = InstanceStart.model_validate(json.loads(await request.body()))
    except json.JSONDecodeError as exc:
        raise InvalidStart(f"body is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidStart(f"{param}: {first['msg']}" if param else first["msg"], param) from exc
    report = _agent(request).supervisor.start(start)
    return JSONResponse(report.model_dump(mode="json"), status_code=202)


async def stop_instance(request: Request) -> Response:
    report = await _agent(request).supervisor.stop(request.path_params["instance_id"])
    return JSONResponse(report.model_dump(mode="json"))


# -- errors: OpenAI's body everywhere --------------------------------------------------------


def error_response(
    status: int, message: str, type_: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


async def agent_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, InvalidStart):
        return error_response(400, str(exc), "invalid_request_error", "invalid_body", exc.param)
    if isinstance(exc, UnknownInstance):
        return error_response(404, str(exc), "invalid_request_error", "instance_not_found")
    if isinstance(exc, InstanceConflict):
        return error_response(409, str(exc), "invalid_request_error", "instance_exists")
    if isinstance(exc, ShuttingDown):
        return error_response(503, str(exc), "server_error", "shutting_down")
    log.error("unexpected agent error on %s %s: %s", request.method, request.url.path, exc)
    return error_response(500, str(exc), "server_error")


async def http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
    return error_response(status, detail, "invalid_request_error")


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error in the node agent", "server_error")
