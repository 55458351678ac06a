"""Anthropic-compatible routes: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Translation only, over the one inference service: a stream is native events turned into
Anthropic's events (:class:`_Events`), written by ``server.streaming`` in its Anthropic
framing; errors use Anthropic's error object (``server.errors``). Thinking comes back as
``thinking`` blocks (with an empty ``signature``: nothing here signs it), tool calls as
``tool_use`` blocks whose id is the call's id, and ``stop_reason`` is ``tool_use`` when a call
was made, ``stop_sequence`` (with ``stop_sequence`` the string) when one of the request's
``stop_sequences`` ended the answer, ``max_tokens`` at the length limit and ``end_turn``
otherwise.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pollama.inference.service import InferenceService
from pollama.inference.types import InferenceEvent, ToolCall
from pollama.protocol.anthropic import MessagesRequest, matched_stop_sequence, stop_reason
from pollama.server.body import parse_body
from pollama.server.disconnect import collect_while_connected
from pollama.server.errors import anthropic_error_response
from pollama.server.streaming import AnthropicEvent, AnthropicEvents, stream_response

router = APIRouter(prefix="/v1")


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

    def __init__(self, request: MessagesRequest, ident: str) -> None:
        self.request = request
        self.ident = ident
        self.index = 0
        self.open: str | None = None  # "thinking" | "text"
        self.thought = False  # a thinking block was closed: later thinking is dropped
        self.called = False

    def start(self, first: InferenceEvent | None) -> AnthropicEvent:
        """``message_start``, with the prompt's real token count (known before the first
        token: the first event carries it)."""
        return ("message_start", {"message": {
            "id": self.ident,
            "type": "message",
            "role": "assistant",
            "model": self.request.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": first.prompt_tokens if first else 0, "output_tokens": 0},
        }})  # fmt: skip

    def _close(self) -> list[AnthropicEvent]:
        if self.open is None:
            return []
        if self.open == "thinking":
            self.thought = True
        self.open = None
        self.index += 1
        return [("content_block_stop", {"index": self.index - 1})]

    def _delta(self, kind: str, block: dict[str, Any], delta: dict[str, Any]
               ) -> list[AnthropicEvent]:
        out: list[AnthropicEvent] = []
        if self.open != kind:
            out += self._close()
            self.open = kind
            out.append(("content_block_start", {"index": self.index, "content_block": block}))
        out.append(("content_block_delta", {"index": self.index, "delta": delta}))
        return out

    def _tool_use(self, call: ToolCall) -> list[AnthropicEvent]:
        """One whole block per call: its start, its arguments in one delta, its stop."""
        out = self._close()
        block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": call.arguments_json()}
        out.append(("content_block_start", {"index": self.index, "content_block": block}))
        out.append(("content_block_delta", {"index": self.index, "delta": delta}))
        out.append(("content_block_stop", {"index": self.index}))
        self.index += 1
        self.called = True
        return out

    def _end(self, event: InferenceEvent) -> list[AnthropicEvent]:
        sequence = matched_stop_sequence(self.request, event.stop_sequence)
        reason = stop_reason(
            event.done_reason or "stop", tool_use=self.called, stop_sequence=sequence or ""
        )
        return [*self._close(), ("message_delta", {
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": _usage(event),
        }), ("message_stop", {})]  # fmt: skip

    def __call__(self, event: InferenceEvent) -> list[AnthropicEvent]:
        out: list[AnthropicEvent] = []
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
            out += self._tool_use(call)
        if event.done:
            out += self._end(event)
        return out


def _message(parsed: MessagesRequest, ident: str, whole: InferenceEvent) -> dict[str, Any]:
    """A whole answer's ``message`` object."""
    sequence = matched_stop_sequence(parsed, whole.stop_sequence)
    return {
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


@router.post("/messages")
async def messages(request: Request) -> Response:
    service: InferenceService = request.app.state.inference
    try:
        parsed = await parse_body(request, MessagesRequest)
        events = service.stream(await service.prepare(parsed.to_inference()))
    except Exception as exc:  # noqa: BLE001 - one mapping in server.errors
        return anthropic_error_response(exc)
    ident = f"msg_{secrets.token_hex(12)}"
    if parsed.stream:
        render = _Events(parsed, ident)
        return await stream_response(events, AnthropicEvents(render.start, render))
    try:
        whole = await collect_while_connected(request, events)
    except Exception as exc:  # noqa: BLE001
        return anthropic_error_response(exc)
    return JSONResponse(_message(parsed, ident, whole))


@router.post("/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    service: InferenceService = request.app.state.inference
    try:
        parsed = await parse_body(request, MessagesRequest)
        prepared = await service.prepare(parsed.to_inference(check_max_tokens=False))
        tokens = await service.count_tokens(prepared)
    except Exception as exc:  # noqa: BLE001
        return anthropic_error_response(exc)
    return JSONResponse({"input_tokens": tokens})
