"""The one place where errors become HTTP error bodies, in each protocol's shape.

* Ollama's ``/api/*``: ``{"error": "..."}``, as ``application/json; charset=utf-8`` (what
  Go's gin sends);
* OpenAI's ``/v1/*``: ``{"error": {"message", "type", "param", "code"}}``;
* Anthropic's ``/v1/messages``: ``{"type": "error", "error": {"type", "message"}}``, plus a
  ``request_id`` on a route's own answer;
* the registry protocol's ``/v2/``: ``{"errors": [{"code", "message", "detail"}]}``.

Each of the first three is used three ways: as a route's answer (``*_error_response``), as
the last frame of a stream that already sent its 200 (``*_stream_error``, which the stream's
framing encodes: ``server.streaming``), and as the middleware's refusal of a request that
never reached a route (:func:`error_body`, written by ``server.refusals``). The status comes
from the error's class through :data:`STATUS_BY_ERROR`, never from its message.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pollama import errors

log = logging.getLogger(__name__)

OLLAMA_JSON = "application/json; charset=utf-8"


class ClientDisconnected(errors.PollamaError):
    """The client closed the connection before a non-streamed answer was ready; the work
    was cancelled (``server.disconnect``). An HTTP concern, not a domain error, so it lives
    here; its status is nginx's 499 ("client closed request"), which only the access log
    and the request metrics ever see."""

    def __init__(self) -> None:
        super().__init__("the client closed the connection before the answer was ready")


STATUS_BY_ERROR: tuple[tuple[type[errors.PollamaError], int], ...] = (
    (ClientDisconnected, 499),
    (errors.InvalidRequest, 400),
    (errors.NotFound, 404),
    (errors.AlreadyExists, 409),
    (errors.ServerBusy, 503),
    (errors.AcceleratorUnavailable, 503),
    (errors.RpcServerUnavailable, 503),
    (errors.InsufficientMemory, 500),
    (errors.InternalError, 500),
)


def status_for(exc: BaseException) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def message_for(exc: BaseException) -> str:
    if isinstance(exc, errors.PollamaError):
        return exc.message
    if isinstance(exc, ValidationError):
        return validation_message(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    """A one-line, actionable description of why a request body was refused."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def log_failure(exc: BaseException, status: int) -> None:
    """Server-side failures are logged with their traceback; a full queue is only a warning."""
    if status == 503:
        log.warning("refused: %s", message_for(exc))
    elif status >= 500:
        log.error("request failed", exc_info=exc)


def failure(exc: BaseException) -> tuple[int, str]:
    """The status and message of ``exc``, logged if the server is at fault."""
    status = status_for(exc)
    log_failure(exc, status)
    return status, message_for(exc)


# -- the bodies ------------------------------------------------------------------------------

_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
_OPENAI_CODES = {401: "invalid_api_key", 403: "insufficient_permissions"}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def ollama_body(message: str) -> dict[str, Any]:
    return {"error": message}


def openai_body(status: int, message: str, kind: str = "") -> dict[str, Any]:
    """OpenAI's error object, typed by the status (Ollama's ``openai.NewError``); a 401 or
    403 from the middleware takes its ``kind`` (``authentication_error``…) and a code."""
    default = kind if status in (401, 403) else "api_error"
    return {"error": {
        "message": message,
        "type": _OPENAI_TYPES.get(status, default),
        "param": None,
        "code": _OPENAI_CODES.get(status),
    }}  # fmt: skip


def anthropic_body(status: int, message: str, kind: str = "") -> dict[str, Any]:
    """Anthropic's error object; its ``type`` is ``kind`` when given, else the status's."""
    kind = kind or _ANTHROPIC_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def registry_body(code: str, message: str) -> dict[str, Any]:
    """The registry protocol's error object (``/v2/``: ``MANIFEST_UNKNOWN``…)."""
    return {"errors": [{"code": code, "message": message, "detail": None}]}


def error_body(path: str, status: int, kind: str, message: str) -> dict[str, Any]:
    """The body the middleware answers ``path`` with, in the shape its client parses.
    ``kind`` is Anthropic's error type (``authentication_error``, ``request_too_large``…)."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return anthropic_body(status, message, kind)
    if path.startswith("/v1/") or path == "/rerank":  # llama-server's rerank path
        return openai_body(status, message, kind)
    return ollama_body(message)


# -- a route's answer ------------------------------------------------------------------------


def ollama_error(message: str, status: int) -> JSONResponse:
    return JSONResponse(ollama_body(message), status_code=status, media_type=OLLAMA_JSON)


def error_response(exc: BaseException) -> JSONResponse:
    """Ollama's answer to ``exc``."""
    status, message = failure(exc)
    return ollama_error(message, status)


def openai_error_response(exc: BaseException) -> JSONResponse:
    """OpenAI's error object, with the same status as the native error
    (docs/ollama-behaviour.md#error-bodies-by-protocol)."""
    status, message = failure(exc)
    return JSONResponse(openai_body(status, message), status_code=status)


def anthropic_error_response(exc: BaseException) -> JSONResponse:
    status, message = failure(exc)
    body = {**anthropic_body(status, message), "request_id": f"req_{secrets.token_hex(12)}"}
    return JSONResponse(body, status_code=status)


# -- the last frame of a stream whose 200 is sent --------------------------------------------


def ollama_stream_error(exc: BaseException) -> dict[str, Any]:
    return ollama_body(failure(exc)[1])


def openai_stream_error(exc: BaseException) -> dict[str, Any]:
    return openai_body(*failure(exc))


def anthropic_stream_error(exc: BaseException) -> dict[str, Any]:
    return anthropic_body(*failure(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Ollama's bodies for what escapes a route: domain errors, validation errors, and
    Starlette's own 404/405 (gin's plain-text answers)."""

    async def on_domain_error(_request: Request, exc: Exception) -> Response:
        return error_response(exc)

    async def on_validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return ollama_error(validation_message(exc), 400)

    async def on_http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return PlainTextResponse("404 page not found", status_code=404)
        if exc.status_code == 405:
            return PlainTextResponse("405 method not allowed", status_code=405)
        return ollama_error(str(exc.detail), exc.status_code)

    app.add_exception_handler(errors.PollamaError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
