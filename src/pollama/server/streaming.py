"""NDJSON responses from a progress iterator, with Ollama's error rules (spec §2.1).

An error raised before the first item gets the error's real status and a JSON body; an
error after streaming began is sent as a final ``{"error": ...}`` line under the 200 that
was already sent. ``stream: false`` runs the iterator to the end and answers only its last
item (pull/push/create), or the error with its status.

Work items are produced by a blocking iterator (disk, hashing, subprocesses), so every
``next()`` runs in a worker thread and never holds the event loop.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from pollama.server.errors import error_response, log_failure, message_for, status_for

NDJSON = "application/x-ndjson"
_END = object()


def _line(item: Any) -> bytes:
    if isinstance(item, BaseModel):
        item = item.model_dump(exclude_none=True, by_alias=True)
    return json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _next(iterator: Iterator[Any]) -> Any:
    return next(iterator, _END)


async def _in_threads(iterator: Iterator[Any]) -> AsyncIterator[Any]:
    """A blocking iterator as an async one: every ``next()`` runs in a worker thread."""
    try:
        while (item := await run_in_threadpool(_next, iterator)) is not _END:
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            await run_in_threadpool(close)


async def progress_response(iterator: Iterator[Any], *, stream: bool) -> Response:
    """Answer a progress iterator as a stream, or as its last item."""
    events = _in_threads(iterator)
    if stream:
        return await event_stream(events, _line)
    last: Any = None
    try:
        async for item in events:
            last = item
    except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
        return error_response(exc)
    body = last.model_dump(exclude_none=True) if isinstance(last, BaseModel) else last
    return JSONResponse(body)


async def event_stream(
    events: AsyncIterator[Any], render: Any, *, media_type: str = NDJSON
) -> Response:
    """Stream an async iterator through ``render(item) -> bytes``, Ollama's error rules.

    The first item is produced before the response starts, so an error in loading the model
    or building the prompt gets its real status code.
    """
    try:
        first = await anext(events)
    except StopAsyncIteration:
        first = _END
    except Exception as exc:  # noqa: BLE001
        return error_response(exc)

    async def body() -> AsyncIterator[bytes]:
        item = first
        try:
            while item is not _END:
                yield render(item)
                item = await anext(events, _END)
        except Exception as exc:  # noqa: BLE001
            log_failure(exc, status_for(exc))
            yield _line({"error": message_for(exc)})
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(body(), media_type=media_type)
