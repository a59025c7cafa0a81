"""Management API (/api/v1): models, deployments, nodes, instances, requests, jobs, tasks."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controlplane import __version__, wire
from controlplane.api.errors import parse_body
from controlplane.db import scaling_store, store
from controlplane.db import tables as t
from controlplane.db.recorder import Recorder
from controlplane.db.session import Database
from controlplane.errors import InvalidRequest
from controlplane.reconcile.reconciler import Reconciler
from controlplane.settings import Settings
from controlplane.states import NodeState

PREFIX = "/api/v1"
MAX_LIST = 1000
M = TypeVar("M", bound=BaseModel)
# Where training reports go: the fine-tune executor's `apply_report` and `heartbeat`.
OnTrainingReport = Callable[[wire.TrainingReport], Awaitable[None]]
OnTrainingHeartbeat = Callable[[str, list[wire.TrainingReport]], Awaitable[None]]


def ok(payload: BaseModel | list[Any], status: int = 200) -> JSONResponse:
    if isinstance(payload, list):
        body = wire.ListOf(data=[p.model_dump(mode="json") for p in payload]).model_dump()
        return JSONResponse(body, status_code=status)
    return JSONResponse(payload.model_dump(mode="json"), status_code=status)


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST:
        raise InvalidRequest(f"limit must be an integer in 1..{MAX_LIST}", param="limit")
    return int(raw)


class ManageRoutes:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        recorder: Recorder,
        reconciler: Reconciler,
        clock: Callable[[], float],
        on_training_report: OnTrainingReport | None = None,
        on_training_heartbeat: OnTrainingHeartbeat | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.recorder = recorder
        self.reconciler = reconciler
        self.clock = clock
        self.on_training_report = on_training_report
        self.on_training_heartbeat = on_training_heartbeat

    def routes(self) -> list[Route]:
        p = PREFIX
        return [
            Route(f"{p}/status", self.status, methods=["GET"]),
            Route(f"{p}/models", self.list_models, methods=["GET"]),
            Route(f"{p}/models", self.create_model, methods=["POST"]),
            Route(f"{p}/models/{{name}}", self.get_model, methods=["GET"]),
            Route(f"{p}/models/{{name}}", self.delete_model, methods=["DELETE"]),
            Route(f"{p}/deployments", self.list_deployments, methods=["GET"]),
            Route(f"{p}/deployments", self.create_deployment, methods=["POST"]),
            Route(f"{p}/deployments/{{name}}", self.get_deployment, methods=["GET"]),
            Route(f"{p}/deployments/{{name}}", self.update_deployment, methods=["PATCH"]),
            Route(f"{p}/deployments/{{name}}", self.delete_deployment, methods=["DELETE"]),
            Route(f"{p}/deployments/{{name}}/scaling", self.scaling_events, methods=["GET"]),
            Route(f"{p}/nodes", self.list_nodes, methods=["GET"]),
            Route(f"{p}/nodes/register", self.register_node, methods=["POST"]),
            Route(f"{p}/nodes/{{id}}", self.get_node, methods=["GET"]),
            Route(f"{p}/nodes/{{id}}/heartbeat", self.node_heartbeat, methods=["POST"]),
            Route(f"{p}/instances", self.list_instances, methods=["GET"]),
            Route(f"{p}/instances/{{id}}", self.get_instance, methods=["GET"]),
            Route(f"{p}/instances/{{id}}/report", self.instance_report, methods=["POST"]),
            Route(f"{p}/requests", self.list_requests, methods=["GET"]),
            Route(f"{p}/requests/{{id}}", self.get_request, methods=["GET"]),
            Route(f"{p}/jobs", self.list_jobs, methods=["GET"]),
            Route(f"{p}/jobs/{{id}}", self.get_job, methods=["GET"]),
            Route(f"{p}/tasks", self.list_tasks, methods=["GET"]),
            Route(f"{p}/tasks/{{id}}", self.get_task, methods=["GET"]),
            Route(f"{p}/tasks/{{id}}/report", self.training_report, methods=["POST"]),
        ]

    async def _body(self, request: Request, model: type[M]) -> M:
        return await parse_body(request, model, self.settings.max_body_bytes)

    # -- platform -----------------------------------------------------------------------------

    async def status(self, _request: Request) -> Response:
        def read(s: Session) -> wire.PlatformStatus:
            return wire.PlatformStatus(
                version=__version__,
                url=self.settings.url,
                database=self.db.engine.url.render_as_string(hide_password=True),
                home=str(self.settings.home),
                nodes=store.list_nodes(s),
                deployments=[store.deployment_info(s, d) for d in store.list_deployments(s)],
            )

        return ok(await self.db.run(read))

    # -- models -------------------------------------------------------------------------------

    async def list_models(self, _request: Request) -> Response:
        return ok(await self.db.run(store.list_models))

    async def create_model(self, request: Request) -> Response:
        spec = await self._body(request, wire.ModelCreate)
        path = Path(spec.path).expanduser()
        if not (path / "config.json").is_file():
            raise InvalidRequest(
                f"{path} is not a Hugging Face model folder (no config.json)", param="path"
            )
        from dataplane.modelstore import ModelStoreError, inspect_folder

        try:
            info = inspect_folder(path)
        except ModelStoreError as exc:
            raise InvalidRequest(str(exc), param="path") from exc
        row = t.Model(
            name=spec.name,
            path=str(path.resolve()),
            source=spec.source,
            architecture=info.architecture,
            num_parameters=info.num_parameters,
            size_bytes=info.size_bytes,
            created_at=self.clock(),
        )
        return ok(await self.db.run(lambda s: store.add_model(s, row)), 201)

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        return ok(await self.db.run(lambda s: store.model_info(store.get_model(s, name))))

    async def delete_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        return ok(await self.db.run(lambda s: store.delete_model(s, name)))

    # -- deployments --------------------------------------------------------------------------

    async def list_deployments(self, _request: Request) -> Response:
        def read(s: Session) -> list[wire.DeploymentInfo]:
            return [store.deployment_info(s, d) for d in store.list_deployments(s)]

        return ok(await self.db.run(read))

    async def create_deployment(self, request: Request) -> Response:
        spec = await self._body(request, wire.DeploymentCreate)
        now = self.clock()

        def write(s: Session) -> wire.DeploymentInfo:
            row = store.add_deployment(s, spec, now)
            s.flush()
            return store.deployment_info(s, row)

        info = await self.db.run(write)
        self.reconciler.kick()
        self.reconciler.autoscaler.request_preload(spec.name, "deployment created")
        return ok(info, 201)

    async def scaling_events(self, request: Request) -> Response:
        name, limit = request.path_params["name"], _limit(request)

        def read(s: Session) -> list[wire.ScalingEventInfo]:
            store.get_deployment(s, name)
            return scaling_store.list_events(s, name, limit=limit)

        return ok(await self.db.run(read))

    async def get_deployment(self, request: Request) -> Response:
        name = request.path_params["name"]
        return ok(
            await self.db.run(lambda s: store.deployment_info(s, store.get_deployment(s, name)))
        )

    async def update_deployment(self, request: Request) -> Response:
        name = request.path_params["name"]
        spec = await self._body(request, wire.DeploymentUpdate)
        now = self.clock()

        def write(s: Session) -> wire.DeploymentInfo:
            row = store.update_deployment(s, name, spec, now)
            s.flush()
            return store.deployment_info(s, row)

        info = await self.db.run(write)
        self.reconciler.kick()
        return ok(info)

    async def delete_deployment(self, request: Request) -> Response:
        name = request.path_params["name"]

        def write(s: Session) -> wire.DeploymentInfo:
            info = store.deployment_info(s, store.get_deployment(s, name))
            store.delete_deployment_row(s, name)
            return info

        info = await self.db.run(write)
        self.reconciler.kick()
        return ok(info)

    # -- nodes and instances ------------------------------------------------------------------

    async def list_nodes(self, _request: Request) -> Response:
        return ok(await self.db.run(store.list_nodes))

    async def get_node(self, request: Request) -> Response:
        node_id = request.path_params["id"]
        return ok(await self.db.run(lambda s: store.node_info(store.get_node(s, node_id))))

    async def register_node(self, request: Request) -> Response:
        spec = await self._body(request, wire.NodeRegister)
        now = self.clock()

        def write(s: Session) -> str:
            node = store.find_node_by_name(s, spec.name)
            if node is None:
                node = t.Node(
                    id=f"node-{uuid.uuid4().hex[:12]}",
                    name=spec.name,
                    url=spec.url,
                    state=NodeState.READY.value,
                    resources=spec.resources.model_dump(),
                    last_heartbeat_at=now,
                    created_at=now,
                    updated_at=now,
                )
                created = store.StateChange("node", node.id, None, "ready", "registered", now)
                store.insert_created(s, [node], [created])
                return node.id
            node.url = spec.url
            node.resources = spec.resources.model_dump()
            node.last_heartbeat_at = now
            if node.state != NodeState.READY.value:
                store.change_state(s, "node", node.id, NodeState.READY, "registered again", now)
            return node.id

        node_id = await self.db.run(write)
        self.reconciler.kick()
        reply = wire.NodeRegistered(
            node_id=node_id, heartbeat_interval_s=self.settings.heartbeat_interval_s
        )
        return ok(reply)

    async def node_heartbeat(self, request: Request) -> Response:
        beat = await self._body(request, wire.NodeHeartbeat)
        await self.reconciler.heartbeat(request.path_params["id"], beat)
        if self.on_training_heartbeat is not None:
            await self.on_training_heartbeat(request.path_params["id"], beat.training)
        return JSONResponse({"ok": True})

    async def training_report(self, request: Request) -> Response:
        report = await self._body(request, wire.TrainingReport)
        if report.task_id != request.path_params["id"]:
            raise InvalidRequest("task_id does not match the path", param="task_id")
        if self.on_training_report is None:
            raise InvalidRequest("this control plane runs no training tasks")
        await self.on_training_report(report)
        return JSONResponse({"ok": True})

    async def instance_report(self, request: Request) -> Response:
        report = await self._body(request, wire.InstanceReport)
        if report.instance_id != request.path_params["id"]:
            raise InvalidRequest("instance_id does not match the path", param="instance_id")
        node = await self.db.run(lambda s: _node_of_instance(s, report.instance_id))
        await self.reconciler.apply_report(node, report)
        return JSONResponse({"ok": True})

    async def list_instances(self, request: Request) -> Response:
        deployment = request.query_params.get("deployment")
        return ok(await self.db.run(lambda s: store.list_instances(s, deployment=deployment)))

    async def get_instance(self, request: Request) -> Response:
        iid = request.path_params["id"]
        return ok(await self.db.run(lambda s: store.instance_info(store.get_instance(s, iid))))

    # -- records ------------------------------------------------------------------------------

    async def _records(self, read: Callable[[Session], Any]) -> Response:
        await self.recorder.flush()  # read-your-writes: records queued a moment ago show up
        return ok(await self.db.run(read))

    async def list_requests(self, request: Request) -> Response:
        limit, state = _limit(request), request.query_params.get("state")
        return await self._records(lambda s: store.list_requests(s, limit=limit, state=state))

    async def get_request(self, request: Request) -> Response:
        rid = request.path_params["id"]
        return await self._records(lambda s: store.get_request(s, rid))

    async def list_jobs(self, request: Request) -> Response:
        limit, state = _limit(request), request.query_params.get("state")
        rid = request.query_params.get("request_id")
        return await self._records(
            lambda s: store.list_jobs(s, limit=limit, state=state, request_id=rid)
        )

    async def get_job(self, request: Request) -> Response:
        jid = request.path_params["id"]
        return await self._records(lambda s: store.get_job(s, jid))

    async def list_tasks(self, request: Request) -> Response:
        limit, state = _limit(request), request.query_params.get("state")
        jid = request.query_params.get("job_id")
        return await self._records(
            lambda s: store.list_tasks(s, limit=limit, state=state, job_id=jid)
        )

    async def get_task(self, request: Request) -> Response:
        tid = request.path_params["id"]
        return await self._records(lambda s: store.get_task(s, tid))


def _node_of_instance(session: Session, instance_id: str) -> t.Node | None:
    row = session.get(t.Instance, instance_id)
    if row is None or row.node_id is None:
        return None
    return session.get(t.Node, row.node_id)
