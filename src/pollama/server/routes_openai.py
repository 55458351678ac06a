"""OpenAI-compatible routes (``/v1/*``) over the one inference service.

Only translation lives here: request models turn into an ``InferenceRequest``
(``pollama.protocol.openai``), inference events into OpenAI's chunks and objects, and errors
into OpenAI's error object (``server.errors.openai_error_response``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from pollama.errors import InvalidRequest, ModelNotFound, PollamaError
from pollama.inference.service import InferenceService, Prepared
from pollama.inference.types import InferenceEvent
from pollama.names import ModelName
from pollama.protocol.openai import ChatCompletionRequest, CompletionRequest, finish_reason
from pollama.server.errors import openai_error_response, validation_message
from pollama.store import Store

router = APIRouter(prefix="/v1")


def _sse(data: Any) -> bytes:
    text = (
        data
        if isinstance(data, str)
        else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    )
    return f"data: {text}\n\n".encode()


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    body = await request.body()
    if not body.strip():
        raise InvalidRequest("missing request body")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc)) from None


def _usage(event: InferenceEvent | None) -> dict[str, int]:
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


async def _prepare(request: Request, parsed: Any) -> tuple[InferenceService, Prepared]:
    service: InferenceService = request.app.state.inference
    return service, service.prepare(parsed.to_inference())


async def _run(
    request: Request,
    model_cls: type[BaseModel],
    chunk: Callable[[str, int, str, InferenceEvent | None, str | None], dict[str, Any]],
    whole: Callable[[str, int, str, str, InferenceEvent], dict[str, Any]],
    id_prefix: str,
) -> Response:
    try:
        parsed = await _parse(request, model_cls)
        service, prepared = await _prepare(request, parsed)
    except Exception as exc:  # noqa: BLE001 - one mapping in server.errors
        return openai_error_response(exc)
    ident = f"{id_prefix}-{random.randint(0, 998)}"
    created = int(time.time())
    events = service.stream(prepared)
    if not parsed.stream:
        parts: list[str] = []
        last: InferenceEvent | None = None
        try:
            async for event in events:
                parts.append(event.text)
                last = event
        except Exception as exc:  # noqa: BLE001
            return openai_error_response(exc)
        assert last is not None
        return JSONResponse(whole(ident, created, parsed.model, "".join(parts), last))

    include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
    try:
        first = await anext(events)
    except StopAsyncIteration:
        first = None
    except Exception as exc:  # noqa: BLE001
        return openai_error_response(exc)

    async def body() -> AsyncIterator[bytes]:
        event = first
        final: InferenceEvent | None = None
        try:
            while event is not None:
                if event.text:
                    yield _sse(chunk(ident, created, parsed.model, event, None))
                if event.done:
                    final = event
                event = await anext(events, None)
            yield _sse(
                chunk(
                    ident,
                    created,
                    parsed.model,
                    None,
                    finish_reason(final.done_reason if final else "stop"),
                )
            )
            if include_usage:
                yield _sse(
                    {
                        "id": ident,
                        "object": _object(id_prefix),
                        "created": created,
                        "model": parsed.model,
                        "system_fingerprint": "fp_ollama",
                        "choices": [],
                        "usage": _usage(final),
                    }
                )
        except PollamaError as exc:
            yield _sse(
                {
                    "error": {
                        "message": exc.message,
                        "type": "api_error",
                        "param": None,
                        "code": None,
                    }
                }
            )
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        yield _sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream")


def _object(prefix: str) -> str:
    return "chat.completion.chunk" if prefix == "chatcmpl" else "text_completion"


def _chat_chunk(
    ident: str, created: int, model: str, event: InferenceEvent | None, finish: str | None
) -> dict[str, Any]:
    if finish is not None:
        delta: dict[str, Any] = {}
    else:
        delta = {"role": "assistant", "content": event.text if event else ""}
    return {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _chat_whole(
    ident: str, created: int, model: str, text: str, last: InferenceEvent
) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(last.done_reason),
            }
        ],
        "usage": _usage(last),
    }


def _text_chunk(
    ident: str, created: int, model: str, event: InferenceEvent | None, finish: str | None
) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [{"text": event.text if event else "", "index": 0, "finish_reason": finish}],
    }


def _text_whole(
    ident: str, created: int, model: str, text: str, last: InferenceEvent
) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [{"text": text, "index": 0, "finish_reason": finish_reason(last.done_reason)}],
        "usage": _usage(last),
    }


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _run(request, ChatCompletionRequest, _chat_chunk, _chat_whole, "chatcmpl")


@router.post("/completions")
async def completions(request: Request) -> Response:
    return await _run(request, CompletionRequest, _text_chunk, _text_whole, "cmpl")


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
