"""Anthropic-compatible routes: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Translation only, over the one inference service; errors use Anthropic's error object.
Thinking comes back as ``thinking`` blocks (with an empty ``signature``: nothing here signs
it), tool calls as ``tool_use`` blocks whose id is the call's id, and ``stop_reason`` is
``tool_use`` when a call was made, ``stop_sequence`` (with ``stop_sequence`` the string) when
one of the request's ``stop_sequences`` ended the answer, ``max_tokens`` at the length limit
and ``end_turn`` otherwise.
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
from pollama.protocol.anthropic import MessagesRequest, matched_stop_sequence, stop_reason
from pollama.server.disconnect import collect_while_connected
from pollama.server.errors import log_failure, message_for, status_for, validation_message

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
    log_failure(exc, status)
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


def _usage(event: InferenceEvent | None) -> dict[str, int]:
    m = event.metrics if event else None
    return {
        "input_tokens": m.prompt_eval_count if m else 0,
        "output_tokens": m.eval_count if m else 0,
    }


def _content(event: InferenceEvent) -> list[dict[str, Any]]:
    """A whole answer's blocks, in Anthropic's order: thinking, text, tool uses."""
    blocks: list[dict[str, Any]] = []
    if event.thinking:
        blocks.append({"type": "thinking", "thinking": event.thinking, "signature": ""})
    if event.text:
        blocks.append({"type": "text", "text": event.text})
    for call in event.tool_calls:
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name,
                       "input": call.arguments})
    return blocks


class _Events:
    """Ollama's ``StreamConverter``: native events → Anthropic's SSE event sequence.

    Blocks open lazily and close when the next kind starts: a thinking block, a text block,
    then one block per tool use (start, one ``input_json_delta`` with the whole arguments,
    stop). Invariant: at most one block is open, and ``index`` is the next block's index.
    """

    def __init__(self, request: MessagesRequest) -> None:
        self.request = request
        self.index = 0
        self.open: str | None = None  # "thinking" | "text"
        self.thought = False  # a thinking block was closed: later thinking is dropped
        self.called = False

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        if self.open == "thinking":
            self.thought = True
        self.open = None
        self.index += 1
        return [_event("content_block_stop", {"index": self.index - 1})]

    def _delta(self, kind: str, block: dict[str, Any], delta: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        if self.open != kind:
            out += self._close()
            self.open = kind
            out.append(_event("content_block_start", {"index": self.index,
                                                      "content_block": block}))
        out.append(_event("content_block_delta", {"index": self.index, "delta": delta}))
        return out

    def __call__(self, event: InferenceEvent) -> list[bytes]:
        out: list[bytes] = []
        if event.thinking and not self.thought:
            out += self._delta(
                "thinking",
                {"type": "thinking", "thinking": "", "signature": ""},
                {"type": "thinking_delta", "thinking": event.thinking},
            )
        if event.text:
            out += self._delta(
                "text", {"type": "text", "text": ""}, {"type": "text_delta", "text": event.text}
            )
        for call in event.tool_calls:
            out += self._close()
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": call.arguments_json()}
            out.append(_event("content_block_start", {"index": self.index,
                                                      "content_block": block}))
            out.append(_event("content_block_delta", {"index": self.index, "delta": delta}))
            out.append(_event("content_block_stop", {"index": self.index}))
            self.index += 1
            self.called = True
        if event.done:
            out += self._close()
            sequence = matched_stop_sequence(self.request, event.stop_sequence)
            reason = stop_reason(
                event.done_reason or "stop", tool_use=self.called, stop_sequence=sequence or ""
            )
            out.append(_event("message_delta", {
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": _usage(event),
            }))
            out.append(_event("message_stop", {}))
        return out


@router.post("/messages")
async def messages(request: Request) -> Response:
    service: InferenceService = request.app.state.inference
    try:
        parsed = await _parse(request)
        prepared = await service.prepare(parsed.to_inference())
        events = service.stream(prepared)
        first = await anext(events, None) if parsed.stream else None
    except Exception as exc:  # noqa: BLE001 - one mapping in server.errors
        return anthropic_error(exc)
    ident = f"msg_{secrets.token_hex(12)}"
    if not parsed.stream:
        try:
            whole = await collect_while_connected(request, events)
        except Exception as exc:  # noqa: BLE001
            return anthropic_error(exc)
        sequence = matched_stop_sequence(parsed, whole.stop_sequence)
        return JSONResponse(
            {
                "id": ident,
                "type": "message",
                "role": "assistant",
                "model": parsed.model,
                "content": _content(whole),
                "stop_reason": stop_reason(
                    whole.done_reason or "stop",
                    tool_use=bool(whole.tool_calls),
                    stop_sequence=sequence or "",
                ),
                "stop_sequence": sequence,
                "usage": _usage(whole),
            }
        )

    async def body() -> AsyncIterator[bytes]:
        event = first
        render = _Events(parsed)
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
                    # The prompt's real token count, known before the first token.
                    "usage": {"input_tokens": first.prompt_tokens if first else 0,
                              "output_tokens": 0},
                }
            },
        )
        try:
            while event is not None:
                for data in render(event):
                    yield data
                event = await anext(events, None)
        except Exception as exc:  # noqa: BLE001 - the status is already sent
            status = status_for(exc)
            log_failure(exc, status)
            kind = _ERROR_TYPES.get(status, "api_error")
            yield _event("error", {"error": {"type": kind, "message": message_for(exc)}})
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(body(), media_type="text/event-stream")


@router.post("/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    service: InferenceService = request.app.state.inference
    try:
        parsed = await _parse(request)
        prepared = await service.prepare(parsed.to_inference(check_max_tokens=False))
        tokens = await service.count_tokens(prepared)
    except Exception as exc:  # noqa: BLE001
        return anthropic_error(exc)
    return JSONResponse({"input_tokens": tokens})
