"""The one stream driver: every streamed answer, in whichever protocol's framing.

A stream is an async iterator of items (inference events; pull, push or create progress)
and a :class:`Framing` that writes them as one protocol's bytes:

* :class:`Ndjson`: Ollama's ``application/x-ndjson``, one JSON object per line;
* :class:`Sse`: OpenAI's ``text/event-stream``, ``data: {...}`` frames then ``data: [DONE]``;
* :class:`NamedEvents`: named events, ``event: kind`` and ``data: {...}``: Anthropic's
  (:class:`AnthropicEvents`) and OpenAI's Responses API.

What must stay true, for every protocol (Ollama's rules,
docs/ollama-behaviour.md#errors-and-streaming):

* the first item is produced before the response starts, so an error in loading the model,
  building the prompt or reaching a registry still gets its real status, with the
  protocol's error body (:meth:`Framing.refusal`);
* an error after that is the stream's last frame (:meth:`Framing.error`, the body from
  ``server.errors``), under the 200 that was already sent;
* the items are closed when the response ends, however it ends: at their end, at an error,
  or when the client goes away. The response is then cancelled, maybe while a frame is
  being sent, so the close runs in a shielded cancel scope (:func:`aclose_shielded`):
  closing is what sends ``cancel`` to the worker, or stops a download nobody else follows
  (``tests/test_stream_close.py``).

A non-streamed answer to the same items is ``server.disconnect``'s (the inference event
collected) or :func:`last_response`'s (the last progress item).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from pollama.server.disconnect import aclose_shielded, while_connected
from pollama.server.errors import (
    anthropic_error_response,
    anthropic_stream_error,
    error_response,
    ollama_stream_error,
    openai_error_response,
    openai_stream_error,
)

__all__ = [
    "NDJSON",
    "AnthropicEvents",
    "Framing",
    "NamedEvents",
    "Ndjson",
    "Sse",
    "in_threads",
    "last_response",
    "stream_response",
]

NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"

T = TypeVar("T")


def json_bytes(data: Any) -> bytes:
    """Compact JSON, UTF-8 as is (as Go's encoder writes it, and as JSONResponse does)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


class Framing(Generic[T]):
    """How one protocol writes a stream of ``T``: what comes before the first item, each
    item's frames, an error's frame, what comes last, and the answer to an error raised
    before anything was sent."""

    media_type = NDJSON

    def refusal(self, exc: BaseException) -> Response:
        """The whole answer when the first item fails (no byte is sent yet)."""
        return error_response(exc)

    def opening(self, first: T | None) -> Iterable[bytes]:
        """Frames before the first item's (``first`` is None for a stream with no items)."""
        return ()

    def frames(self, item: T) -> Iterable[bytes]:
        raise NotImplementedError

    def error(self, exc: BaseException) -> bytes:
        """The last frame, for an error once the stream has started."""
        raise NotImplementedError

    def closing(self) -> Iterable[bytes]:
        """Frames after the last item, or after the error frame."""
        return ()


class Ndjson(Framing[T]):
    """Ollama's framing: ``render(item)`` is one line's object; an error is
    ``{"error": "..."}``."""

    def __init__(self, render: Callable[[T], dict[str, Any]]) -> None:
        self.render = render

    def frames(self, item: T) -> Iterable[bytes]:
        return (json_bytes(self.render(item)) + b"\n",)

    def error(self, exc: BaseException) -> bytes:
        return json_bytes(ollama_stream_error(exc)) + b"\n"


def sse(data: dict[str, Any] | str) -> bytes:
    """One ``data:`` frame (a string is sent as is: ``[DONE]``)."""
    text = data if isinstance(data, str) else json_bytes(data).decode()
    return f"data: {text}\n\n".encode()


class Sse(Framing[T]):
    """OpenAI's framing: ``render(item)`` is the chunks one item becomes (maybe none);
    an error is OpenAI's error object; ``data: [DONE]`` ends the stream, error or not."""

    media_type = EVENT_STREAM

    def __init__(self, render: Callable[[T], list[dict[str, Any]]]) -> None:
        self.render = render

    def refusal(self, exc: BaseException) -> Response:
        return openai_error_response(exc)

    def frames(self, item: T) -> Iterable[bytes]:
        return [sse(data) for data in self.render(item)]

    def error(self, exc: BaseException) -> bytes:
        return sse(openai_stream_error(exc))

    def closing(self) -> Iterable[bytes]:
        return (sse("[DONE]"),)


NamedEvent = tuple[str, dict[str, Any]]
"""An SSE event's name and its ``data`` (the name is also ``data``'s first field, ``type``)."""
AnthropicEvent = NamedEvent


def named_event(kind: str, data: dict[str, Any]) -> bytes:
    payload = json_bytes({"type": kind, **data}).decode()
    return f"event: {kind}\ndata: {payload}\n\n".encode()


class NamedEvents(Framing[T]):
    """Named SSE events (``event: kind`` then ``data: {...}``), the framing of Anthropic's
    Messages and of OpenAI's Responses: ``start(first)`` is the events before the first
    item's, ``render(item)`` the events one item becomes, ``failure(exc)`` the events that
    end a stream that failed, ``refuse(exc)`` the whole answer to an early error."""

    media_type = EVENT_STREAM

    def __init__(
        self,
        start: Callable[[T | None], list[NamedEvent]],
        render: Callable[[T], list[NamedEvent]],
        failure: Callable[[BaseException], list[NamedEvent]],
        refuse: Callable[[BaseException], Response],
    ) -> None:
        self.start = start
        self.render = render
        self.failure = failure
        self.refuse = refuse

    def refusal(self, exc: BaseException) -> Response:
        return self.refuse(exc)

    def opening(self, first: T | None) -> Iterable[bytes]:
        return [named_event(kind, data) for kind, data in self.start(first)]

    def frames(self, item: T) -> Iterable[bytes]:
        return [named_event(kind, data) for kind, data in self.render(item)]

    def error(self, exc: BaseException) -> bytes:
        return b"".join(named_event(kind, data) for kind, data in self.failure(exc))


class AnthropicEvents(NamedEvents[T]):
    """Anthropic's framing: ``start(first)`` is the ``message_start`` event, ``render(item)``
    the events one item becomes; an error is an ``error`` event."""

    def __init__(
        self,
        start: Callable[[T | None], AnthropicEvent],
        render: Callable[[T], list[AnthropicEvent]],
    ) -> None:
        super().__init__(
            lambda first: [start(first)],
            render,
            lambda exc: [("error", anthropic_stream_error(exc))],
            anthropic_error_response,
        )


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body when the response ends, however it ends (a client that left
    included), instead of leaving that to garbage collection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await aclose_shielded(self.body_iterator)


async def stream_response(items: AsyncIterator[T], framing: Framing[T]) -> Response:
    """Stream ``items`` in ``framing``; the first item is awaited before the response."""
    head: list[T] = []
    try:
        head.append(await anext(items))
    except StopAsyncIteration:
        pass
    except Exception as exc:  # noqa: BLE001 - the protocol's error answer, from server.errors
        await aclose_shielded(items)
        return framing.refusal(exc)
    body = _body(head, items, framing)
    return _ClosingStreamingResponse(body, media_type=framing.media_type)


async def _body(head: list[T], items: AsyncIterator[T], framing: Framing[T]
                ) -> AsyncIterator[bytes]:
    try:
        for chunk in framing.opening(head[0] if head else None):
            yield chunk
        for item in head:
            for chunk in framing.frames(item):
                yield chunk
        async for item in items:
            for chunk in framing.frames(item):
                yield chunk
    except Exception as exc:  # noqa: BLE001 - the status is already sent
        yield framing.error(exc)
    finally:
        await aclose_shielded(items)
    for chunk in framing.closing():
        yield chunk


async def last_response(
    items: AsyncIterator[T], render: Callable[[T], dict[str, Any]], *,
    receive: Receive | None = None,
) -> Response:
    """``stream: false`` for progress (pull, push, create): the last item, or the error
    with its status. With ``receive`` (the request's, its body read), a client that leaves
    first cancels the work, as when it streams (``server.disconnect``); without it, the
    work runs to its end (create: its steps run in threads, which a cancel abandons
    mid-step instead of stopping)."""
    try:
        work = _last(items)
        last = await (work if receive is None else while_connected(receive, work))
    except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
        return error_response(exc)
    finally:
        await aclose_shielded(items)
    return JSONResponse(render(last) if last is not None else {})


async def _last(items: AsyncIterator[T]) -> T | None:
    last: T | None = None
    async for item in items:
        last = item
    return last


_END = object()


def _next(iterator: Iterator[Any]) -> Any:
    return next(iterator, _END)


async def in_threads(iterator: Iterator[T]) -> AsyncIterator[T]:
    """A blocking iterator (disk, hashing, subprocesses) as an async one: every ``next()``
    and the final ``close()`` run in a worker thread, never holding the event loop."""
    try:
        while (item := await run_in_threadpool(_next, iterator)) is not _END:
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            await run_in_threadpool(close)
