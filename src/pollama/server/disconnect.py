"""Work for a non-streamed answer stops when its client goes away, as a stream's does.

A streamed response notices a client that left (Starlette listens for ``http.disconnect``
while it sends, and the stream driver, ``server.streaming``, then closes its items with
:func:`aclose_shielded`, which makes the runner send ``cancel`` to the worker). A
non-streamed one sends nothing until the work is done, and Starlette does not cancel a
handler whose client left: a generation asked for 2,000 tokens went on to the end, holding
its parallel slot, for a client that gave up after a second. :func:`while_connected` runs
the work in a task beside a listener on the ASGI ``receive``, and cancels the work when the
listener hears ``http.disconnect``.

What must stay true:

* the request body has been read before (the listener's ``receive`` calls would otherwise
  eat it): every caller parses its body first;
* cancelling the work closes what it was iterating (the inference events, a pull's
  progress), and that close is what frees the worker's sequence or stops the download; the
  callers close it again, shielded, in case the handler itself was cancelled first;
* the handler then raises :class:`~pollama.server.errors.ClientDisconnected` (status 499,
  nginx's "client closed request"): nobody reads the answer, but the access log and the
  request metrics say what happened.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from starlette.types import Receive

from pollama.inference.service import collect
from pollama.inference.types import InferenceEvent
from pollama.server.errors import ClientDisconnected

__all__ = ["aclose_shielded", "collect_while_connected", "while_connected"]

T = TypeVar("T")


async def _until_disconnect(receive: Receive) -> None:
    """Return when the client has gone (after the body, ``receive`` waits for that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def while_connected(receive: Receive, work: Awaitable[T]) -> T:
    """``await work``, unless the client disconnects first: then the work is cancelled
    (and awaited, so its clean-up has run) and :class:`ClientDisconnected` is raised.

    ``receive`` is the request's ASGI receive, called only after the body was read.
    """
    job = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait((job, listener), return_when=asyncio.FIRST_COMPLETED)
        if not job.done() and listener.exception() is not None:
            await asyncio.wait((job,))  # cannot listen (never seen): let the work finish
    finally:  # also when this handler is cancelled itself (the server shuts down)
        listener.cancel()
        if not job.done():
            job.cancel()
        await asyncio.gather(job, listener, return_exceptions=True)
    if job.cancelled():
        raise ClientDisconnected()
    return job.result()


async def aclose_shielded(items: AsyncIterator[Any]) -> None:
    """Close ``items``, even in a cancelled task (the response of a client that left, a
    handler cancelled at shutdown): unshielded, the close's first await would be cancelled
    in turn, and the worker or the download would only hear of it at garbage collection."""
    with anyio.CancelScope(shield=True):
        await items.aclose()  # type: ignore[attr-defined]


async def collect_while_connected(
    request: Request, events: AsyncIterator[InferenceEvent]
) -> InferenceEvent:
    """``collect(events)`` for a ``stream: false`` answer, cancelled (and ``events``
    closed, which cancels the generation in the worker) when the client goes away."""
    try:
        return await while_connected(request.receive, collect(events))
    finally:
        await aclose_shielded(events)
