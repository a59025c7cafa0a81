"""The node agent's HTTP API and lifespan.

The lifespan owns everything: the control plane client, the reporter, the launcher (its warm
pool and zygotes), the preloader, the instance and training supervisors and the
registration/heartbeat loop. On the way out it stops every instance, every trainer, the zygotes
and the idle warm pods before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controlplane.wire import (
    ErrorBody,
    ErrorDetail,
    InstanceStart,
    NodeRegister,
    NodeResources,
    PreloadStart,
    TrainingStart,
)
from dataplane.agent.control_plane import ControlPlaneClient, Reporter
from dataplane.agent.errors import (
    AgentError,
    InstanceConflict,
    InvalidStart,
    ShuttingDown,
    TaskRunning,
    UnknownInstance,
    UnknownTask,
)
from dataplane.agent.heartbeat import NodeLink
from dataplane.agent.launch import CommandFor
from dataplane.agent.launchers import InstanceLauncher, scaleout_launcher
from dataplane.agent.preload import Preloader
from dataplane.agent.resources import detect_resources
from dataplane.agent.settings import AgentSettings
from dataplane.agent.supervisor import Supervisor
from dataplane.agent.training import TrainingSupervisor
from dataplane.agent.training_launch import TrainerCommand, trainer_command
from dataplane.scaleout.settings import default_cache_root

log = logging.getLogger(__name__)

REPORT_DRAIN_S = 3.0
M = TypeVar("M", bound=BaseModel)


@dataclass(slots=True)
class Agent:
    settings: AgentSettings
    supervisor: Supervisor
    training: TrainingSupervisor
    link: NodeLink
    preloader: Preloader


def create_app(
    settings: AgentSettings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    command_for: CommandFor | None = None,
    resources: NodeResources | None = None,
    trainer_command_for: TrainerCommand | None = None,
) -> Starlette:
    """The agent app. `transport` replaces the network to the control plane, `command_for` the
    FlowServe command line (and with it the launcher: only that command, cold), `resources` the
    detected hardware, `trainer_command_for` the trainer's command line (all four for tests)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        found = resources if resources is not None else await asyncio.to_thread(detect_resources)
        client = ControlPlaneClient(
            settings.control_plane_url, timeout_s=settings.request_timeout_s, transport=transport
        )
        reporter = Reporter(client)
        launcher = scaleout_launcher(settings) if command_for is None else None
        if launcher is not None and launcher.pool is not None:
            launcher.pool.start()
        zygotes = settings.zygotes if settings.zygotes is not None else found.device == "cpu"
        preloader = Preloader(
            launcher,
            cache_dir=settings.cache_dir or default_cache_root(),
            cache_budget_bytes=settings.cache_budget_bytes,
            zygotes=zygotes,
            timeout_s=settings.preload_timeout_s,
        )
        instance_launcher: InstanceLauncher | None = launcher
        supervisor = Supervisor(
            log_dir=settings.instance_log_dir,
            command_for=command_for,
            launcher=instance_launcher,
            on_change=reporter.push,
            start_timeout_s=settings.start_timeout_s,
            stop_grace_s=settings.stop_grace_s,
            poll_interval_s=settings.poll_interval_s,
            ready_poll_interval_s=settings.ready_poll_interval_s,
            instance_host=settings.instance_host,
        )
        training = TrainingSupervisor(
            log_dir=settings.training_log_dir,
            spec_dir=settings.training_spec_dir,
            on_change=reporter.push,
            command_for=trainer_command_for or trainer_command,
            stop_grace_s=settings.training_stop_grace_s,
            # A given trainer command line is run as given, never in a warm pod.
            pool=launcher.pool if launcher is not None and trainer_command_for is None else None,
        )
        link = NodeLink(
            client,
            NodeRegister(name=settings.name, url=settings.url, resources=found),
            supervisor.reports,
            training=training.reports,
            backoff_s=settings.register_backoff_s,
            backoff_max_s=settings.register_backoff_max_s,
        )
        app.state.agent = Agent(
            settings=settings,
            supervisor=supervisor,
            training=training,
            link=link,
            preloader=preloader,
        )
        tasks = [
            asyncio.create_task(reporter.run(), name="reporter"),
            asyncio.create_task(link.run(), name="node-link"),
        ]
        try:
            yield
        finally:
            tasks[1].cancel()
            await asyncio.gather(supervisor.aclose(), training.stop_all(), preloader.aclose())
            if launcher is not None:
                await asyncio.to_thread(launcher.close)  # zygotes and idle warm pods
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
            Route("/preload", list_preloads, methods=["GET"]),
            Route("/preload", start_preload, methods=["POST"]),
            Route("/training", list_training, methods=["GET"]),
            Route("/training", start_training, methods=["POST"]),
            Route("/training/{task_id}", get_training, methods=["GET"]),
            Route("/training/{task_id}", stop_training, methods=["DELETE"]),
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


async def _body(request: Request, model: type[M]) -> M:
    try:
        return model.model_validate(json.loads(await request.body()))
    except json.JSONDecodeError as exc:
        raise InvalidStart(f"body is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidStart(f"{param}: {first['msg']}" if param else first["msg"], param) from exc


async def start_instance(request: Request) -> Response:
    start = await _body(request, InstanceStart)
    report = _agent(request).supervisor.start(start)
    return JSONResponse(report.model_dump(mode="json"), status_code=202)


async def stop_instance(request: Request) -> Response:
    report = await _agent(request).supervisor.stop(request.path_params["instance_id"])
    return JSONResponse(report.model_dump(mode="json"))


async def list_preloads(request: Request) -> Response:
    listing = _agent(request).preloader.listing()
    return JSONResponse(listing.model_dump(mode="json"))


async def start_preload(request: Request) -> Response:
    body = await _body(request, PreloadStart)
    report = _agent(request).preloader.request(body)
    return JSONResponse(report.model_dump(mode="json"), status_code=202)


async def list_training(request: Request) -> Response:
    reports = _agent(request).training.reports()
    return JSONResponse([r.model_dump(mode="json") for r in reports])


async def get_training(request: Request) -> Response:
    report = _agent(request).training.get(request.path_params["task_id"])
    return JSONResponse(report.model_dump(mode="json"))


async def start_training(request: Request) -> Response:
    start = await _body(request, TrainingStart)
    report = _agent(request).training.start(start)
    return JSONResponse(report.model_dump(mode="json"), status_code=202)


async def stop_training(request: Request) -> Response:
    report = await _agent(request).training.stop(request.path_params["task_id"])
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
    if isinstance(exc, UnknownTask):
        return error_response(404, str(exc), "invalid_request_error", "task_not_found")
    if isinstance(exc, TaskRunning):
        return error_response(409, str(exc), "invalid_request_error", "task_running")
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
