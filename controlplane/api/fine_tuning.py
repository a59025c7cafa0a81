"""OpenAI's fine-tuning API: /v1/fine_tuning/jobs, run by `jobs/fine_tune.py`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controlplane import wire
from controlplane.api.errors import parse_body
from controlplane.api.paging import after_of, limit_of
from controlplane.db import fine_tune_store as fts
from controlplane.db.session import Database
from controlplane.jobs.fine_tune import FineTuneExecutor

PREFIX = "/v1/fine_tuning/jobs"
MAX_LIST = 1000


class FineTuningRoutes:
    def __init__(self, *, executor: FineTuneExecutor, db: Database, max_body_bytes: int) -> None:
        self.executor = executor
        self.db = db
        self.max_body_bytes = max_body_bytes

    def routes(self) -> list[Route]:
        p = PREFIX
        return [
            Route(p, self.create, methods=["POST"]),
            Route(p, self.list, methods=["GET"]),
            Route(f"{p}/{{id}}", self.retrieve, methods=["GET"]),
            Route(f"{p}/{{id}}/cancel", self.cancel, methods=["POST"]),
            Route(f"{p}/{{id}}/events", self.events, methods=["GET"]),
            Route(f"{p}/{{id}}/checkpoints", self.checkpoints, methods=["GET"]),
        ]

    async def create(self, request: Request) -> Response:
        spec = await parse_body(request, wire.FineTuningJobCreate, self.max_body_bytes)
        return _json(await self.executor.create(spec))

    async def list(self, request: Request) -> Response:
        limit = limit_of(request, default=20, maximum=MAX_LIST)
        after = after_of(request)
        return _json(await self.db.run(lambda s: fts.list_fine_tunes(s, after=after, limit=limit)))

    async def retrieve(self, request: Request) -> Response:
        job_id = request.path_params["id"]
        return _json(await self.db.run(lambda s: fts.job_object(fts.get_fine_tune(s, job_id))))

    async def cancel(self, request: Request) -> Response:
        return _json(await self.executor.cancel(request.path_params["id"]))

    async def events(self, request: Request) -> Response:
        job_id = request.path_params["id"]
        limit = limit_of(request, default=20, maximum=MAX_LIST)
        after = after_of(request)
        return _json(
            await self.db.run(lambda s: fts.list_events(s, job_id, after=after, limit=limit))
        )

    async def checkpoints(self, request: Request) -> Response:
        job_id = request.path_params["id"]
        limit = limit_of(request, default=10, maximum=MAX_LIST)
        after = after_of(request)
        return _json(
            await self.db.run(lambda s: fts.list_checkpoints(s, job_id, after=after, limit=limit))
        )


def _json(payload: wire.Open) -> JSONResponse:
    return JSONResponse(payload.model_dump(mode="json"))
