"""The control plane application: routes, and a lifespan that owns the store, the recorder,
the reconciler and the HTTP client to nodes and instances."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import httpx
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controlplane.api.errors import EXCEPTION_HANDLERS
from controlplane.api.files import FilesRoutes
from controlplane.api.fine_tuning import FineTuningRoutes
from controlplane.api.manage import ManageRoutes
from controlplane.api.openai import OpenAIRoutes
from controlplane.api.pd import PDRoutes
from controlplane.db import pd_store, store
from controlplane.db.recorder import Recorder
from controlplane.db.session import Database
from controlplane.jobs.chat import ChatExecutor
from controlplane.jobs.fine_tune import FineTuneExecutor
from controlplane.jobs.pd import PolicyBook, PolicyInputs
from controlplane.reconcile.reconciler import Reconciler
from controlplane.registry import Registry
from controlplane.routing.dist_sched import RouterThresholds
from controlplane.settings import Settings

log = logging.getLogger(__name__)


async def health(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    db = Database(settings.database_url)
    registry = Registry()
    recorder = Recorder(
        db.sessions,
        clock=clock,
        flush_interval_s=settings.record_flush_interval_s,
        batch_size=settings.record_batch_size,
    )
    timeout = httpx.Timeout(10.0, read=settings.task_idle_timeout_s)
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    http = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport)
    reconciler = Reconciler(
        db=db,
        registry=registry,
        http=http,
        clock=clock,
        interval_s=settings.reconcile_interval_s,
        node_timeout_s=settings.node_timeout_s,
    )

    async def policy_inputs(deployment: str) -> PolicyInputs:
        def read(s: Session) -> PolicyInputs:
            profile = pd_store.latest_profile(s, deployment)
            history = pd_store.request_history(s, deployment)
            return PolicyInputs(profile.heatmap if profile else None, history)

        return await db.run(read)

    thresholds = RouterThresholds(
        cache_threshold=settings.router_cache_threshold,
        balance_abs_threshold=settings.router_balance_abs_threshold,
        balance_rel_threshold=settings.router_balance_rel_threshold,
        group_balance_abs_threshold=settings.router_group_balance_abs_threshold,
        group_balance_rel_threshold=settings.router_group_balance_rel_threshold,
    )
    executor = ChatExecutor(
        registry=registry,
        recorder=recorder,
        http=http,
        clock=clock,
        dispatch_timeout_s=settings.dispatch_timeout_s,
        max_inflight_requests=settings.max_inflight_requests,
        policies=PolicyBook(
            policy_inputs,
            thresholds=thresholds,
            refresh_s=settings.pd_policy_refresh_s,
            clock=clock,
        ),
        prefill_timeout_s=settings.prefill_timeout_s,
    )
    fine_tunes = FineTuneExecutor(settings=settings, db=db, http=http, clock=clock)
    manage = ManageRoutes(
        settings=settings,
        db=db,
        recorder=recorder,
        reconciler=reconciler,
        clock=clock,
        on_training_report=fine_tunes.apply_report,
        on_training_heartbeat=fine_tunes.heartbeat,
    )
    openai = OpenAIRoutes(executor, settings.max_body_bytes, db)
    pd = PDRoutes(db=db, executor=executor, clock=clock)
    files = FilesRoutes(settings=settings, db=db, clock=clock)
    fine_tuning = FineTuningRoutes(
        executor=fine_tunes, db=db, max_body_bytes=settings.max_body_bytes
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        db.migrate()
        failed_fine_tunes = fine_tunes.recover()  # before fail_orphans: it ends their records
        if failed_fine_tunes:
            log.warning("failed %d fine-tuning jobs left in flight", failed_fine_tunes)
        failed = db.call(lambda s: store.fail_orphans(s, clock(), "control plane restarted"))
        if failed:
            log.warning("marked %d records left in flight by a previous run as failed", failed)
        recorder.start()
        reconciler.start()
        fine_tunes.start()
        try:
            yield
        finally:
            await fine_tunes.close()
            await reconciler.close()
            await recorder.close()
            await http.aclose()
            db.dispose()

    routes = [
        Route("/health", health, methods=["GET"]),
        *openai.routes(),
        *files.routes(),
        *fine_tuning.routes(),
        *manage.routes(),
        *pd.routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state.db = db
    app.state.registry = registry
    app.state.recorder = recorder
    app.state.reconciler = reconciler
    app.state.executor = executor
    app.state.fine_tunes = fine_tunes
    return app
