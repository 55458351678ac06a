"""Request ids, the access log (one JSON line per request) and the HTTP metrics.

:class:`RequestContextMiddleware` is the outermost of pollama's middleware, so every request
is counted and logged, including those the security and limit checks refuse. It keeps one
:class:`RequestRecord` per request in a context variable; the code that serves the request
fills it in (the security middleware the key's *name*, the inference telemetry the model,
token counts and time to first token), and the line is written when the response ends (for
a stream: after its last byte). What must stay true:

* the key itself never reaches the log, only the name given at ``pollama keys create``;
* prompts and outputs are logged only with ``POLLAMA_LOG_PROMPTS`` on;
* a client's ``X-Request-Id`` is used when it is a plausible id (at most 128 characters of
  ``[A-Za-z0-9._:/+=-]``), else a new one is made; either way it is echoed in the response,
  so a caller can quote it and an operator can find the line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "AccessLog",
    "HttpObserver",
    "RequestContextMiddleware",
    "RequestRecord",
    "app_routes",
    "current_record",
    "route_template",
]

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


@dataclass
class RequestRecord:
    """What one request did; becomes one access-log line."""

    request_id: str
    method: str
    path: str
    route: str | None
    client: str | None
    started: float = field(default_factory=time.monotonic)
    status: int = 0
    key_name: str | None = None
    refused: str | None = None  # host | origin | key | scope | body_size | body_timeout | uploads
    model: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    generated_tokens: int | None = None
    ttft: float | None = None  # seconds from the request's arrival to the first output
    done_reason: str | None = None
    error: str | None = None
    client_closed: bool = False
    log_prompts: bool = False
    prompt: str | None = None
    output: list[str] = field(default_factory=list)

    def line(self, duration: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": self.request_id,
            "client": self.client,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "status": self.status,
            "key": self.key_name,
            "duration_ms": round(duration * 1000, 3),
        }
        optional = {
            "refused": self.refused, "model": self.model,
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens, "done_reason": self.done_reason,
            "ttft_ms": None if self.ttft is None else round(self.ttft * 1000, 3),
            "error": self.error, "client_closed": self.client_closed or None,
        }  # fmt: skip
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.log_prompts:
            if self.prompt is not None:
                out["prompt"] = self.prompt
            if self.output:
                out["output"] = "".join(self.output)
        return out


_CURRENT: ContextVar[RequestRecord | None] = ContextVar("pollama_request", default=None)


def current_record() -> RequestRecord | None:
    """The record of the request being served in this context, if any."""
    return _CURRENT.get()


def app_routes(app: Any) -> list[Any]:
    """Every route of ``app``, flattened, in the order the router tries them.

    FastAPI >= 0.160 keeps included routers as lazy groups (``fastapi.routing.
    iter_route_contexts`` flattens them); older versions list the routes themselves.
    """
    routes = list(getattr(getattr(app, "router", None), "routes", ()))
    try:
        from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - older FastAPI: already flat
        return routes
    return list(iter_route_contexts(routes))


def route_template(scope: Scope) -> str | None:
    """The path template of the route that will handle this request, found the way the
    router will find it (so checks and the handler always agree), or None when no route
    matches (a 404). A method mismatch (405) still names the route."""
    partial: str | None = None
    for route in app_routes(scope.get("app")):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", "")) or None
        if match is Match.PARTIAL and partial is None:
            partial = str(getattr(route, "path", "")) or None
    return partial


class AccessLog:
    """Writes the JSON lines: ``"-"`` is stderr, ``""``/``off`` nothing, else a file path
    (opened for append, owner-only when created)."""

    def __init__(self, target: str) -> None:
        self._lock = threading.Lock()
        self._stream: IO[str] | None
        self._owned = False
        if target in ("", "off", "none"):
            self._stream = None
        elif target == "-":
            self._stream = sys.stderr
        else:
            path = Path(target).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            import os

            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._stream = open(fd, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            self._owned = True

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def write(self, entry: dict[str, Any]) -> None:
        if self._stream is None:
            return
        text = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):  # a closed stderr must not fail the request
                pass

    def close(self) -> None:
        if self._owned and self._stream is not None:
            self._stream.close()
            self._stream = None


class HttpObserver(Protocol):
    """What the middleware reports to the metrics (``server.metrics.PrometheusMetrics``)."""

    def request_started(self) -> None: ...

    def lifespan_event(self, event: str) -> None: ...

    def request_finished(
        self, method: str, route: str | None, status: int, seconds: float, refused: str | None
    ) -> None: ...


class RequestContextMiddleware:
    """Outermost middleware: request id, timing, access log line, HTTP metrics."""

    def __init__(
        self,
        app: ASGIApp,
        access_log: AccessLog,
        observer: HttpObserver | None = None,
        log_prompts: bool = False,
    ) -> None:
        self.app = app
        self.access_log = access_log
        self.observer = observer
        self.log_prompts = log_prompts

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Tell the observer when startup has completed and when shutdown begins (what
        ``/readyz`` reports), and close the log file at the end."""

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown" and self.observer is not None:
                self.observer.lifespan_event("stopping")
            return message

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and self.observer is not None:
                self.observer.lifespan_event("started")
            await send(message)

        try:
            await self.app(scope, lifespan_receive, lifespan_send)
        finally:
            self.access_log.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        client = scope.get("client")
        record = RequestRecord(
            request_id=request_id,
            method=scope["method"],
            path=scope["path"],
            route=route_template(scope),
            client=client[0] if client else None,
            log_prompts=self.log_prompts,
        )
        scope.setdefault("state", {})["request_id"] = request_id
        token = _CURRENT.set(record)
        id_header = (b"x-request-id", request_id.encode())

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and record.status and not _finished[0]:
                record.client_closed = True
            return message

        _finished = [False]
        if self.observer is not None:
            self.observer.request_started()
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException as exc:
            if not record.status:
                record.status = 500
            if record.error is None:
                record.error = type(exc).__name__
            raise
        finally:
            _finished[0] = True
            duration = time.monotonic() - record.started
            _CURRENT.reset(token)
            if self.observer is not None:
                self.observer.request_finished(
                    record.method, record.route, record.status, duration, record.refused
                )
            self.access_log.write(record.line(duration))
