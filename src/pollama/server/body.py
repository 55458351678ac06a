"""Reading JSON request bodies the way Ollama does: an empty body is ``missing request body``."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel

from pollama.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)

MAX_JSON_BODY = 64 << 20


async def parse_body(request: Request, model: type[M]) -> M:
    """Parse the body as ``model``; pydantic errors reach the 400 handler in server.errors."""
    body = await request.body()
    if len(body) > MAX_JSON_BODY:
        raise InvalidRequest(f"request body is larger than {MAX_JSON_BODY} bytes")
    if not body.strip():
        raise InvalidRequest("missing request body")
    return model.model_validate_json(body)
