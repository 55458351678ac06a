"""Error answers written by the middleware, before any route runs, in each protocol's shape.

The routes raise domain errors that ``server.errors`` maps; the middleware (keys, Host,
Origin, limits) refuses requests that never reach a route, so it writes its own bodies, but
in the shape the caller's client parses: Anthropic's for ``/v1/messages``, OpenAI's for the
rest of ``/v1/*``, Ollama's ``{"error": "..."}`` everywhere else (spec §2.1, §3.1, §3.7).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Receive, Scope, Send

__all__ = ["error_body", "json_error"]

_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
_OPENAI_CODES = {401: "invalid_api_key", 403: "insufficient_permissions"}


def error_body(path: str, status: int, kind: str, message: str) -> dict[str, Any]:
    """The body for ``path``. ``kind`` is Anthropic's error type (``authentication_error``,
    ``permission_error``, ``request_too_large``, ``overloaded_error``…)."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return {"type": "error", "error": {"type": kind, "message": message}}
    if path.startswith("/v1/"):
        return {"error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, kind if status in (401, 403) else "api_error"),
            "param": None,
            "code": _OPENAI_CODES.get(status),
        }}  # fmt: skip
    return {"error": message}


def json_error(
    path: str,
    status: int,
    kind: str,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Any:
    """An ASGI app that answers ``status`` with the error body for ``path``."""
    body = json.dumps(error_body(path, status, kind, message), ensure_ascii=False).encode()

    async def app(_scope: Scope, _receive: Receive, send: Send) -> None:
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    return app
