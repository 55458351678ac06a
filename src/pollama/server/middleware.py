"""Puts pollama's middleware and operational routes on an app, in the one right order.

Outermost first: :class:`~pollama.server.access_log.RequestContextMiddleware` (request id,
access log, HTTP metrics: it must see every request, refused ones included), then
:class:`~pollama.server.security.SecurityMiddleware` (Host, Origin, API key), then
:class:`~pollama.server.limits.LimitsMiddleware` (body size, upload slots, slow bodies,
``Retry-After``), then the routes. Security runs before the limits so that an
unauthenticated caller cannot even hold an upload slot.
"""

from __future__ import annotations

from fastapi import FastAPI

from pollama.config import Settings
from pollama.keys import KeyStore
from pollama.server import metrics as metrics_routes
from pollama.server.access_log import AccessLog, RequestContextMiddleware
from pollama.server.limits import BodyLimits, LimitsMiddleware
from pollama.server.metrics import PrometheusMetrics
from pollama.server.security import AccessPolicy, SecurityMiddleware

__all__ = ["install_middleware"]


def install_middleware(
    app: FastAPI,
    settings: Settings,
    *,
    metrics: PrometheusMetrics | None = None,
    keys: KeyStore | None = None,
) -> PrometheusMetrics:
    """Add the middleware and ``/metrics``, ``/healthz``, ``/readyz``; return the metrics
    (also ``app.state.metrics``). Make the :class:`PrometheusMetrics` first and pass it in when the
    inference service and the scheduler should report to it (they take it as their
    ``telemetry``); ``app.state.scheduler``, if set, is read at each scrape for the number
    of loaded models and of waiting requests."""
    metrics = metrics or PrometheusMetrics()
    app.state.metrics = metrics
    scheduler = getattr(app.state, "scheduler", None)
    if scheduler is not None:
        metrics.watch_scheduler(scheduler)
    # Both objects are read at each request and updated in place by a reload
    # (server/reload.py): app.state holds them for it.
    policy = app.state.access_policy = AccessPolicy.from_settings(settings, keys)
    limits = app.state.body_limits = BodyLimits.from_settings(settings)
    app.include_router(metrics_routes.router)
    # add_middleware puts each new one outside the previous ones: innermost first.
    app.add_middleware(LimitsMiddleware, limits=limits)
    app.add_middleware(SecurityMiddleware, policy=policy)
    app.add_middleware(
        RequestContextMiddleware,
        access_log=AccessLog(settings.access_log),
        observer=metrics,
        log_prompts=settings.log_prompts,
    )
    return metrics
