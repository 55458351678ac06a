"""Prometheus metrics (``GET /metrics``) and health (``GET /healthz``, ``GET /readyz``).

:class:`PrometheusMetrics` is both the HTTP observer of the request middleware and the
:class:`pollama.telemetry.Telemetry` the inference service and the scheduler report to.
Each app has its own ``CollectorRegistry`` (no module globals: tests build many apps).

Labels stay low-cardinality, because every label value is a time series kept forever:
``route`` is the route's path *template* (``/api/blobs/{digest}``, never a digest) or
``unmatched``; ``status`` is the code; ``model`` is a local model that actually ran, and
after :data:`MAX_MODEL_LABELS` distinct names further ones are counted as ``other``;
``reason`` comes from small fixed sets; ``device`` and ``kind`` name the few compute
devices llama.cpp sees. Keys, clients and request ids are never labels.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from typing import Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from pollama import __version__
from pollama.runner.base import DeviceInfo
from pollama.server.access_log import current_record
from pollama.telemetry import Generation

__all__ = ["MAX_MODEL_LABELS", "PrometheusMetrics", "WatchedScheduler", "router"]

MAX_MODEL_LABELS = 64
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class WatchedScheduler(Protocol):
    """What :meth:`PrometheusMetrics.watch_scheduler` reads of a scheduler at each scrape."""

    def loaded(self) -> Sized: ...

    @property
    def pending(self) -> int: ...


class _LoadedRow(Protocol):
    """What the device gauges read of one loaded model (``scheduler.LoadedModel``)."""

    @property
    def name(self) -> str: ...

    @property
    def device_bytes(self) -> Mapping[str, int]: ...


class LoadedModels(Protocol):
    def loaded(self) -> Sequence[_LoadedRow]: ...


class _DeviceCollector:
    """Device memory, read at each scrape: each device's total and free bytes as the latest
    inventory reported them (``app.state.devices``), and each loaded model's bytes per
    device as its worker reported them after loading (``RunnerInfo.device_bytes``)."""

    def __init__(
        self,
        devices: Callable[[], Sequence[DeviceInfo]],
        scheduler: LoadedModels,
        label: Callable[[str], str],
    ) -> None:
        self._devices = devices
        self._scheduler = scheduler
        self._label = label

    def collect(self) -> Iterator[GaugeMetricFamily]:
        total = GaugeMetricFamily(
            "pollama_device_memory_total_bytes", "Memory of each compute device llama.cpp "
            "sees (the CPU's is the system's)", labels=["device", "kind"],
        )  # fmt: skip
        free = GaugeMetricFamily(
            "pollama_device_memory_free_bytes", "Free memory of each compute device, as of "
            "the latest device inventory", labels=["device", "kind"],
        )  # fmt: skip
        for device in self._devices():
            total.add_metric([device.name, device.kind], float(device.total_bytes))
            free.add_metric([device.name, device.kind], float(device.free_bytes))
        placed = GaugeMetricFamily(
            "pollama_model_device_bytes", "Bytes of each loaded model on each device "
            "(weights, KV cache, compute buffers), as llama.cpp reported them",
            labels=["model", "device"],
        )  # fmt: skip
        for row in self._scheduler.loaded():
            for device, size in sorted(row.device_bytes.items()):
                placed.add_metric([self._label(row.name), device], float(size))
        yield total
        yield free
        yield placed


class _Generation:
    """Times one generation; writes the request's access-log fields as it goes."""

    __slots__ = ("_metrics", "_model", "_start", "_last", "_ended", "_record")

    def __init__(self, metrics: PrometheusMetrics, model: str, prompt: str | None) -> None:
        self._metrics = metrics
        self._model = model
        self._record = current_record()
        # Time to first token counts from the request's arrival: queueing and loading
        # are part of what the caller waits for.
        self._start = self._record.started if self._record is not None else time.monotonic()
        self._last: float | None = None
        self._ended = False
        if self._record is not None:
            self._record.model = model
            if prompt is not None and self._record.log_prompts:
                self._record.prompt = prompt

    def output(self, text: str) -> None:
        now = time.monotonic()
        m = self._metrics
        if self._last is None:
            ttft = now - self._start
            m.ttft.labels(self._model).observe(ttft)
            if self._record is not None:
                self._record.ttft = ttft
        else:
            m.itl.labels(self._model).observe(now - self._last)
        self._last = now
        if self._record is not None and self._record.log_prompts:
            self._record.output.append(text)

    def finished(
        self, *, prompt_tokens: int, cached_tokens: int, generated_tokens: int, reason: str
    ) -> None:
        if self._ended:
            return
        self._ended = True
        m = self._metrics
        m.prompt_tokens.labels(self._model).inc(max(prompt_tokens, 0))
        m.cached_tokens.labels(self._model).inc(max(cached_tokens, 0))
        m.generated_tokens.labels(self._model).inc(max(generated_tokens, 0))
        m.generations.labels(self._model, reason if reason in ("stop", "length") else "other").inc()
        with m._ratio_lock:
            m._prompt_total += max(prompt_tokens, 0)
            m._cached_total += max(cached_tokens, 0)
        if self._record is not None:
            self._record.prompt_tokens = prompt_tokens
            self._record.cached_tokens = cached_tokens
            self._record.generated_tokens = generated_tokens
            self._record.done_reason = reason

    def failed(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        cancelled = error is None or isinstance(error, asyncio.CancelledError)
        self._metrics.generations.labels(self._model, "cancelled" if cancelled else "error").inc()
        if self._record is not None and not cancelled and self._record.error is None:
            self._record.error = type(error).__name__


class PrometheusMetrics:
    """Every pollama metric, on a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        process_collector.ProcessCollector(registry=r)
        platform_collector.PlatformCollector(registry=r)
        gc_collector.GCCollector(registry=r)
        self._models: set[str] = set()
        self._models_lock = threading.Lock()
        self._ratio_lock = threading.Lock()
        self._prompt_total = 0
        self._cached_total = 0
        self.started = False
        self.stopping = False

        info = Gauge("pollama_build_info", "pollama's version (always 1)", ["version"],
                     registry=r)  # fmt: skip
        info.labels(__version__).set(1)
        self._add_http_metrics(r)
        self._add_generation_metrics(r)
        self._add_model_metrics(r)

    def _add_http_metrics(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "pollama_http_requests", "HTTP requests answered, by route template, method and "
            "status", ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "pollama_http_request_duration_seconds", "Time from a request's arrival to the "
            "end of its response (whole stream included), by route template", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "pollama_http_requests_in_flight", "Requests being answered now", registry=r
        )
        self.refused = Counter(
            "pollama_http_refused", "Requests refused before a route ran: host, origin, key, "
            "scope, body_size, body_timeout, uploads", ["reason"], registry=r,
        )  # fmt: skip

    def _add_generation_metrics(self, r: CollectorRegistry) -> None:
        self.ttft = Histogram(
            "pollama_time_to_first_token_seconds", "Time from a generation request's arrival "
            "(queueing and model loading included) to its first output", ["model"],
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "pollama_inter_token_latency_seconds", "Time between consecutive pieces of "
            "streamed output", ["model"], buckets=_ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "pollama_prompt_tokens", "Prompt tokens of finished generations (cached ones "
            "included)", ["model"], registry=r,
        )  # fmt: skip
        self.cached_tokens = Counter(
            "pollama_prompt_cached_tokens", "Prompt tokens found in the KV cache (not "
            "evaluated again)", ["model"], registry=r,
        )  # fmt: skip
        self.generated_tokens = Counter(
            "pollama_generated_tokens", "Tokens generated", ["model"], registry=r
        )
        self.generations = Counter(
            "pollama_generations", "Generations by how they ended: stop, length, other, "
            "error, cancelled", ["model", "outcome"], registry=r,
        )  # fmt: skip
        ratio = Gauge(
            "pollama_prompt_cache_hit_ratio", "Share of prompt tokens served from the KV "
            "cache since start (rate() of the two token counters gives it per window)",
            registry=r,
        )  # fmt: skip
        ratio.set_function(self._cache_ratio)

    def _add_model_metrics(self, r: CollectorRegistry) -> None:
        self.queue = Gauge(
            "pollama_queue_depth", "Requests waiting for a model slot", registry=r
        )
        self.loaded = Gauge("pollama_loaded_models", "Models loaded now", registry=r)
        self.load_seconds = Histogram(
            "pollama_model_load_seconds", "Time to start a model's worker and load it",
            ["model"], buckets=_LOAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.unloads = Counter(
            "pollama_model_unloads", "Models unloaded, by reason: expired, evicted, "
            "requested, crashed, reload, shutdown", ["reason"], registry=r,
        )  # fmt: skip
        self.evictions = Counter(
            "pollama_model_evictions", "Models unloaded early to make room for another",
            registry=r,
        )
        self.pulled = Counter(
            "pollama_pull_bytes", "Bytes downloaded from registries", registry=r
        )

    # -- wiring --------------------------------------------------------------------------

    def watch_scheduler(self, scheduler: WatchedScheduler) -> None:
        """Read the loaded models (``scheduler.loaded()``) and the waiting requests
        (``scheduler.pending``, a property) at each scrape: always right, with no hook to
        forget. The scheduler is typed, so that a method taken for a property (the gauge
        read ``callable(pending)`` once, and stayed 0 for good) cannot come back."""
        self.loaded.set_function(lambda: float(len(scheduler.loaded())))
        self.queue.set_function(lambda: float(scheduler.pending))

    def watch_devices(
        self, devices: Callable[[], Sequence[DeviceInfo]], scheduler: LoadedModels
    ) -> None:
        """Device memory gauges (``_DeviceCollector``), read at each scrape."""
        self.registry.register(_DeviceCollector(devices, scheduler, self._model_label))

    def _cache_ratio(self) -> float:
        with self._ratio_lock:
            return self._cached_total / self._prompt_total if self._prompt_total else 0.0

    def _model_label(self, model: str) -> str:
        with self._models_lock:
            if model in self._models:
                return model
            if len(self._models) < MAX_MODEL_LABELS:
                self._models.add(model)
                return model
        return "other"

    # -- HttpObserver (access_log.RequestContextMiddleware) --------------------------------

    def request_started(self) -> None:
        self.in_flight.inc()

    def lifespan_event(self, event: str) -> None:
        if event == "started":
            self.started = True
        elif event == "stopping":
            self.stopping = True

    def request_finished(
        self, method: str, route: str | None, status: int, seconds: float, refused: str | None
    ) -> None:
        self.in_flight.dec()
        label = route or "unmatched"
        method = method if method in _METHODS else "other"
        self.requests.labels(label, method, str(status)).inc()
        self.duration.labels(label).observe(seconds)
        if refused:
            self.refused.labels(refused).inc()

    # -- Telemetry (inference service, scheduler, registry client) -------------------------

    def generation(self, model: str, *, prompt: str | None = None) -> Generation:
        return _Generation(self, self._model_label(model), prompt)

    def model_loaded(self, model: str, seconds: float) -> None:
        self.load_seconds.labels(self._model_label(model)).observe(max(seconds, 0.0))

    def model_unloaded(self, model: str, reason: str) -> None:
        known = ("expired", "evicted", "requested", "crashed", "reload", "shutdown")
        self.unloads.labels(reason if reason in known else "other").inc()
        if reason == "evicted":
            self.evictions.inc()

    def pull_bytes(self, n: int) -> None:
        if n > 0:
            self.pulled.inc(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


router = APIRouter()


def _metrics(request: Request) -> PrometheusMetrics:
    metrics: PrometheusMetrics = request.app.state.metrics
    return metrics


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format 0.0.4 by default (every Prometheus reads it); OpenMetrics or
    text 1.0.0 when the scraper's ``Accept`` asks for them."""
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(_metrics(request).registry), headers={"Content-Type": content_type})


@router.api_route("/healthz", methods=["GET", "HEAD"], include_in_schema=False)
async def healthz() -> Response:
    """Alive: the event loop answers. Says nothing else (it needs no key)."""
    return JSONResponse({"status": "ok"})


@router.api_route("/readyz", methods=["GET", "HEAD"], include_in_schema=False)
async def readyz(request: Request) -> Response:
    """Ready: started, not shutting down, and the models directory is usable."""
    metrics = _metrics(request)
    problem = None
    if not metrics.started:
        problem = "starting"
    elif metrics.stopping:
        problem = "shutting down"
    else:
        models = request.app.state.settings.models
        if not (os.path.isdir(models) and os.access(models, os.R_OK | os.W_OK | os.X_OK)):
            problem = "models directory is not usable"
    if problem is not None:
        return JSONResponse({"status": "not ready", "reason": problem}, status_code=503,
                            headers={"Retry-After": "1"})  # fmt: skip
    return JSONResponse({"status": "ready"})
