"""The one JSON body reader of every route, Ollama's, OpenAI's and Anthropic's.

An empty body is ``missing request body`` (Ollama's words), a body that is not the model's
JSON an :class:`~pollama.errors.InvalidRequest` whose message lists what is wrong
(``server.errors.validation_message``): both are 400s, which each route answers in its own
protocol's shape. The size is not checked here: ``POLLAMA_MAX_BODY_SIZE`` is enforced while
the body is received (``server.limits``), before this reader sees a byte too many.
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from pollama.errors import InvalidRequest
from pollama.server.errors import validation_message

__all__ = ["parse_body"]

M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    """The request's body, parsed as ``model``."""
    body = await request.body()
    if not body.strip():
        raise InvalidRequest("missing request body")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc)) from None
