"""Error answers written by the middleware, before any route runs, in each protocol's shape.

The routes raise domain errors that ``server.errors`` maps; the middleware (keys, Host,
Origin, limits) refuses requests that never reach a route, so it writes those answers itself,
with the bodies ``server.errors.error_body`` formats in the shape the caller's client parses:
Anthropic's for ``/v1/messages``, OpenAI's for the rest of ``/v1/*``, Ollama's
``{"error": "..."}`` everywhere else (docs/ollama-behaviour.md#error-bodies-by-protocol).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Receive, Scope, Send

from pollama.server.errors import OLLAMA_JSON, error_body

__all__ = ["json_error"]


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
                (b"content-type", OLLAMA_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    return app
