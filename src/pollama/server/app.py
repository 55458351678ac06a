"""The FastAPI application factory: settings in, app out; no module-level state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from pollama import __version__
from pollama.config import Settings
from pollama.server import routes_models
from pollama.server.errors import install_error_handlers
from pollama.store import Store

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    store = Store(settings.models, noprune=settings.noprune)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(store.ensure)
        freed = await run_in_threadpool(store.prune_on_start)
        if freed:
            log.info("pruned %d bytes of unused blobs", freed)
        yield

    app = FastAPI(
        title="pollama", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.settings = settings
    app.state.store = store
    install_error_handlers(app)
    app.include_router(routes_models.router)
    return app
