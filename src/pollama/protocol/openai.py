"""Pydantic models of the OpenAI-compatible API (``/v1/*``) and their translation.

As in vLLM's ``OpenAIBaseModel``, requests allow extra fields: Ollama-specific options
(``num_ctx``, ``top_k``, ``repeat_penalty``…) sent as extra body fields are honoured, which
Ollama itself does not allow. Conversions to the one internal request live next to the models.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pollama.errors import InvalidRequest
from pollama.inference.types import InferenceRequest
from pollama.protocol.options import OPTIONS

log = logging.getLogger(__name__)


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class ChatCompletionRequest(OpenAIModel):
    model: str = ""
    messages: list[ChatMessage] = []
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    reasoning_effort: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None

    def to_inference(self) -> InferenceRequest:
        if not self.messages:
            raise InvalidRequest("[] is too short - 'messages'")
        options = _sampling(self, self.max_completion_tokens or self.max_tokens)
        return InferenceRequest(
            model=self.model,
            kind="chat",
            messages=[m for msg in self.messages for m in _native_messages(msg)],
            options=options,
            format=_format(self.response_format),
            tools=self.tools,
            think=_reasoning(self.reasoning_effort),
        )


class CompletionRequest(OpenAIModel):
    model: str = ""
    prompt: str = ""
    suffix: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    echo: bool = False
    logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def to_inference(self) -> InferenceRequest:
        options = _sampling(self, self.max_tokens)
        if self.top_p == 0:
            options["top_p"] = 1.0
        return InferenceRequest(
            model=self.model,
            kind="generate",
            prompt=self.prompt,
            suffix=self.suffix,
            options=options,
        )


def _sampling(
    req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
) -> dict[str, Any]:
    """OpenAI sampling fields as Ollama options (with OpenAI's defaults, as Ollama sets them)."""
    options: dict[str, Any] = {
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
    }
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    if req.seed is not None:
        options["seed"] = req.seed
    for key in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, key)
        if value is not None:
            options[key] = value
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        if not all(isinstance(s, str) for s in stops):
            raise InvalidRequest(f"invalid type for 'stop' field: {stops!r}")
        options["stop"] = stops
    for key, value in (req.model_extra or {}).items():
        if key in OPTIONS:
            options[key] = value
        elif key == "options" and isinstance(value, dict):
            options.update({k: v for k, v in value.items() if k in OPTIONS})
    return options


def _native_messages(msg: ChatMessage) -> list[dict[str, Any]]:
    """One OpenAI message → native messages (each content part becomes its own, as Ollama)."""
    role = msg.role.lower()
    base: dict[str, Any] = {"role": role}
    if msg.reasoning:
        base["thinking"] = msg.reasoning
    if msg.tool_call_id:
        base["tool_call_id"] = msg.tool_call_id
    if msg.name and role == "tool":
        base["tool_name"] = msg.name
    if msg.tool_calls:
        base["tool_calls"] = msg.tool_calls
    content = msg.content
    if content is None:
        if not msg.tool_calls:
            raise InvalidRequest(f"message with role '{role}' has no content")
        return [{**base, "content": ""}]
    if isinstance(content, str):
        return [{**base, "content": content}]
    out = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            out.append({**base, "content": str(part.get("text", ""))})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.startswith("data:"):
                raise InvalidRequest(
                    "image URLs are not currently supported, please use base64 encoded data instead"
                )
            out.append({**base, "content": "", "images": [url.split(",", 1)[-1]]})
        else:
            raise InvalidRequest(f"invalid message content type: {kind!r}")
    return out


def _format(response_format: dict[str, Any] | None) -> Any:
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if schema is not None else "json"
    return None


def _reasoning(effort: str | None) -> bool | str | None:
    if effort is None:
        return None
    mapping: dict[str, bool | str] = {
        "none": False,
        "minimal": "low",
        "low": "low",
        "medium": "medium",
        "high": "high",
        "max": "max",
        "xhigh": "max",
        "ultra": "max",
    }
    if effort not in mapping:
        raise InvalidRequest(f"invalid reasoning value: {effort!r}")
    return mapping[effort]


FinishReason = Literal["stop", "length", "tool_calls"]


def finish_reason(done_reason: str) -> str:
    return "length" if done_reason == "length" else "stop"
