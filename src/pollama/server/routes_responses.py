"""OpenAI's Responses API: ``POST /v1/responses``, and for stored responses ``GET`` and
``DELETE /v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items``.

Translation over the one inference service (``protocol.responses`` in,
``protocol.responses_output`` out), as the other protocols. Beyond Ollama, whose Responses
route keeps nothing: with ``store`` (true unless the request says false, as in OpenAI) the
answer is kept (``store.responses``) before its last byte is sent, and a later request's
``previous_response_id`` continues that conversation: the stored turns are rendered again
in front of the new input, so the prompt begins with the same tokens as the last one and
the worker's prompt cache reuses them (``usage.input_tokens_details.cached_tokens``).

A stored response belongs to the API key that made it (``server.security`` puts the key's
id in ``request.state``); for any other key, or none, it does not exist: 404, the same
answer as for an id never issued, so ids cannot be probed across keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pollama.errors import InvalidRequest, NotFound
from pollama.inference.service import InferenceService
from pollama.inference.types import InferenceEvent
from pollama.protocol.responses import ResponsesRequest
from pollama.protocol.responses_output import (
    ResponseBuilder,
    ResponseEvent,
    input_item_records,
    new_id,
)
from pollama.server.body import parse_body
from pollama.server.disconnect import aclose_shielded, collect_while_connected
from pollama.server.errors import failure, openai_error_response
from pollama.server.security import KEY_ID_STATE
from pollama.server.streaming import NamedEvents, stream_response
from pollama.store.responses import ResponseRecord, ResponseStore

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")

_MAX_LIST = 100


def _owner(request: Request) -> str:
    """The API key's id that the request came in with; "" on a server without keys."""
    return str(getattr(request.state, KEY_ID_STATE, ""))


def _store(request: Request) -> ResponseStore:
    store: ResponseStore = request.app.state.responses
    return store


async def _stored(request: Request, ident: str) -> ResponseRecord:
    record = await run_in_threadpool(_store(request).get, ident, _owner(request))
    if record is None:
        raise NotFound(f"Response with id '{ident}' not found.")
    return record


async def _with_opening(
    events: AsyncIterator[InferenceEvent],
    builder: ResponseBuilder,
    save: Callable[[], Awaitable[None]],
) -> AsyncIterator[list[ResponseEvent]]:
    """The stream's items: each native event's Responses events, the first preceded by
    ``response.created``/``in_progress`` (numbered first), the last saved before it goes."""
    opening = True
    try:
        async for event in events:
            out = builder.opening() if opening else []
            opening = False
            out += builder(event)
            if event.done:
                await save()
            yield out
    finally:
        await aclose_shielded(events)


def _failed(builder: ResponseBuilder) -> Callable[[BaseException], list[ResponseEvent]]:
    def events(exc: BaseException) -> list[ResponseEvent]:
        return builder.failed(*failure(exc))

    return events


def _keeps(request: Request, parsed: ResponsesRequest, turns: list[dict[str, Any]]) -> bool:
    """Whether this answer is stored: ``store`` asked, storing on, and a conversation no
    longer than one request could carry (``POLLAMA_MAX_BODY_SIZE``), so that continuing it
    never holds more than a stateless client could send. A longer one is answered with
    ``store: false`` (said in the answer itself) and a log line."""
    if not (parsed.store and _store(request).enabled):
        return False
    limit = request.app.state.settings.max_body_size
    size = len(json.dumps(turns, separators=(",", ":")))
    if size > limit:
        log.warning("response not stored: its conversation is %d bytes, over "
                    "POLLAMA_MAX_BODY_SIZE (%d); start a new conversation", size, limit)
        return False
    return True


@router.post("/responses")
async def create_response(request: Request) -> Response:
    service: InferenceService = request.app.state.inference
    store, owner = _store(request), _owner(request)
    try:
        parsed = await parse_body(request, ResponsesRequest)
        parsed.check()
        history: list[dict[str, Any]] = []
        if parsed.previous_response_id:
            history = (await _stored(request, parsed.previous_response_id)).conversation
        inference = parsed.to_inference(history)
        turns = [dict(m) for m in inference.messages[1 if parsed.instructions else 0:]]
        events = service.stream(await service.prepare(inference))
    except Exception as exc:  # noqa: BLE001 - one mapping in server.errors
        return openai_error_response(exc)
    builder = ResponseBuilder(parsed, new_id("resp"), store=_keeps(request, parsed, turns))

    async def save() -> None:
        if builder.store:
            record = ResponseRecord(
                id=builder.id, owner=owner, response=builder.response(),
                input_items=input_item_records(parsed.input_items()),
                conversation=[*turns, builder.conversation_turn()],
            )  # fmt: skip
            await run_in_threadpool(store.put, record)

    if parsed.stream:
        framing = NamedEvents(lambda _first: [], lambda out: out, _failed(builder),
                              openai_error_response)  # fmt: skip
        return await stream_response(_with_opening(events, builder, save), framing)
    try:
        builder(await collect_while_connected(request, events))
        await save()
    except Exception as exc:  # noqa: BLE001
        return openai_error_response(exc)
    return JSONResponse(builder.response())


@router.get("/responses/{ident}")
async def get_response(request: Request, ident: str) -> Response:
    try:
        return JSONResponse((await _stored(request, ident)).response)
    except Exception as exc:  # noqa: BLE001
        return openai_error_response(exc)


@router.delete("/responses/{ident}")
async def delete_response(request: Request, ident: str) -> Response:
    try:
        if not await run_in_threadpool(_store(request).delete, ident, _owner(request)):
            raise NotFound(f"Response with id '{ident}' not found.")
    except Exception as exc:  # noqa: BLE001
        return openai_error_response(exc)
    return JSONResponse({"id": ident, "object": "response", "deleted": True})


def _page(items: list[dict[str, Any]], limit: int, order: str, after: str | None
          ) -> dict[str, Any]:
    """OpenAI's cursor page over ``items`` (stored oldest first)."""
    if not 1 <= limit <= _MAX_LIST:
        raise InvalidRequest(f"limit must be between 1 and {_MAX_LIST}")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"invalid order {order!r}: use 'asc' or 'desc'")
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item.get("id") for item in ordered]
        if after not in ids:
            raise InvalidRequest(f"after: no input item with id {after!r} in this response")
        ordered = ordered[ids.index(after) + 1:]
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }


@router.get("/responses/{ident}/input_items")
async def list_input_items(request: Request, ident: str, limit: int = 20, order: str = "desc",
                           after: str | None = None) -> Response:
    try:
        record = await _stored(request, ident)
        return JSONResponse(_page(record.input_items, limit, order, after))
    except Exception as exc:  # noqa: BLE001
        return openai_error_response(exc)
