"""Pydantic models of the OpenAI-compatible API (``/v1/*``) and their translation.

As in vLLM's ``OpenAIBaseModel``, requests allow extra fields: Ollama-specific options
(``num_ctx``, ``top_k``, ``repeat_penalty``…) sent as extra body fields are honoured, which
Ollama itself does not allow. Conversions to the one internal request live next to the models.

Beyond Ollama: ``max_completion_tokens`` is read (as ``max_tokens``), ``tool_choice`` is
honoured (``none`` answers without tools, ``required`` or a named function forces a call),
and ``/v1/completions`` supports ``echo``.

Logprobs: chat's ``logprobs: true`` with ``top_logprobs`` N (0-20) asks for every generated
token's log-probability and N alternatives (``choices[].logprobs.content``, as Ollama);
``top_logprobs`` without ``logprobs`` asks for nothing, as in Ollama. ``/v1/completions``
takes ``logprobs`` N (0-20; Ollama's mapping: N > 0 asks, with N alternatives) and answers
the legacy shape (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), which
Ollama never fills in. Out of range is a 400.

Audio: a chat content part ``{"type": "input_audio", "input_audio": {"data", "format"}}``
becomes its own native message with the clip in ``images``, as Ollama does (the format must
be ``wav``, ``mp3`` or ``flac`` and match the data). ``/v1/audio/transcriptions`` is
Ollama's ``FromTranscriptionRequest``: a chat turn with the clip attached
(:class:`TranscriptionRequest`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict

from pollama.errors import InvalidAudio, InvalidRequest
from pollama.inference.audio import AUDIO_FORMATS, audio_from_input, head_bytes, is_audio
from pollama.inference.embed_request import EmbeddingJob, embedding_inputs
from pollama.inference.images import image_from_data_url
from pollama.inference.types import InferenceRequest, ToolChoice
from pollama.options import OPTIONS
from pollama.runner.base import MAX_TOP_LOGPROBS

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


class GenerationRequest(OpenAIModel):
    """The fields the generating requests share (chat, legacy completions, responses);
    ``sampling_options`` reads them."""

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = []
    max_completion_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    reasoning: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def to_inference(self) -> InferenceRequest:
        if not self.messages:
            raise InvalidRequest("[] is too short - 'messages'")
        top = _top_logprobs("top_logprobs", self.top_logprobs)
        options = sampling_options(self, self.max_completion_tokens or self.max_tokens)
        effort = (self.reasoning or {}).get("effort") if self.reasoning else None
        choice, name = tool_choice_of(self.tool_choice)
        messages: list[dict[str, Any]] = []
        for msg in self.messages:
            messages.extend(_native_messages(msg, self.messages))
        return InferenceRequest(
            model=self.model,
            kind="chat",
            messages=messages,
            options=options,
            format=response_format_of(self.response_format),
            tools=self.tools,
            think=reasoning_think(effort if effort is not None else self.reasoning_effort),
            tool_choice=choice,
            tool_name=name,
            logprobs=bool(self.logprobs),
            top_logprobs=top,
        )


class LegacyCompletionRequest(GenerationRequest):
    prompt: str = ""
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = None

    def to_inference(self) -> InferenceRequest:
        options = sampling_options(self, self.max_tokens)
        if self.top_p == 0:
            options["top_p"] = 1.0
        top = _top_logprobs("logprobs", self.logprobs)
        return InferenceRequest(
            model=self.model,
            kind="generate",
            prompt=self.prompt,
            suffix=self.suffix,
            options=options,
            logprobs=top > 0,
            top_logprobs=top,
        )


def _top_logprobs(name: str, value: int | None) -> int:
    """A request's number of alternatives per token, checked (0 when absent)."""
    if value is None:
        return 0
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}")
    return value


def sampling_options(
    req: GenerationRequest, max_tokens: int | None
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


def native_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool calls (``arguments`` a JSON string) in the native shape (an object)."""
    out = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise InvalidRequest("invalid tool call arguments") from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise InvalidRequest("invalid tool call arguments")
        native: dict[str, Any] = {
            "function": {"name": str(function.get("name") or ""), "arguments": arguments}
        }
        if call.get("id"):
            native["id"] = str(call["id"])
        out.append(native)
    return out


def _name_from_call_id(messages: list[ChatMessage], call_id: str) -> str:
    """The function an earlier assistant message called under ``call_id`` (last one wins)."""
    for msg in reversed(messages):
        for call in msg.tool_calls or []:
            if call.get("id") == call_id:
                return str((call.get("function") or {}).get("name") or "")
    return ""


def _native_messages(msg: ChatMessage, history: list[ChatMessage]) -> list[dict[str, Any]]:
    """One OpenAI message → native messages (each content part becomes its own, as Ollama)."""
    role = msg.role.lower()
    base: dict[str, Any] = {"role": role}
    if msg.reasoning:
        base["thinking"] = msg.reasoning
    if msg.tool_call_id:
        base["tool_call_id"] = msg.tool_call_id
    if role == "tool":
        name = msg.name or (
            _name_from_call_id(history, msg.tool_call_id) if msg.tool_call_id else ""
        )
        if name:
            base["tool_name"] = name
    calls = native_tool_calls(msg.tool_calls) if msg.tool_calls else None
    content = msg.content
    if content is None:
        if not calls:
            raise InvalidRequest(f"message with role '{role}' has no content")
        return [{**base, "content": "", "tool_calls": calls}]
    if isinstance(content, str):
        return [{**base, "content": content, **({"tool_calls": calls} if calls else {})}]
    out = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            out.append({**base, "content": str(part.get("text", ""))})
        elif kind == "image_url":
            # Only data: URLs; the payload is checked and decoded with every other image in
            # InferenceService.prepare (inference.images). Nothing is fetched (SSRF).
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            out.append({**base, "content": "", "images": [image_from_data_url(url)]})
        elif kind == "input_audio":
            # Audio goes in the message's images, as Ollama puts it; the clip is checked with
            # the request's other media in InferenceService.prepare (inference.audio).
            audio = audio_from_input(part.get("input_audio"))
            out.append({**base, "content": "", "images": [audio]})
        else:
            raise InvalidRequest(f"invalid message content type: {kind!r}")
    if calls:
        if out:
            out[-1]["tool_calls"] = calls
        else:
            out.append({**base, "content": "", "tool_calls": calls})
    return out


def tool_choice_of(choice: Any) -> tuple[ToolChoice, str | None]:
    """OpenAI ``tool_choice`` → (auto|none|required, the one function it names)."""
    if choice is None or choice == "auto":
        return "auto", None
    if choice in ("none", "required"):
        return choice, None
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function":
            function = choice.get("function")
            name = function.get("name") if isinstance(function, dict) else choice.get("name")
            if isinstance(name, str) and name:
                return "required", name
        if kind in ("auto", "none", "required"):  # the Responses-style spelling
            return kind, None
        if kind == "allowed_tools":
            mode = (choice.get("allowed_tools") or {}).get("mode")
            return ("required" if mode == "required" else "auto"), None
    raise InvalidRequest(f"invalid tool_choice: {json.dumps(choice)}")


def response_format_of(response_format: dict[str, Any] | None) -> Any:
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if schema is not None else "json"
    return None


def reasoning_think(effort: str | None) -> bool | str | None:
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
        raise InvalidRequest(
            f"invalid reasoning value: {effort!r} (must be one of "
            f"{', '.join(map(repr, mapping))})"
        )
    return mapping[effort]


def finish_reason(done_reason: str, *, tool_calls: bool = False) -> str:
    """OpenAI's finish reason: ``tool_calls`` replaces ``stop`` when a call was made."""
    if done_reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


TRANSCRIBE_SYSTEM = (
    "Transcribe the audio exactly as spoken. Output only the spoken words. "
    "Do not answer any question in the audio."
)
"""Ollama's system prompt for a transcription (``openai.FromTranscriptionRequest``)."""
TRANSCRIBE_QUESTION = "What exact words are spoken in this audio?"
TRANSCRIPTION_FORMATS = ("json", "text")
"""The ``response_format`` values answered: ``{"text": ...}`` or the bare text."""


class TranscriptionRequest(OpenAIModel):
    """``POST /v1/audio/transcriptions``: the fields of its multipart form (the route reads
    the form; ``file`` is the uploaded file's base64, None when the form has none).

    As in Ollama, it becomes one chat turn through the one inference path: a system prompt
    asking for the spoken words alone (naming the ``language`` and quoting the ``prompt``
    when given) and a user message with the clip attached, at temperature 0 unless the form
    sets one. Only ``json`` (the default) and ``text`` answers are made. Ollama options
    may come as extra form fields, as extra body fields on the chat endpoints (their text
    read as JSON when it is JSON: ``num_predict=10`` is the number 10).
    """

    model: str = ""
    file: str | None = None
    prompt: str = ""
    language: str = ""
    response_format: str = "json"
    temperature: float | None = None

    def to_inference(self) -> InferenceRequest:
        if not self.model:
            raise InvalidRequest("model is required")
        fmt = self.response_format or "json"
        if fmt not in TRANSCRIPTION_FORMATS:
            raise InvalidRequest(
                f"response_format {fmt!r} is not supported: use 'json' or 'text'"
            )
        if self.file is None:
            raise InvalidRequest("file is required: send the audio as the form's 'file' field")
        if not self.file:
            raise InvalidRequest("audio file is empty")
        if not is_audio(head_bytes(self.file)):
            raise InvalidAudio(f"file is not a {AUDIO_FORMATS} file", 1)
        system = TRANSCRIBE_SYSTEM
        if self.language:
            system += f" The audio is in {self.language}."
        if self.prompt:
            system += f" Context: {self.prompt}"
        return InferenceRequest(
            model=self.model,
            kind="chat",
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": TRANSCRIBE_QUESTION, "images": [self.file]},
            ],
            options=self._options(),
        )

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "temperature": 0.0 if self.temperature is None else self.temperature
        }
        for key, value in (self.model_extra or {}).items():
            if key in OPTIONS and isinstance(value, str):
                try:
                    options[key] = json.loads(value)
                except ValueError:
                    options[key] = value
        return options


class EmbeddingRequest(OpenAIModel):
    """``POST /v1/embeddings`` (docs/ollama-behaviour.md#openai-embeddings). Ollama options may
    come as extra body fields, as for the chat endpoints; ``user`` is accepted and ignored."""

    model: str = ""
    input: Any = None
    dimensions: int | None = None
    encoding_format: str | None = None
    user: str | None = None

    @property
    def base64(self) -> bool:
        return (self.encoding_format or "").lower() == "base64"

    def to_embedding(self) -> EmbeddingJob:
        fmt = self.encoding_format
        if fmt and fmt.lower() not in ("float", "base64"):
            raise InvalidRequest(
                f"Invalid value for 'encoding_format' = {fmt}. "
                "Supported values: ['float', 'base64']."
            )
        if self.input is None:
            raise InvalidRequest("invalid input")
        inputs = [""] if self.input == "" else embedding_inputs(self.input)
        options: dict[str, Any] = {}
        for key, value in (self.model_extra or {}).items():
            if key in OPTIONS:
                options[key] = value
            elif key == "options" and isinstance(value, dict):
                options.update({k: v for k, v in value.items() if k in OPTIONS})
        return EmbeddingJob(
            model=self.model, inputs=inputs, dimensions=self.dimensions, options=options
        )
