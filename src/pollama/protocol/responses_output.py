"""A Responses API answer built from native inference events: its output items, the
response object, and (streamed) the event sequence the ``openai`` SDK's
``responses.stream()`` accumulates.

One builder serves both answers, so they cannot disagree: a streamed answer is each event's
frames; a whole one is the same events fed in, then :meth:`ResponseBuilder.response`.

Output items come in the order the model produced them: a ``reasoning`` item (the thinking,
as a ``summary_text`` and, as Ollama does, in ``encrypted_content`` as plain text so a client
that sends it back gives the model its thinking again), a ``message`` item (the text), then
one ``function_call`` item per tool call. Streamed, each item is ``output_item.added``, its
deltas, its ``.done`` events and ``output_item.done``; an item closes when the next kind
starts. ``sequence_number`` counts every event from 0, without gaps.

The end: ``response.completed``, also when the answer hit ``max_output_tokens`` (the
object's ``status`` is then ``incomplete``, with ``incomplete_details``): the SDK's
``get_final_response()`` needs that event, and Ollama sends it. A failure after the stream
began is ``response.failed`` (the object with ``status: "failed"`` and its ``error``) and an
``error`` event.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from pollama.inference.types import InferenceEvent, ToolCall
from pollama.protocol.responses import ResponsesRequest, output_message

__all__ = ["ResponseBuilder", "ResponseEvent", "input_item_records", "new_id"]

ResponseEvent = tuple[str, dict[str, Any]]
"""An SSE event's name and its data (which repeats the name as ``type``)."""


def new_id(prefix: str) -> str:
    """A random id (192 bits): a stored response's id is all that guards it on a server
    without keys, so it must not be guessable."""
    return f"{prefix}_{secrets.token_hex(24)}"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseBuilder:
    """The answer to one request, growing with each native event (see the module doc)."""

    def __init__(self, request: ResponsesRequest, ident: str, *, store: bool) -> None:
        self.request = request
        self.id = ident
        self.store = store
        self.created_at = int(time.time())
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.thinking = ""
        self.text = ""
        self.calls: list[ToolCall] = []
        self.sequence = 0
        self.status = "in_progress"
        self.usage: dict[str, Any] | None = None
        self.incomplete: dict[str, str] | None = None
        self.error: dict[str, str] | None = None

    # -- the response object -----------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        """The response object as it stands (``output``: the items finished so far)."""
        r = self.request
        reasoning = r.reasoning or {}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if self.status == "completed" else None,
            "status": self.status,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "model": r.model,
            "previous_response_id": r.previous_response_id,
            "instructions": r.instructions,
            "output": list(self.items),
            "tools": list(r.tools or []),
            "tool_choice": r.tool_choice if r.tool_choice is not None else "auto",
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "truncation": r.truncation or "disabled",
            "text": {"format": (r.text or {}).get("format") or {"type": "text"}},
            "temperature": 1.0 if r.temperature is None else r.temperature,
            "top_p": 1.0 if r.top_p is None else r.top_p,
            "max_output_tokens": r.max_output_tokens,
            "reasoning": ({"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
                          if reasoning else None),  # fmt: skip
            "usage": self.usage,
            "store": self.store,
            "background": False,
            "service_tier": "default",
            "metadata": r.metadata or {},
        }

    def conversation_turn(self) -> dict[str, Any]:
        """The answer as the native assistant message a follow-up's conversation holds."""
        return output_message(self.text, self.thinking, [c.to_ollama() for c in self.calls])

    # -- events ------------------------------------------------------------------------------

    def _event(self, kind: str, **data: Any) -> ResponseEvent:
        event = (kind, {"type": kind, "sequence_number": self.sequence, **data})
        self.sequence += 1
        return event

    def opening(self) -> list[ResponseEvent]:
        return [self._event("response.created", response=self.response()),
                self._event("response.in_progress", response=self.response())]  # fmt: skip

    def __call__(self, event: InferenceEvent) -> list[ResponseEvent]:
        out: list[ResponseEvent] = []
        if event.thinking:
            out += self._reasoning_delta(event.thinking)
        if event.text:
            out += self._text_delta(event.text)
        for call in event.tool_calls:
            out += self._function_call(call)
        if event.done:
            out += self._close()
            out += self._finish(event)
        return out

    def _start(self, item: dict[str, Any]) -> list[ResponseEvent]:
        out = self._close()
        self.open = item
        return [*out, self._event("response.output_item.added",
                                  output_index=len(self.items), item=dict(item))]  # fmt: skip

    def _close(self) -> list[ResponseEvent]:
        """The open item's ``.done`` events and ``output_item.done``; it joins the output."""
        item, self.open = self.open, None
        if item is None:
            return []
        index = len(self.items)
        out: list[ResponseEvent] = []
        if item["type"] == "reasoning":
            text = item["encrypted_content"] = item["_text"]
            part = {"type": "summary_text", "text": text}
            item["summary"] = [part]
            out += [self._event("response.reasoning_summary_text.done", item_id=item["id"],
                                output_index=index, summary_index=0, text=text),
                    self._event("response.reasoning_summary_part.done", item_id=item["id"],
                                output_index=index, summary_index=0, part=part)]  # fmt: skip
        elif item["type"] == "message":
            part = _text_part(item["_text"])
            item["content"] = [part]
            out += [self._event("response.output_text.done", item_id=item["id"],
                                output_index=index, content_index=0, text=part["text"],
                                logprobs=[]),
                    self._event("response.content_part.done", item_id=item["id"],
                                output_index=index, content_index=0, part=part)]  # fmt: skip
        item.pop("_text", None)
        item["status"] = "completed"
        self.items.append(item)
        return [*out, self._event("response.output_item.done", output_index=index,
                                  item=dict(item))]  # fmt: skip

    def _reasoning_delta(self, text: str) -> list[ResponseEvent]:
        out: list[ResponseEvent] = []
        if self.open is None or self.open["type"] != "reasoning":
            out += self._start({"id": new_id("rs"), "type": "reasoning", "summary": []})
            out.append(self._event(
                "response.reasoning_summary_part.added", item_id=self.open_id,
                output_index=len(self.items), summary_index=0,
                part={"type": "summary_text", "text": ""},
            ))  # fmt: skip
        assert self.open is not None
        self.open["_text"] = self.open.get("_text", "") + text
        self.thinking += text
        return [*out, self._event("response.reasoning_summary_text.delta", item_id=self.open_id,
                                  output_index=len(self.items), summary_index=0,
                                  delta=text)]  # fmt: skip

    def _text_delta(self, text: str) -> list[ResponseEvent]:
        out: list[ResponseEvent] = []
        if self.open is None or self.open["type"] != "message":
            out += self._start({"id": new_id("msg"), "type": "message", "status": "in_progress",
                                "role": "assistant", "content": []})  # fmt: skip
            out.append(self._event("response.content_part.added", item_id=self.open_id,
                                   output_index=len(self.items), content_index=0,
                                   part=_text_part("")))  # fmt: skip
        assert self.open is not None
        self.open["_text"] = self.open.get("_text", "") + text
        self.text += text
        return [*out, self._event("response.output_text.delta", item_id=self.open_id,
                                  output_index=len(self.items), content_index=0, delta=text,
                                  logprobs=[])]  # fmt: skip

    def _function_call(self, call: ToolCall) -> list[ResponseEvent]:
        """One whole item per call: added, its arguments in one delta, done."""
        arguments = call.arguments_json()
        item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress",
                "call_id": call.id, "name": call.name, "arguments": ""}  # fmt: skip
        out = self._start(item)
        index = len(self.items)
        out += [self._event("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=index, delta=arguments),
                self._event("response.function_call_arguments.done", item_id=item["id"],
                            output_index=index, name=call.name, arguments=arguments)]
        item["arguments"] = arguments
        self.calls.append(call)
        return out + self._close()

    @property
    def open_id(self) -> str:
        assert self.open is not None
        return str(self.open["id"])

    def _finish(self, event: InferenceEvent) -> list[ResponseEvent]:
        m = event.metrics
        prompt, output = (m.prompt_eval_count, m.eval_count) if m else (0, 0)
        self.usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": m.prompt_cached if m else 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output,
        }
        if event.done_reason == "length" and not self.calls:
            self.incomplete = {"reason": "max_output_tokens"}
            self.status = "incomplete"
        else:
            self.status = "completed"
        return [self._event("response.completed", response=self.response())]

    def failed(self, status: int, message: str) -> list[ResponseEvent]:
        """The end of a stream that failed after it began."""
        self.open = None
        self.status = "failed"
        code = "server_error" if status >= 500 else "invalid_request"
        self.error = {"code": code, "message": message}
        return [self._event("response.failed", response=self.response()),
                self._event("error", code=code, message=message, param=None)]  # fmt: skip


_ITEM_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
                  "reasoning": "rs"}  # fmt: skip


def input_item_records(items: list[Any]) -> list[dict[str, Any]]:
    """A request's input items as ``GET /v1/responses/{id}/input_items`` lists them: each
    with its ``type`` and an ``id`` (given, else a new one), a message's string content as
    one text part (``output_text`` for the assistant's, ``input_text`` for the others)."""
    out = []
    for item in items:
        record = dict(item)
        kind = record.get("type") or "message"
        record["type"] = kind
        if kind == "message":
            content = record.get("content")
            if isinstance(content, str):
                part = "output_text" if record.get("role") == "assistant" else "input_text"
                record["content"] = [{"type": part, "text": content}]
            record.setdefault("status", "completed")
        record.setdefault("id", new_id(_ITEM_PREFIXES.get(str(kind), "item")))
        out.append(record)
    return out
