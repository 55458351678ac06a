"""Anthropic-compatible routes: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Translation only, over the one inference service; errors use Anthropic's error object.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from pollama.errors import InvalidRequest
from pollama.inference.service import InferenceService
from pollama.inference.types import InferenceEvent
from pollama.protocol.anthropic import MessagesRequest, stop_reason
from pollama.server.errors import message_for, status_for, validation_message

router = APIRouter(prefix="/v1")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error(exc: BaseException) -> JSONResponse:
    status = status_for(exc)
    body = {
        "type": "error",
        "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message_for(exc)},
        "request_id": f"req_{secrets.token_hex(12)}",
    }
    return JSONResponse(body, status_code=status)


async def _parse(request: Request) -> MessagesRequest:
    raw = await request.body()
    if not raw.strip():
        raise InvalidRequest("missing request body")
    try:
        return MessagesRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc)) from None


def _event(kind: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps({"type": kind, **data}, separators=(",", ":"), ensure_ascii=False)
    return f"event: {kind}\ndata: {payload}\n\n".encode()


@router.post("/messages")
async def messages(request: Request) -> Response:
    service: InferenceService = request.app.state.inference
    try:
        parsed = await _parse(request)
        prepared = service.prepare(parsed.to_inference())
    except Exception as exc:  # noqa: BLE001 - one mapping in server.errors
        return anthropic_error(exc)
    ident = f"msg_{secrets.token_hex(12)}"
    events = service.stream(prepared)
    if not parsed.stream:
        parts: list[str] = []
        last: InferenceEvent | None = None
        try:
            async for event in events:
                parts.append(event.text)
                last = event
        except Exception as exc:  # noqa: BLE001
            return anthropic_error(exc)
        assert last is not None
        m = last.metrics
        return JSONResponse(
            {
                "id": ident,
                "type": "message",
                "role": "assistant",
                "model": parsed.model,
                "content": [{"type": "text", "text": "".join(parts)}],
                "stop_reason": stop_reason(last.done_reason),
                "stop_sequence": None,
                "usage": {
                    "input_tokens": m.prompt_eval_count if m else 0,
                    "output_tokens": m.eval_count if m else 0,
                },
            }
        )
    try:
        first = await anext(events)
    except StopAsyncIteration:
        first = None
    except Exception as exc:  # noqa: BLE001
        return anthropic_error(exc)

    async def body() -> AsyncIterator[bytes]:
        event = first
        final: InferenceEvent | None = None
        yield _event(
            "message_start",
            {
                "message": {
                    "id": ident,
                    "type": "message",
                    "role": "assistant",
                    "model": parsed.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                }
            },
        )
        yield _event(
            "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
        )
        try:
            while event is not None:
                if event.text:
                    yield _event(
                        "content_block_delta",
                        {"index": 0, "delta": {"type": "text_delta", "text": event.text}},
                    )
                if event.done:
                    final = event
                event = await anext(events, None)
        except Exception as exc:  # noqa: BLE001
            yield _event("error", {"error": {"type": "api_error", "message": message_for(exc)}})
            return
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        m = final.metrics if final else None
        yield _event("content_block_stop", {"index": 0})
        yield _event(
            "message_delta",
            {
                "delta": {
                    "stop_reason": stop_reason(final.done_reason if final else "stop"),
                    "stop_sequence": None,
                },
                "usage": {
                    "input_tokens": m.prompt_eval_count if m else 0,
                    "output_tokens": m.eval_count if m else 0,
                },
            },
        )
        yield _event("message_stop", {})

    return StreamingResponse(body(), media_type="text/event-stream")


@router.post("/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    service: InferenceService = request.app.state.inference
    try:
        parsed = await _parse(request)
        prepared = service.prepare(parsed.to_inference(check_max_tokens=False))
        tokens = await service.count_tokens(prepared)
    except Exception as exc:  # noqa: BLE001
        return anthropic_error(exc)
    return JSONResponse({"input_tokens": tokens})
