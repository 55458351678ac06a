"""OpenAI-compatible routes (``/v1/*``) over the one inference service.

Only translation lives here: request models turn into an ``InferenceRequest``
(``pollama.protocol.openai``), inference events into OpenAI's chunks (streamed by
``server.streaming`` in its SSE framing) and objects, and errors into OpenAI's error object
(``server.errors``).

Shapes follow Ollama's ``openai`` package (docs/ollama-behaviour.md#openai-chat-completions):
reasoning as ``reasoning`` (and, for clients of DeepSeek-style servers, also
``reasoning_content``); tool calls whole, with ``arguments`` a JSON string, never split across
chunks; ``finish_reason`` ``tool_calls`` when a call was made and the model stopped by itself.

Logprobs, when asked: chat choices carry ``logprobs.content``, one ``{token, logprob, bytes,
top_logprobs}`` per token (a streamed chunk those of the tokens whose text it brings; when a
native event is split into a reasoning and a content chunk they go on the first, as in
Ollama). ``/v1/completions`` answers OpenAI's legacy shape, which the ``openai`` SDK types
(Ollama leaves it out): ``tokens``, ``token_logprobs``, ``top_logprobs`` (one ``{token:
logprob}`` dict per token) and ``text_offset`` (each token's character offset in the
choice's text, the echoed prompt included).

``/v1/audio/transcriptions`` reads its multipart form itself (``server.multipart``), within
the audio byte cap, and answers Ollama's way: one non-streamed chat turn with the clip
attached, through the same inference service.
"""

from __future__ import annotations

import base64
import codecs
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError

from pollama.errors import InvalidRequest, ModelNotFound
from pollama.inference.embeddings import EmbeddingService
from pollama.inference.service import InferenceService
from pollama.inference.types import InferenceEvent
from pollama.names import ModelName
from pollama.protocol.openai import (
    ChatCompletionRequest,
    EmbeddingRequest,
    LegacyCompletionRequest,
    TranscriptionRequest,
    finish_reason,
)
from pollama.runner.base import Logprob, TokenLogprob
from pollama.server.body import parse_body
from pollama.server.disconnect import collect_while_connected, while_connected
from pollama.server.errors import openai_error_response, validation_message
from pollama.server.multipart import FormPart, parse_form, read_bounded
from pollama.server.streaming import Sse, stream_response
from pollama.server.vectors_json import VectorsResponse
from pollama.store import Store

router = APIRouter(prefix="/v1")


def _usage(event: InferenceEvent | None) -> dict[str, Any]:
    m = event.metrics if event else None
    prompt = m.prompt_eval_count if m else 0
    completion = m.eval_count if m else 0
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if m and m.prompt_cached:
        usage["prompt_tokens_details"] = {"cached_tokens": m.prompt_cached}
    return usage


def _include_usage(parsed: ChatCompletionRequest | LegacyCompletionRequest) -> bool:
    options = parsed.stream_options
    return bool(options and options.include_usage)


async def _start(request: Request, parsed: ChatCompletionRequest | LegacyCompletionRequest
                 ) -> AsyncIterator[InferenceEvent]:
    """The request prepared (model found, options checked) and its generation started."""
    service: InferenceService = request.app.state.inference
    return service.stream(await service.prepare(parsed.to_inference()))


def _head(ident: str, kind: str, model: str) -> dict[str, Any]:
    """The fields every object of one response starts with; ``created`` is now."""
    return {
        "id": ident,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_ollama",
    }


def _token_logprob(entry: TokenLogprob) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": entry.bytes or None}


def _chat_logprobs(entries: Sequence[Logprob]) -> dict[str, Any]:
    """A chat choice's ``logprobs``: ``{"content": [...]}``, ``top_logprobs`` always a list."""
    content = [
        {**_token_logprob(e), "top_logprobs": [_token_logprob(t) for t in e.top_logprobs]}
        for e in entries
    ]
    return {"content": content}


class _LegacyLogprobs:
    """The legacy completions ``logprobs`` of successive pieces of one choice.

    ``text_offset`` counts characters from the start of the choice's text, through the
    tokens' own bytes (so a character split over two tokens counts once, at the token that
    starts it); ``offset`` starts after the echoed prompt. Of two alternatives with the same
    text, the likelier one is kept (the dict holds one value per text).
    """

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, entries: Sequence[Logprob]) -> dict[str, Any]:
        tokens: list[str] = []
        values: list[float] = []
        tops: list[dict[str, float]] = []
        offsets: list[int] = []
        for entry in entries:
            tokens.append(entry.token)
            values.append(entry.logprob)
            top: dict[str, float] = {}
            for alternative in entry.top_logprobs:
                top.setdefault(alternative.token, alternative.logprob)
            tops.append(top)
            offsets.append(self.offset)
            self.offset += len(self._decoder.decode(bytes(entry.bytes)))
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }


def _message(event: InferenceEvent) -> dict[str, Any]:
    """The assistant message of a whole chat completion (reasoning under both names)."""
    message: dict[str, Any] = {"role": "assistant", "content": event.text}
    if event.thinking:
        message["reasoning"] = event.thinking
        message["reasoning_content"] = event.thinking
    if event.tool_calls:
        message["tool_calls"] = [call.to_openai() for call in event.tool_calls]
    return message


class _ChatChunks:
    """Ollama's ``ChatWriter``: native events → ``chat.completion.chunk`` objects.

    The first chunk's delta has the role; an event with both reasoning and content (or
    calls) becomes two chunks; the metrics-only final event sends no content chunk; then a
    finish chunk with an empty delta, and the usage chunk when asked for.
    """

    def __init__(self, ident: str, model: str, include_usage: bool) -> None:
        self.ident, self.model = ident, model
        self.include_usage = include_usage
        self.head: dict[str, Any] = {}  # made at the first event: ``created`` is then
        self.started = False
        self.called = False

    def _chunk(
        self, delta: dict[str, Any], finish: str | None = None, logprobs: Sequence[Logprob] = ()
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs:
            choice["logprobs"] = _chat_logprobs(logprobs)
        return {**self.head, "choices": [choice]}

    def _delta(self, event: InferenceEvent, *, thinking: bool, rest: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if not self.started:
            delta["role"] = "assistant"
            self.started = True
        if rest:
            delta["content"] = event.text
        if thinking and event.thinking:
            delta["reasoning"] = event.thinking
            delta["reasoning_content"] = event.thinking
        if rest and event.tool_calls:
            delta["tool_calls"] = [call.to_openai() for call in event.tool_calls]
            self.called = True
        return delta

    def __call__(self, event: InferenceEvent) -> list[dict[str, Any]]:
        self.head = self.head or _head(self.ident, "chat.completion.chunk", self.model)
        out: list[dict[str, Any]] = []
        trailer = event.done and not (
            event.text or event.thinking or event.tool_calls or event.logprobs
        )
        if not trailer or not self.started:
            lp = event.logprobs
            if event.thinking and (event.text or event.tool_calls):
                out.append(self._chunk(self._delta(event, thinking=True, rest=False), None, lp))
                out.append(self._chunk(self._delta(event, thinking=False, rest=True)))
            else:
                out.append(self._chunk(self._delta(event, thinking=True, rest=True), None, lp))
        if event.done:
            reason = finish_reason(event.done_reason or "stop", tool_calls=self.called)
            out.append(self._chunk({}, reason))
            if self.include_usage:
                out.append({**self.head, "choices": [], "usage": _usage(event)})
        return out


def _chat_completion(head: dict[str, Any], whole: InferenceEvent) -> dict[str, Any]:
    """A whole ``chat.completion``."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": _message(whole),
        "finish_reason": finish_reason(
            whole.done_reason or "stop", tool_calls=bool(whole.tool_calls)
        ),
    }
    if whole.logprobs:
        choice["logprobs"] = _chat_logprobs(whole.logprobs)
    return {**head, "choices": [choice], "usage": _usage(whole)}


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    try:
        parsed = await parse_body(request, ChatCompletionRequest)
        events = await _start(request, parsed)
    except Exception as exc:  # noqa: BLE001 - one mapping in server.errors
        return openai_error_response(exc)
    ident = f"chatcmpl-{random.randint(0, 998)}"
    if parsed.stream:
        chunks = _ChatChunks(ident, parsed.model, _include_usage(parsed))
        return await stream_response(events, Sse(chunks))
    head = _head(ident, "chat.completion", parsed.model)
    try:
        whole = await collect_while_connected(request, events)
    except Exception as exc:  # noqa: BLE001
        return openai_error_response(exc)
    return JSONResponse(_chat_completion(head, whole))


def _text_choice(
    text: str,
    finish: str | None,
    entries: Sequence[Logprob] = (),
    legacy: _LegacyLogprobs | None = None,
) -> dict[str, Any]:
    """A completion choice; ``legacy`` renders ``entries`` (the tokens of ``text``)."""
    choice: dict[str, Any] = {"text": text, "index": 0, "finish_reason": finish}
    if entries and legacy is not None:
        choice["logprobs"] = legacy(entries)
    return choice


class _CompletionChunks:
    """Native events → ``text_completion`` chunks: the echoed prompt goes before the first
    text; an event with no text, logprobs or end sends nothing; with ``include_usage`` every
    chunk has a zero ``usage`` and a last chunk has the real one."""

    def __init__(self, ident: str, model: str, echo: str, include_usage: bool) -> None:
        self.ident, self.model = ident, model
        self.pending = echo
        self.legacy = _LegacyLogprobs(len(echo))
        self.include_usage = include_usage
        self.head: dict[str, Any] = {}  # made at the first event: ``created`` is then

    def __call__(self, event: InferenceEvent) -> list[dict[str, Any]]:
        self.head = self.head or _head(self.ident, "text_completion", self.model)
        text, self.pending = self.pending + event.text, ""
        if not text and not event.done and not event.logprobs:
            return []
        finish = (event.done_reason or "stop") if event.done else None
        choice = _text_choice(text, finish, event.logprobs, self.legacy)
        chunk: dict[str, Any] = {**self.head, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        out = [chunk]
        if event.done and self.include_usage:
            out.append({**self.head, "choices": [], "usage": _usage(event)})
        return out


@router.post("/completions")
async def completions(request: Request) -> Response:
    try:
        parsed = await parse_body(request, LegacyCompletionRequest)
        events = await _start(request, parsed)
    except Exception as exc:  # noqa: BLE001 - one mapping in server.errors
        return openai_error_response(exc)
    ident = f"cmpl-{random.randint(0, 998)}"
    echo = parsed.prompt if parsed.echo else ""
    if parsed.stream:
        chunks = _CompletionChunks(ident, parsed.model, echo, _include_usage(parsed))
        return await stream_response(events, Sse(chunks))
    head = _head(ident, "text_completion", parsed.model)
    try:
        whole = await collect_while_connected(request, events)
    except Exception as exc:  # noqa: BLE001
        return openai_error_response(exc)
    finish = whole.done_reason or "stop"
    choice = _text_choice(echo + whole.text, finish, whole.logprobs, _LegacyLogprobs(len(echo)))
    return JSONResponse({**head, "choices": [choice], "usage": _usage(whole)})


def _model_object(name: str, created: int, namespace: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": namespace}


@router.get("/models")
async def list_models(request: Request) -> Response:
    store: Store = request.app.state.store
    data = [
        _model_object(m.name.display_shortest(), m.mtime_ns // 1_000_000_000, m.name.namespace)
        for m in store.list()
    ]
    return JSONResponse({"object": "list", "data": data})


@router.get("/models/{model:path}")
async def retrieve_model(request: Request, model: str) -> Response:
    store: Store = request.app.state.store
    try:
        found = store.find(ModelName.parse(model))
        if found is None:
            raise ModelNotFound(f"model '{model}' not found")
    except Exception as exc:  # noqa: BLE001
        return openai_error_response(exc)
    return JSONResponse(_model_object(model, found.mtime_ns // 1_000_000_000, found.name.namespace))


@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    """``{"object": "list", "data": [{"object": "embedding", "embedding", "index"}], "model",
    "usage"}``; vectors as float lists or, with ``encoding_format: base64``, as base64 of
    little-endian float32 (the ``openai`` SDK asks for base64 by default)."""
    try:
        parsed = await parse_body(request, EmbeddingRequest)
        service: EmbeddingService = request.app.state.embeddings
        result = await while_connected(
            request.receive, service.embed(service.prepare(parsed.to_embedding()))
        )
    except Exception as exc:  # noqa: BLE001 - one mapping in server.errors
        return openai_error_response(exc)
    vectors: list[Any] = result.base64_strings() if parsed.base64 else list(result.vectors)
    data = [
        {"object": "embedding", "embedding": vector, "index": i}
        for i, vector in enumerate(vectors)
    ]
    tokens = result.prompt_eval_count
    return VectorsResponse(
        {
            "object": "list",
            "data": data,
            "model": parsed.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


# What a transcription form may hold beside the file: its text fields and part headers.
_FORM_MARGIN = 64 << 10


async def _transcription_form(request: Request) -> TranscriptionRequest:
    """The form of a transcription request, read within the audio byte cap plus a margin
    (``POLLAMA_MAX_AUDIO_BYTES``; the body cap of every route still holds too)."""
    cap = request.app.state.settings.max_audio_bytes
    body = await read_bounded(
        request,
        cap + _FORM_MARGIN,
        f"the upload is larger than the audio file limit of {cap} bytes "
        "(POLLAMA_MAX_AUDIO_BYTES)",
    )
    form = parse_form(body, request.headers.get("content-type", ""))
    fields: dict[str, str | None] = {
        name: part.text for name, part in form.items() if name != "file"
    }
    upload: FormPart | None = form.get("file")
    fields["file"] = base64.b64encode(upload.data).decode() if upload is not None else None
    try:
        return TranscriptionRequest.model_validate(fields)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc)) from None


@router.post("/audio/transcriptions")
async def audio_transcriptions(request: Request) -> Response:
    """OpenAI's transcription endpoint, as Ollama answers it: the audio in a chat turn
    through the one inference service (``TranscriptionRequest``), never streamed; the
    text trimmed, as ``{"text": ...}`` or, with ``response_format=text``, plain text."""
    try:
        parsed = await _transcription_form(request)
        service: InferenceService = request.app.state.inference
        prepared = await service.prepare(parsed.to_inference())
        whole = await collect_while_connected(request, service.stream(prepared))
    except Exception as exc:  # noqa: BLE001 - one mapping in server.errors
        return openai_error_response(exc)
    text = whole.text.strip()
    if parsed.response_format == "text":
        return PlainTextResponse(text)
    return JSONResponse({"text": text})
