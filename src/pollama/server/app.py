"""The FastAPI application factory: settings in, app out; no module-level state."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from pollama import __version__
from pollama.config import Settings
from pollama.inference.embeddings import EmbeddingService
from pollama.inference.rerank import RerankService
from pollama.inference.service import InferenceService
from pollama.runner.base import LoadSpec, Runner
from pollama.runner.devices import PROBE_TIMEOUT, DeviceInventory, probe_devices
from pollama.runner.process import subprocess_factory
from pollama.scheduler import Scheduler
from pollama.server import (
    routes_anthropic,
    routes_inference,
    routes_models,
    routes_openai,
    routes_registry,
    routes_rerank,
    routes_responses,
    routes_status,
    routes_ui,
)
from pollama.server.errors import install_error_handlers
from pollama.server.metrics import PrometheusMetrics
from pollama.server.middleware import install_middleware
from pollama.server.reload import ConfigReloader
from pollama.server.rpc_watch import watch_rpc_servers
from pollama.store import Store
from pollama.store.responses import ResponseStore

log = logging.getLogger(__name__)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def take_inventory(
    timeout: float = PROBE_TIMEOUT, rpc_servers: Sequence[str] = ()
) -> DeviceInventory:
    """The devices llama.cpp sees, asked once of a subprocess (``runner/devices.py``) when
    ``pollama serve`` starts, and logged: each device with its total and free memory (as
    Ollama logs its "inference compute"), a warning when the query failed (the server runs
    on regardless) and a warning when a build with a GPU backend found no GPU (a driver or
    runtime went missing: Ollama's silent CPU fallback, said aloud). ``rpc_servers``
    (``OLLAMA_RPC_SERVERS``) adds each RPC server's devices."""
    inventory = probe_devices(timeout, rpc_servers=rpc_servers)
    if inventory.error:
        log.warning("could not list compute devices: %s", inventory.error)
        return inventory
    for d in inventory.devices:
        log.info(
            'inference compute name=%s description="%s" kind=%s total="%s" available="%s"',
            d.name, d.description, d.kind, _gib(d.total_bytes), _gib(d.free_bytes),
        )  # fmt: skip
    backends = ",".join(inventory.build.backends) or "none"
    if inventory.accelerators():
        log.info("llama.cpp backends: %s; models go to the GPU as far as they fit", backends)
    elif inventory.build.accelerator:
        log.warning("no GPU: %s; models run on the CPU", inventory.no_accelerator_reason())
    else:
        log.info("llama.cpp backends: %s (CPU only); models run on the CPU", backends)
    return inventory


def _lifespan(
    reload_environ: Mapping[str, str] | None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's start and end: the store made ready and pruned, the configuration
    reloader (when the app has an environment to reload from), the watch for RPC servers
    that come back (``server/rpc_watch.py``), the spare worker; at the end, the spare and
    the runners stopped and the thread pools and databases closed."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        await run_in_threadpool(state.store.ensure)
        freed = await run_in_threadpool(state.store.prune_on_start)
        if freed:
            log.info("pruned %d bytes of unused blobs", freed)
        reloader = None if reload_environ is None else ConfigReloader(app, reload_environ)
        if reloader is not None:
            reloader.start()
        rpc_watch = asyncio.create_task(watch_rpc_servers(app), name="pollama-rpc-watch")
        workers = state.worker_factory
        if workers is not None:
            workers.start()  # the spare worker (runner/spare.py)
        try:
            yield
        finally:
            rpc_watch.cancel()
            if reloader is not None:
                reloader.stop()
            if workers is not None:  # first: closing runners would start another spare
                await workers.aclose()
            await state.scheduler.shutdown()
            state.inference.close()
            state.responses.close()

    return lifespan


def create_app(
    settings: Settings,
    *,
    runner_factory: Callable[[LoadSpec], Runner] | None = None,
    inventory: DeviceInventory | None = None,
    reload_environ: Mapping[str, str] | None = None,
) -> FastAPI:
    """The app. ``inventory`` is the compute devices llama.cpp sees, which ``pollama serve``
    asks a subprocess for before it builds the app (``runner/devices.py``: the server never
    loads llama.cpp itself); None (tests) is an empty one whose ``error`` says it was not
    asked. It is ``app.state.inventory``, and its devices ``app.state.devices`` (a list of
    ``DeviceInfo``, what the load planner reads). ``reload_environ``, the environment
    ``settings`` came from, makes the app reload its configuration on ``SIGHUP`` and when
    ``pollama.toml`` changes (``server/reload.py``; ``pollama serve`` passes it), warn about
    presets for models it does not have, and load the pinned ones."""
    inventory = inventory or DeviceInventory(error="no device inventory was taken")
    store = Store(settings.models, noprune=settings.noprune)
    metrics = PrometheusMetrics()
    worker_factory = subprocess_factory(settings) if runner_factory is None else None
    scheduler = Scheduler(
        settings,
        runner_factory or worker_factory,
        telemetry=metrics,
        inventory=inventory,
    )
    inference = InferenceService(settings, store, scheduler, telemetry=metrics)
    responses = ResponseStore.from_settings(settings)

    app = FastAPI(
        title="pollama",
        version=__version__,
        lifespan=_lifespan(reload_environ),
        docs_url=None,
        openapi_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.inventory = inventory
    app.state.devices = list(inventory.devices)
    app.state.store = store
    app.state.scheduler = scheduler
    app.state.worker_factory = worker_factory
    app.state.inference = inference
    app.state.responses = responses
    app.state.embeddings = EmbeddingService(inference)
    app.state.rerank = RerankService(inference)
    install_error_handlers(app)
    for routes in (routes_models, routes_registry, routes_inference, routes_openai,
                   routes_anthropic, routes_responses, routes_rerank, routes_status):
        app.include_router(routes.router)
    app.include_router(routes_ui.router)  # GET /ui: the chat page (its files need no key)
    install_middleware(app, settings, metrics=metrics)  # keys, Host/Origin, limits, logs, /metrics
    metrics.watch_devices(lambda: app.state.devices, scheduler)
    return app
