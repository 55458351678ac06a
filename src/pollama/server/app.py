"""The FastAPI application factory: settings in, app out; no module-level state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from pollama import __version__
from pollama.config import Settings
from pollama.inference.embeddings import EmbeddingService
from pollama.inference.service import InferenceService
from pollama.runner.base import LoadSpec, Runner
from pollama.runner.process import subprocess_factory
from pollama.scheduler import Scheduler
from pollama.server import (
    routes_anthropic,
    routes_inference,
    routes_models,
    routes_openai,
    routes_registry,
)
from pollama.server.errors import install_error_handlers
from pollama.server.metrics import PrometheusMetrics
from pollama.server.middleware import install_middleware
from pollama.store import Store

log = logging.getLogger(__name__)


def create_app(
    settings: Settings, *, runner_factory: Callable[[LoadSpec], Runner] | None = None
) -> FastAPI:
    store = Store(settings.models, noprune=settings.noprune)
    metrics = PrometheusMetrics()
    scheduler = Scheduler(
        settings, runner_factory or subprocess_factory(settings), telemetry=metrics
    )
    inference = InferenceService(settings, store, scheduler, telemetry=metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(store.ensure)
        freed = await run_in_threadpool(store.prune_on_start)
        if freed:
            log.info("pruned %d bytes of unused blobs", freed)
        try:
            yield
        finally:
            await scheduler.shutdown()
            inference.close()

    app = FastAPI(
        title="pollama",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        openapi_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.scheduler = scheduler
    app.state.inference = inference
    app.state.embeddings = EmbeddingService(inference)
    install_error_handlers(app)
    app.include_router(routes_models.router)
    app.include_router(routes_registry.router)
    app.include_router(routes_inference.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_anthropic.router)
    install_middleware(app, settings, metrics=metrics)  # keys, Host/Origin, limits, logs, /metrics
    return app
