"""Pydantic models of Anthropic's Messages API (``/v1/messages``) and their translation.

Content blocks map onto native messages as Ollama's middleware does
(docs/ollama-behaviour.md#anthropic-messages): text blocks join into the message content,
``tool_use`` blocks become tool calls, ``tool_result`` blocks become ``role: "tool"`` messages
(named after the ``tool_use`` they answer), ``thinking`` blocks become the message's thinking.
Unlike Ollama, a block of any other type (``document`` with any source, ``search_result``, server
tool blocks…) is a 400 naming the type instead of being dropped silently; ``redacted_thinking``
alone is skipped (encrypted for Anthropic's servers, it holds nothing a local model could read).
``thinking`` ``enabled``/``disabled`` (or ``output_config.effort``) sets ``think``; a model that
cannot think has it dropped, not refused, as Ollama does for this endpoint. Beyond Ollama,
``tool_choice`` is honoured (``any``/``tool`` force a call, ``none`` answers without tools), and an
answer that one of the request's ``stop_sequences`` ended says so (``stop_reason: "stop_sequence"``,
and which in ``stop_sequence``; Ollama answers ``end_turn`` and no sequence).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from pollama.errors import InvalidImage, InvalidRequest
from pollama.inference.images import check_media_type
from pollama.inference.types import InferenceRequest, ToolChoice
from pollama.options import OPTIONS


class AnthropicModel(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class MessageParam(AnthropicModel):
    role: str
    content: str | list[dict[str, Any]]


class MessagesRequest(AnthropicModel):
    model: str = ""
    max_tokens: int | None = None
    messages: list[MessageParam] = []
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    metadata: Any = None

    def to_inference(self, *, check_max_tokens: bool = True) -> InferenceRequest:
        if not self.model:
            raise InvalidRequest("model is required")
        if check_max_tokens and (self.max_tokens is None or self.max_tokens <= 0):
            raise InvalidRequest("max_tokens is required and must be positive")
        if not self.messages:
            raise InvalidRequest("messages is required")
        messages: list[dict[str, Any]] = []
        system = _system_text(self.system)
        if system:
            messages.append({"role": "system", "content": system})
        names = _tool_use_names(self.messages)
        for message in self.messages:
            messages.extend(_native(message, names))
        options: dict[str, Any] = {}
        if self.max_tokens is not None:
            options["num_predict"] = self.max_tokens
        for key in ("temperature", "top_p", "top_k"):
            value = getattr(self, key)
            if value is not None:
                options[key] = value
        if self.stop_sequences:
            options["stop"] = self.stop_sequences
        for key, value in (self.model_extra or {}).items():
            if key in OPTIONS:
                options[key] = value
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name"),
                    "description": t.get("description", ""),
                    "parameters": t.get("input_schema") or {},
                },
            }
            for t in self.tools or []
        ]
        choice, name = _tool_choice(self.tool_choice)
        return InferenceRequest(
            model=self.model,
            kind="chat",
            messages=messages,
            options=options,
            tools=tools or None,
            think=self._think(),
            tool_choice=choice,
            tool_name=name,
            relax_thinking=True,
        )

    def _think(self) -> bool | str | None:
        kind = (self.thinking or {}).get("type")
        if kind == "enabled":
            return True
        if kind == "disabled":
            return False
        effort = str((self.output_config or {}).get("effort") or "").strip().lower()
        effort = "high" if effort == "xhigh" else effort
        return effort if effort in ("high", "medium", "low", "max") else None


def _tool_choice(choice: Any) -> tuple[ToolChoice, str | None]:
    """Anthropic ``tool_choice`` (auto / any / tool + name / none) → the internal choice."""
    if not isinstance(choice, dict):
        return "auto", None
    kind = choice.get("type")
    if kind == "any":
        return "required", None
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("tool_choice of type 'tool' needs a 'name'")
        return "required", name
    if kind == "none":
        return "none", None
    return "auto", None


def _tool_use_names(messages: list[MessageParam]) -> dict[str, str]:
    """``tool_use`` id → tool name across the conversation, for naming tool results."""
    names: dict[str, str] = {}
    for message in messages:
        if isinstance(message.content, list):
            for block in message.content:
                if block.get("type") == "tool_use" and block.get("id"):
                    names[str(block["id"])] = str(block.get("name") or "")
    return names


def _unsupported_block(kind: Any, where: str = "") -> InvalidRequest:
    """A content block this server cannot give the model. Ollama drops such blocks silently,
    so the model answered without the document (or search result) the caller sent and
    nobody knew; a 400 that names the type says what to send instead. Documents of every
    source are refused: a URL is never fetched (as image URLs), and a PDF cannot be read
    by a text or vision model here."""
    shown = json.dumps(kind) if isinstance(kind, str) else "(missing)"
    place = f" {where}" if where else ""
    hint = (
        "; send its text as a text block instead"
        if kind in ("document", "search_result")
        else ""
    )
    return InvalidRequest(
        f"content block type {shown}{place} is not supported by this server (supported: "
        f"{', '.join(_BLOCK_TYPES)}){hint}"
    )


_BLOCK_TYPES = ("text", "image", "thinking", "redacted_thinking", "tool_use", "tool_result")
"""The content blocks :func:`_native` translates; any other type is refused."""


def _system_text(system: str | list[dict[str, Any]] | None) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    for block in system:
        if block.get("type") != "text":
            raise _unsupported_block(block.get("type"), "in system")
    return "".join(str(block.get("text", "")) for block in system)


def _image_data(block: dict[str, Any]) -> str:
    """The base64 data of an image block; its bytes are checked and decoded with every other
    image in InferenceService.prepare (inference.images). A URL source is never fetched."""
    source = block.get("source")
    source = source if isinstance(source, dict) else {}
    kind = source.get("type")
    if kind == "url":
        raise InvalidImage(
            'image source type "url" is not supported (pollama does not fetch URLs); send '
            '{"type": "base64", "media_type": "image/png", "data": "<base64>"} instead'
        )
    if kind != "base64":
        raise InvalidImage(f"only base64 image sources are supported, not {json.dumps(kind)}")
    check_media_type(str(source.get("media_type") or ""), "image source")
    data = source.get("data")
    if not isinstance(data, str):
        raise InvalidImage("image source has no base64 data")
    return data


def _tool_result(block: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A ``tool_result`` block as a ``role: "tool"`` message, named after its ``tool_use``."""
    content = block.get("content")
    images: list[str] = []
    if isinstance(content, list):
        for c in content:
            if c.get("type") not in ("text", "image"):
                raise _unsupported_block(c.get("type"), "in a tool_result")
        images = [_image_data(c) for c in content if c.get("type") == "image"]
        content = "".join(str(c.get("text", "")) for c in content if c.get("type") == "text")
    result: dict[str, Any] = {
        "role": "tool",
        "content": str(content or ""),
        "tool_call_id": block.get("tool_use_id"),
    }
    # A tool's screenshot is an image like any other (docs/ollama-behaviour.md#anthropic-messages).
    if images:
        result["images"] = images
    name = names.get(str(block.get("tool_use_id") or ""))
    if name:
        result["tool_name"] = name
    return result


def _native(message: MessageParam, names: dict[str, str]) -> list[dict[str, Any]]:
    role = message.role.lower()
    if isinstance(message.content, str):
        return [{"role": role, "content": message.content}]
    text: list[str] = []
    thinking: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    tool_results: list[dict[str, Any]] = []
    images: list[str] = []
    for block in message.content:
        kind = block.get("type")
        if kind == "text":
            text.append(str(block.get("text", "")))
        elif kind == "thinking":
            thinking.append(str(block.get("thinking", "")))
        elif kind == "redacted_thinking":
            continue
        elif kind == "image":
            images.append(_image_data(block))
        elif kind == "tool_use":
            if not block.get("id"):
                raise InvalidRequest("tool_use block missing required 'id' field")
            if not block.get("name"):
                raise InvalidRequest("tool_use block missing required 'name' field")
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "function": {"name": block.get("name"), "arguments": block.get("input") or {}},
                }
            )
        elif kind == "tool_result":
            tool_results.append(_tool_result(block, names))
        else:
            raise _unsupported_block(kind)
    out: list[dict[str, Any]] = list(tool_results)
    if text or thinking or tool_calls or images or not tool_results:
        native: dict[str, Any] = {"role": role, "content": "".join(text)}
        if thinking:
            native["thinking"] = "".join(thinking)
        if tool_calls:
            native["tool_calls"] = tool_calls
        if images:
            native["images"] = images
        out.append(native)
    return out


def stop_reason(done_reason: str, *, tool_use: bool = False, stop_sequence: str = "") -> str:
    """Ollama's ``mapStopReason``: a made tool call wins, then the length limit. Beyond
    Ollama, ``stop_sequence`` when ``stop_sequence`` (one of the request's
    ``stop_sequences``, see :func:`matched_stop_sequence`) ended the answer."""
    if tool_use:
        return "tool_use"
    if done_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence else "end_turn"


def matched_stop_sequence(request: MessagesRequest, stop_sequence: str) -> str | None:
    """The response's ``stop_sequence``: the stop string that ended generation, when it is
    one of the request's ``stop_sequences`` (a template's own stop word, such as
    ``<|im_end|>``, is a natural end: ``end_turn``), else None."""
    if stop_sequence and stop_sequence in (request.stop_sequences or ()):
        return stop_sequence
    return None
