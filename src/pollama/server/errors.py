"""The one place where domain errors become HTTP responses.

Each protocol has its own body shape: ``{"error": "..."}`` for Ollama's ``/api/*`` (with
``application/json; charset=utf-8`` as Go's gin sends it). The status comes from the error's
class through :data:`STATUS_BY_ERROR`, never from its message.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pollama import errors

log = logging.getLogger(__name__)

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


def error_response(exc: BaseException) -> JSONResponse:
    status = status_for(exc)
    log_failure(exc, status)
    return ollama_error(message_for(exc), status)


def openai_error_response(exc: BaseException) -> JSONResponse:
    """OpenAI's error object, with the same status as the native error (spec §3.1)."""
    status = status_for(exc)
    log_failure(exc, status)
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    body = {"error": {"message": message_for(exc), "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


def ollama_error(message: str, status: int) -> JSONResponse:
    return JSONResponse(
        {"error": message}, status_code=status, media_type="application/json; charset=utf-8"
    )


def install_error_handlers(app: FastAPI) -> None:
    async def on_domain_error(_request: Request, exc: Exception) -> Response:
        return error_response(exc)

    async def on_validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return ollama_error(validation_message(exc), 400)

    async def on_http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        # gin's plain-text answers for unknown routes and wrong methods.
        if exc.status_code == 404:
            return PlainTextResponse("404 page not found", status_code=404)
        if exc.status_code == 405:
            return PlainTextResponse("405 method not allowed", status_code=405)
        return ollama_error(str(exc.detail), exc.status_code)

    app.add_exception_handler(errors.PollamaError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
