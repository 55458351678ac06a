"""``/api/generate``, ``/api/chat``, ``/api/embed``, ``/api/embeddings`` and ``/api/ps``:
Ollama's wire format over the one inference service (``pollama.inference``) and the one
embedding service (``pollama.inference.embeddings``).

Chat chunks carry ``message.thinking`` and ``message.tool_calls`` (each call as soon as it
parsed, ``arguments`` an object); generate chunks carry ``thinking``. With ``logprobs: true``
a chunk carries ``logprobs``: one ``{token, logprob, bytes, top_logprobs}`` per token whose
text it brings (Ollama's ``api.Logprob``: ``bytes`` and ``top_logprobs`` left out when
empty, the field left out of chunks that have none); ``stream: false`` concatenates them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pollama.format import rfc3339_utc
from pollama.inference.embeddings import EmbeddingService
from pollama.inference.service import InferenceService, RenderedPrompt
from pollama.inference.tokenizer import TokenizerService
from pollama.inference.types import InferenceEvent, InferenceRequest
from pollama.protocol.ollama import (
    ChatRequest,
    DetokenizeRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ProcessResponse,
    TokenizeRequest,
)
from pollama.runner.base import Logprob, TokenLogprob
from pollama.scheduler import Scheduler
from pollama.server.body import parse_body
from pollama.server.disconnect import collect_while_connected, while_connected
from pollama.server.errors import error_response
from pollama.server.model_views import process_model
from pollama.server.streaming import Ndjson, stream_response
from pollama.server.vectors_json import VectorsResponse

router = APIRouter()


def _service(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.inference
    return service


def _now() -> str:
    return rfc3339_utc(datetime.now(UTC))


def _final_fields(event: InferenceEvent, body: dict[str, Any]) -> None:
    if event.done_reason:
        body["done_reason"] = event.done_reason
    if event.context is not None:
        body["context"] = event.context
    m = event.metrics
    if m is not None:
        for key in (
            "total_duration",
            "load_duration",
            "prompt_eval_count",
            "prompt_eval_duration",
            "eval_count",
            "eval_duration",
        ):
            value = getattr(m, key)
            if value:
                body[key] = value
        if m.prompt_cached:
            body["prompt_cached_count"] = m.prompt_cached
    if event.truncation is not None:
        body["truncated"] = True
        body["truncated_messages"] = event.truncation.messages_dropped
        body["num_ctx"] = event.truncation.num_ctx
    if event.context_shifted:
        body["context_shifted"] = event.context_shifted  # beyond Ollama: never silent
    if event.draft_tokens:  # beyond Ollama: what speculative decoding did
        body["draft_tokens"] = event.draft_tokens
        body["draft_accepted"] = event.draft_accepted


def _token_logprob(entry: TokenLogprob) -> dict[str, Any]:
    """Ollama's ``api.TokenLogprob`` (``bytes`` omitempty)."""
    out: dict[str, Any] = {"token": entry.token, "logprob": entry.logprob}
    if entry.bytes:
        out["bytes"] = entry.bytes
    return out


def _logprobs(entries: list[Logprob]) -> list[dict[str, Any]]:
    """Ollama's ``[]api.Logprob`` (``top_logprobs`` omitempty)."""
    out = []
    for entry in entries:
        item = _token_logprob(entry)
        if entry.top_logprobs:
            item["top_logprobs"] = [_token_logprob(t) for t in entry.top_logprobs]
        out.append(item)
    return out


def _generate_body(model: str, event: InferenceEvent) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "created_at": _now(), "response": event.text}
    if event.thinking:
        body["thinking"] = event.thinking
    body["done"] = event.done
    if event.done:
        _final_fields(event, body)
    if event.logprobs:
        body["logprobs"] = _logprobs(event.logprobs)
    return body


def _chat_body(model: str, event: InferenceEvent) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": event.text}
    if event.thinking:
        message["thinking"] = event.thinking
    if event.tool_calls:
        message["tool_calls"] = [call.to_ollama() for call in event.tool_calls]
    body: dict[str, Any] = {
        "model": model,
        "created_at": _now(),
        "message": message,
        "done": event.done,
    }
    if event.done:
        _final_fields(event, body)
    if event.logprobs:
        body["logprobs"] = _logprobs(event.logprobs)
    return body


def _rendered_body(model: str, shape: Any, rendered: RenderedPrompt) -> dict[str, Any]:
    """The answer to ``_debug_render_only``: Ollama's empty, unfinished response with
    ``_debug_info`` (``rendered_template``, ``image_count``), generated nothing."""
    body: dict[str, Any] = shape(model, InferenceEvent(done=False))
    body["_debug_info"] = {
        "rendered_template": rendered.prompt,
        "image_count": rendered.image_count,
    }
    return body


async def _answer(
    request: Request, req: InferenceRequest, stream: bool, shape: Any, render_only: bool = False
) -> Response:
    """Prepare, then load/unload (empty), render (``render_only``) or generate."""
    service = _service(request)
    try:
        prepared = await service.prepare(req)
        if prepared.is_empty:
            if prepared.keep_alive == 0:
                await service.unload(prepared)
                reason = "unload"
            else:
                await service.load(prepared)
                reason = "load"
            return JSONResponse(shape(req.model, InferenceEvent(done=True, done_reason=reason)))
        if render_only:
            rendered = await service.render(prepared)
            return JSONResponse(_rendered_body(req.model, shape, rendered))
    except Exception as exc:  # noqa: BLE001 - one mapping, in server.errors
        return error_response(exc)

    events = service.stream(prepared)
    if stream:
        return await stream_response(events, Ndjson(lambda e: shape(req.model, e)))
    try:
        whole = await collect_while_connected(request, events)
    except Exception as exc:  # noqa: BLE001
        return error_response(exc)
    return JSONResponse(shape(req.model, whole))


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    body = await parse_body(request, GenerateRequest)
    req = body.to_inference()
    stream = body.stream is not False
    return await _answer(request, req, stream, _generate_body, body.debug_render_only)


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    body = await parse_body(request, ChatRequest)
    req = body.to_inference()
    stream = body.stream is not False
    return await _answer(request, req, stream, _chat_body, body.debug_render_only)


@router.get("/api/ps")
async def ps(request: Request) -> Response:
    scheduler: Scheduler = request.app.state.scheduler
    body = ProcessResponse(models=[process_model(loaded) for loaded in scheduler.loaded()])
    return JSONResponse(body.model_dump())


def _embedding_service(request: Request) -> EmbeddingService:
    service: EmbeddingService = request.app.state.embeddings
    return service


@router.post("/api/embed")
async def embed(request: Request) -> Response:
    """Ollama's ``EmbedHandler``: ``{"model", "embeddings", "total_duration",
    "load_duration", "prompt_eval_count"}``, zero counts left out as Go's omitempty does."""
    body = await parse_body(request, EmbedRequest)
    service = _embedding_service(request)
    try:
        result = await while_connected(
            request.receive, service.embed(service.prepare(body.to_embedding()))
        )
    except Exception as exc:  # noqa: BLE001 - one mapping, in server.errors
        return error_response(exc)
    answer: dict[str, Any] = {"model": result.model, "embeddings": result.vectors}
    for key in ("total_duration", "load_duration", "prompt_eval_count"):
        value = getattr(result, key)
        if value:
            answer[key] = value
    return VectorsResponse(answer)


@router.post("/api/embeddings")
async def embeddings(request: Request) -> Response:
    """The legacy endpoint: ``{"embedding": [...]}`` for one ``prompt`` (``[]`` for an
    empty one, which only loads the model)."""
    body = await parse_body(request, EmbeddingsRequest)
    service = _embedding_service(request)
    try:
        result = await while_connected(
            request.receive, service.embed(service.prepare(body.to_embedding()))
        )
    except Exception as exc:  # noqa: BLE001
        return error_response(exc)
    vectors = result.float64_lists()
    return JSONResponse({"embedding": vectors[0] if vectors else []})


def _tokenizer(request: Request) -> TokenizerService:
    return TokenizerService(_service(request))


@router.post("/api/tokenize")
async def tokenize(request: Request) -> Response:
    """``{tokens[, pieces]}`` of ``content`` in the model's vocabulary (pollama's, as asked
    in ollama#3582); the model loads if needed, as for generate."""
    body = await parse_body(request, TokenizeRequest)
    try:
        result = await while_connected(
            request.receive,
            _tokenizer(request).tokenize(
                body.model,
                body.content,
                add_special=body.add_special,
                with_pieces=body.with_pieces,
                keep_alive=body.keep_alive,
                options=body.options,
            ),
        )
    except Exception as exc:  # noqa: BLE001 - one mapping, in server.errors
        return error_response(exc)
    answer: dict[str, Any] = {"tokens": result.tokens}
    if result.pieces is not None:
        answer["pieces"] = result.pieces
    return JSONResponse(answer)


@router.post("/api/detokenize")
async def detokenize(request: Request) -> Response:
    """``{content}`` of ``tokens``; a token that is not an integer or not in the vocabulary
    is a 400 naming it."""
    body = await parse_body(request, DetokenizeRequest)
    try:
        content = await while_connected(
            request.receive,
            _tokenizer(request).detokenize(
                body.model, body.tokens, keep_alive=body.keep_alive, options=body.options
            ),
        )
    except Exception as exc:  # noqa: BLE001
        return error_response(exc)
    return JSONResponse({"content": content})
