"""OpenAI's Responses API request (``POST /v1/responses``) and its translation.

The translation is Ollama's ``openai.FromResponsesRequest`` (docs/ollama-behaviour.md#responses):
``instructions`` is a system message first; ``input`` is a string (one user message) or a list
of items: messages (``role`` user, system, developer (a system message), assistant; content a
string or ``input_text``/``output_text``/``refusal``/``input_image`` parts), ``function_call``
(an assistant tool call, merged into the assistant message before it), ``function_call_output``
(a ``role: "tool"`` message, named after its call) and ``reasoning`` (its text becomes the next
assistant message's thinking). ``tools`` are function tools, ``text.format`` is ``json_schema``
or ``json_object``, ``reasoning.effort`` a ``think`` level, ``max_output_tokens``
``num_predict``; Ollama options may come as extra body fields, as on the other OpenAI routes.

Beyond Ollama, which ignores what it cannot do, every field or item this server cannot honour
is a 400 that names it: an unknown item or content type (with the item's index), a built-in
tool (``web_search``…), a ``file_id`` or an ``input_file``, ``conversation`` (use
``previous_response_id``), ``item_reference``. ``tool_choice`` is honoured, and
``previous_response_id`` continues a stored conversation (``server.routes_responses``).
"""

from __future__ import annotations

import json
from typing import Any

from pollama.errors import InvalidImage, InvalidRequest
from pollama.inference.images import image_from_data_url
from pollama.inference.types import InferenceRequest
from pollama.protocol.openai import (
    GenerationRequest,
    reasoning_think,
    response_format_of,
    sampling_options,
    tool_choice_of,
)

__all__ = ["ITEM_TYPES", "ResponsesRequest", "native_input", "output_message"]

ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
"""The input items translated; any other type is refused, naming it."""
_CONTENT_TYPES = ("input_text", "output_text", "refusal", "input_image")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_SUMMARIES = ("auto", "concise", "detailed")


class ResponsesRequest(GenerationRequest):
    input: str | list[Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    previous_response_id: str | None = None
    conversation: Any = None
    metadata: dict[str, Any] | None = None
    truncation: str | None = None

    def check(self) -> None:
        """What is refused before anything else is read (the stored conversation included)."""
        if not self.model:
            raise InvalidRequest("model is required")
        if self.input is None or self.input == []:
            raise InvalidRequest("input is required: a string or a list of input items")
        if self.conversation is not None:
            raise InvalidRequest(
                "conversation is not supported by this server: continue a conversation with "
                "previous_response_id (the id of the response it follows)"
            )
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise InvalidRequest("max_output_tokens must be a positive integer")
        if self.truncation not in (None, "disabled", "auto"):
            raise InvalidRequest(
                f"invalid truncation {self.truncation!r}: use 'auto' or 'disabled'"
            )
        summary = (self.reasoning or {}).get("summary")
        if summary is not None and summary not in _SUMMARIES:
            raise InvalidRequest(
                f"invalid reasoning summary {summary!r}: use one of {', '.join(_SUMMARIES)}"
            )

    def input_items(self) -> list[dict[str, Any]]:
        """The input as a list of items (a string is one user message)."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return [item for item in self.input or []]

    def to_inference(self, history: list[dict[str, Any]]) -> InferenceRequest:
        """The chat request: instructions, then ``history`` (the stored conversation this
        one continues, maybe empty), then this request's input."""
        self.check()
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        messages += history
        messages += native_input(self.input_items(), history)
        choice, name = tool_choice_of(self.tool_choice)
        effort = (self.reasoning or {}).get("effort")
        return InferenceRequest(
            model=self.model,
            kind="chat",
            messages=messages,
            options=sampling_options(self, self.max_output_tokens),
            format=_text_format(self.text),
            tools=_tools(self.tools) or None,
            think=reasoning_think(effort) if effort is not None else None,
            tool_choice=choice,
            tool_name=name,
            truncate=self.truncation != "disabled",
        )


def _text_format(text: dict[str, Any] | None) -> Any:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequest("text.format must be an object")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequest("text.format of type 'json_schema' needs a 'schema' object")
        return response_format_of({"type": kind, "json_schema": {"schema": fmt["schema"]}})
    if kind == "json_object":
        return "json"
    raise InvalidRequest(
        f"invalid text.format type {kind!r}: use 'text', 'json_schema' or 'json_object'"
    )


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Responses function tools (flat) → native tools (under ``function``)."""
    out = []
    for i, tool in enumerate(tools or []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise InvalidRequest(
                f"tools[{i}]: tool type {json.dumps(kind)} is not supported by this server "
                "(only 'function' tools; built-in tools such as web_search run nowhere here)"
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"tools[{i}]: a function tool needs a 'name'")
        out.append({"type": "function", "function": {
            "name": name,
            "description": tool.get("description") or "",
            "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
        }})  # fmt: skip
    return out


def _content(content: Any, where: str) -> tuple[str, list[str]]:
    """A message's content (a string or parts) as its text and its images."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of content parts")
    text: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            text.append(str(part.get("text") or ""))
        elif kind == "refusal":
            text.append(str(part.get("refusal") or ""))
        elif kind == "input_image":
            images.append(_image(part, f"{where}.content[{j}]"))
        elif kind == "input_file":
            raise InvalidRequest(
                f"{where}.content[{j}]: input_file is not supported by this server; send the "
                "file's text as an input_text part"
            )
        else:
            raise InvalidRequest(
                f"{where}.content[{j}]: unknown content type {json.dumps(kind)} (supported: "
                f"{', '.join(_CONTENT_TYPES)})"
            )
    return "".join(text), images


def _image(part: dict[str, Any], where: str) -> str:
    """An ``input_image`` part's base64 data (checked with every other image later, in
    InferenceService.prepare). Only data URLs: a URL is never fetched, a file id never
    looked up."""
    url = part.get("image_url")
    if isinstance(url, str) and url:
        return image_from_data_url(url)
    if part.get("file_id"):
        raise InvalidImage(f"{where}: file_id images are not supported; send the image as a "
                           "data URL in image_url")  # fmt: skip
    raise InvalidImage(f"{where}: input_image needs an image_url (a data: URL)")


def _arguments(item: dict[str, Any], where: str) -> dict[str, Any]:
    raw = item.get("arguments")
    if raw in (None, ""):
        return {}
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        raise InvalidRequest(f"{where}: arguments is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: arguments must be a JSON object")
    return value


def _call_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    return {
        str(call.get("id")): str(call["function"].get("name") or "")
        for m in messages
        for call in m.get("tool_calls") or []
        if call.get("id")
    }


def native_input(items: list[Any], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items → native chat messages. ``history`` (the stored conversation continued)
    names the calls a ``function_call_output`` may answer."""
    out: list[dict[str, Any]] = []
    thinking = ""
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where}: an input item must be an object")
        kind = item.get("type") or ("message" if item.get("role") else None)
        if kind == "reasoning":
            thinking += _reasoning_text(item)
        elif kind == "message":
            message = _message(item, where)
            if message["role"] == "assistant" and thinking:
                message["thinking"], thinking = thinking, ""
            out.append(message)
        elif kind == "function_call":
            thinking = _add_call(out, item, where, thinking)
        elif kind == "function_call_output":
            out.append(_call_output(item, where, _call_names(history + out)))
        elif kind is None:
            raise InvalidRequest(f"{where}: input item missing required 'type' field")
        else:
            raise InvalidRequest(
                f"{where}: unknown input item type {json.dumps(kind)} (supported: "
                f"{', '.join(ITEM_TYPES)})"
            )
    if thinking:
        out.append({"role": "assistant", "content": "", "thinking": thinking})
    return out


def _reasoning_text(item: dict[str, Any]) -> str:
    """A reasoning item's text: its ``encrypted_content`` (this server's own reasoning items
    carry the plain text there, as Ollama's), else its summary or content texts."""
    if isinstance(item.get("encrypted_content"), str) and item["encrypted_content"]:
        return item["encrypted_content"]
    parts = [*(item.get("summary") or []), *(item.get("content") or [])]
    return "".join(str(p.get("text") or "") for p in parts if isinstance(p, dict))


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = _ROLES.get(str(item.get("role") or ""))
    if role is None:
        raise InvalidRequest(
            f"{where}: invalid role {json.dumps(item.get('role'))} (use user, assistant, "
            "system or developer)"
        )
    text, images = _content(item.get("content"), where)
    message: dict[str, Any] = {"role": role, "content": text}
    if images:
        message["images"] = images
    return message


def _add_call(out: list[dict[str, Any]], item: dict[str, Any], where: str,
              thinking: str) -> str:
    """A ``function_call`` item joins the assistant message just before it (or starts one);
    pending reasoning goes with it. Returns the reasoning still pending."""
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{where}: function_call needs a 'name'")
    call = {"id": str(item.get("call_id") or item.get("id") or ""),
            "function": {"name": name, "arguments": _arguments(item, where)}}  # fmt: skip
    if out and out[-1]["role"] == "assistant":
        out[-1].setdefault("tool_calls", []).append(call)
    else:
        out.append({"role": "assistant", "content": "", "tool_calls": [call]})
    if thinking:
        out[-1]["thinking"] = thinking
    return ""


def _call_output(item: dict[str, Any], where: str, names: dict[str, str]) -> dict[str, Any]:
    call_id = str(item.get("call_id") or "")
    if not call_id:
        raise InvalidRequest(f"{where}: function_call_output needs a 'call_id'")
    output = item.get("output")
    text, images = _content(output if output is not None else "", where)
    message: dict[str, Any] = {"role": "tool", "content": text, "tool_call_id": call_id}
    if images:
        message["images"] = images
    if names.get(call_id):
        message["tool_name"] = names[call_id]
    return message


def output_message(text: str, thinking: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """An answer as the native assistant message a follow-up's conversation holds."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        message["thinking"] = thinking
    if calls:
        message["tool_calls"] = calls
    return message
