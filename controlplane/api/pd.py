"""PD profiling API (docs/pd.md, "Profiling"):

    POST /api/v1/deployments/{name}/pd-profile   PDProfileCreate -> PDProfileInfo (runs it)
    GET  /api/v1/deployments/{name}/pd-profile   PDProfileInfo (the stored heatmap, if any)

Profiling sends requests through the chat executor forced colocated and forced disaggregated,
so the deployment must run both kinds of group: mode `auto`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controlplane import wire
from controlplane.api.errors import parse_body
from controlplane.db import pd_store, store
from controlplane.db.session import Database
from controlplane.errors import InvalidRequest
from controlplane.jobs.chat import ChatExecutor
from controlplane.jobs.pd_profile import ProfileSettings, profile_pd
from controlplane.routing.decode_predictor import FinishedRequest, evaluate
from controlplane.routing.pd_heatmap import DEFAULT_PROMPT_EDGES, DEFAULT_RATIO_EDGES

PREFIX = "/api/v1"
BUCKET_TOKENS = 128
MAX_BODY_BYTES = 64 * 1024
MIN_HISTORY = 10  # finished requests before the predictor's accuracy is reported


def predictor_accuracy(history: list[tuple[int | None, int, int]]) -> wire.PredictorAccuracyInfo:
    if len(history) < MIN_HISTORY:
        return wire.PredictorAccuracyInfo(bucket_tokens=BUCKET_TOKENS, n_train=len(history))
    finished = [FinishedRequest(prompt_tokens=p, completion_tokens=c) for _, p, c in history]
    accuracy = evaluate(finished, bucket_tokens=BUCKET_TOKENS)
    return wire.PredictorAccuracyInfo(
        bucket_tokens=BUCKET_TOKENS,
        bucket_accuracy=accuracy.bucket_accuracy,
        mean_abs_error_tokens=accuracy.mean_abs_error_tokens,
        n_train=accuracy.n_train,
        n_test=accuracy.n_test,
    )


def _edges(
    raw: list[float | None] | None, default: tuple[float, ...], param: str
) -> tuple[float, ...]:
    if raw is None:
        return default
    edges = tuple(math.inf if e is None else float(e) for e in raw)
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)) or edges[0] < 0:
        raise InvalidRequest(f"{param} must be non-negative and strictly increasing", param=param)
    return edges


class PDRoutes:
    def __init__(self, *, db: Database, executor: ChatExecutor, clock: Callable[[], float]) -> None:
        self.db = db
        self.executor = executor
        self.clock = clock

    def routes(self) -> list[Route]:
        path = f"{PREFIX}/deployments/{{name}}/pd-profile"
        return [
            Route(path, self.get_profile, methods=["GET"]),
            Route(path, self.create_profile, methods=["POST"]),
        ]

    async def get_profile(self, request: Request) -> Response:
        name = request.path_params["name"]
        await self.executor.recorder.flush()  # the predictor is tested on every finished request
        return JSONResponse((await self.db.run(lambda s: self._info(s, name))).model_dump())

    async def create_profile(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await parse_body(request, wire.PDProfileCreate, MAX_BODY_BYTES)
        settings = ProfileSettings(
            prompt_edges=_edges(body.prompt_edges, DEFAULT_PROMPT_EDGES, "prompt_edges"),
            ratio_edges=_edges(body.ratio_edges, DEFAULT_RATIO_EDGES, "ratio_edges"),
            repeats=body.repeats,
            concurrency=body.concurrency,
            max_total_tokens=body.max_total_tokens,
            seed=body.seed,
        )
        row = await self.db.run(lambda s: store.get_deployment(s, name))
        if row.mode != "auto":
            raise InvalidRequest(
                f"deployment {name!r} runs mode {row.mode}; a PD profile compares colocated "
                "with disaggregated, so it needs mode auto (deepflow deployments update "
                f"{name} --mode auto)",
                code="wrong_mode",
            )
        started = time.perf_counter()
        heatmap, measurements = await profile_pd(self.executor, name, settings)
        duration = time.perf_counter() - started
        now = self.clock()

        def write(s: Session) -> wire.PDProfileInfo:
            pd_store.save_profile(
                s,
                name,
                heatmap.to_json(),
                num_measurements=len(measurements),
                duration_s=duration,
                at=now,
            )
            return self._info(s, name)

        info = await self.db.run(write)
        await self.executor.policies.refresh(name)
        return JSONResponse(info.model_dump(), status_code=201)

    @staticmethod
    def _info(s: Session, name: str) -> wire.PDProfileInfo:
        store.get_deployment(s, name)  # 404 for an unknown deployment
        profile = pd_store.latest_profile(s, name)
        accuracy = predictor_accuracy(pd_store.request_history(s, name))
        if profile is None:
            return wire.PDProfileInfo(deployment=name, predictor=accuracy)
        return wire.PDProfileInfo(
            deployment=name,
            heatmap=profile.heatmap,
            num_measurements=profile.num_measurements,
            created_at=profile.created_at,
            duration_s=profile.duration_s,
            predictor=accuracy,
        )
