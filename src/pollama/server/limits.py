"""Limits that keep one client from holding the server: body sizes, upload slots, slow
clients, and ``Retry-After`` on every 503.

* **Body size.** A request body may be at most ``POLLAMA_MAX_BODY_SIZE`` bytes: a declared
  ``Content-Length`` over it is refused before a byte is read, a chunked body as soon as it
  passes it (413). Blob uploads (:data:`UPLOAD_ROUTES`) are exempt; their route caps them
  by the free space in the models directory.
* **Upload slots.** At most ``POLLAMA_MAX_UPLOADS`` blob uploads run at once; one more gets
  503 with ``Retry-After`` at once, instead of queueing while holding a socket and disk.
* **Slow clients** (slow-loris). The request line and headers must arrive within
  ``POLLAMA_CLIENT_TIMEOUT`` seconds of the connection opening (or of the first byte of a
  later request on a kept-alive connection): :func:`guarded_h11_protocol` closes the
  connection otherwise, since uvicorn itself only times out idle kept-alive connections.
  While a body is being received, no gap between two chunks may exceed the same timeout
  (408). An asyncio server has no worker per connection to exhaust, but each such
  connection holds a socket, buffers and a ``limit_concurrency`` slot until it is closed.
* **Retry-After.** Any 503 the app sends (the scheduler's full queue, a full upload slot
  set) gets ``Retry-After: 1`` if it has none, so clients back off instead of hammering.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from pollama.errors import InvalidRequest
from pollama.server.access_log import current_record, route_template
from pollama.server.refusals import json_error

__all__ = ["UPLOAD_ROUTES", "LimitsMiddleware", "guarded_h11_protocol"]

UPLOAD_ROUTES = frozenset({("POST", "/api/blobs/{digest}")})
"""(method, path template) of routes that stream a large body to disk."""

RETRY_AFTER_SECONDS = 1


class _BodyTooLarge(InvalidRequest):
    """Raised from ``receive``. The middleware answers 413 whether the exception reaches it
    or a route turns it into an error response of its own (that response is replaced). It
    is an ``InvalidRequest`` so that no route's error mapping can make it a 500."""

    def __init__(self) -> None:
        super().__init__("request body is too large (POLLAMA_MAX_BODY_SIZE)")


class _BodyTimeout(InvalidRequest):
    """As :class:`_BodyTooLarge`, for a body that stopped arriving (answered with 408)."""

    def __init__(self) -> None:
        super().__init__("request body stopped arriving (POLLAMA_CLIENT_TIMEOUT)")


class LimitsMiddleware:
    def __init__(
        self, app: ASGIApp, *, max_body: int, max_uploads: int, client_timeout: float
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.max_uploads = max(max_uploads, 1)
        self.client_timeout = client_timeout if client_timeout > 0 else None
        self.uploads = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = current_record()
        template = record.route if record is not None else route_template(scope)
        upload = (scope["method"], template) in UPLOAD_ROUTES
        declared = Headers(scope=scope).get("content-length")

        if not upload and declared and declared.isdigit() and int(declared) > self.max_body:
            await self._refuse(scope, receive, send, "body_size", 413, "request_too_large",
                               self._too_large_message())  # fmt: skip
            return
        if upload:
            if self.uploads >= self.max_uploads:
                await self._refuse(scope, receive, send, "uploads", 503, "overloaded_error", (
                    f"too many uploads at once (at most {self.max_uploads}, "
                    "POLLAMA_MAX_UPLOADS); try again shortly"
                ))  # fmt: skip
                return
            self.uploads += 1

        received = 0
        body_done = False
        started = False
        tripped: _BodyTooLarge | _BodyTimeout | None = None  # a limit hit while reading
        limit = None if upload else self.max_body
        timeout = self.client_timeout

        async def guarded_receive() -> Message:
            nonlocal received, body_done, tripped
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(timeout):
                    message = await receive()
            except TimeoutError:
                tripped = _BodyTimeout()
                raise tripped from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if limit is not None and received > limit:
                    tripped = _BodyTooLarge()
                    raise tripped
                if not message.get("more_body", False):
                    body_done = True
            else:
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if tripped is not None and not started:
                # The route turned the limit into an error of its own: answer ours instead.
                started = True
                await self._refuse_for(tripped, scope, receive, send)
            if tripped is not None:
                return
            if message["type"] == "http.response.start":
                started = True
                if message["status"] == 503:
                    headers = list(message.get("headers", ()))
                    if not any(k.lower() == b"retry-after" for k, _ in headers):
                        headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
                        message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except (_BodyTooLarge, _BodyTimeout) as exc:
            if started:
                raise
            await self._refuse_for(exc, scope, receive, send)
        finally:
            if upload:
                self.uploads -= 1

    async def _refuse_for(
        self, exc: _BodyTooLarge | _BodyTimeout, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if isinstance(exc, _BodyTooLarge):
            await self._refuse(scope, receive, send, "body_size", 413, "request_too_large",
                               self._too_large_message())  # fmt: skip
        else:
            await self._refuse(scope, receive, send, "body_timeout", 408, "timeout_error", (
                f"the request body stopped arriving for {self.client_timeout or 0:g}s "
                "(POLLAMA_CLIENT_TIMEOUT)"
            ))  # fmt: skip

    def _too_large_message(self) -> str:
        return (
            f"request body is larger than {self.max_body} bytes (POLLAMA_MAX_BODY_SIZE); "
            "upload model files as blobs (POST /api/blobs/<digest>) instead"
        )

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, reason: str, status: int, kind: str,
        message: str,
    ) -> None:
        record = current_record()
        if record is not None:
            record.refused = reason
        headers = [(b"connection", b"close")]
        if status == 503:
            headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
        await json_error(scope["path"], status, kind, message, headers)(scope, receive, send)


def guarded_h11_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, plus a deadline for receiving each request's headers.

    The timer runs while h11 waits for a request (``their_state`` IDLE) and data is
    expected: from the connection's start, and from the first byte of each later request
    (uvicorn's keep-alive timer covers the idle gap before it). When it fires with the
    headers still incomplete, the connection gets a bare 408 and is closed.
    """

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                if self._header_timer is None and self.timeout_keep_alive_task is None:
                    self._arm_header_timer()
            else:
                self._cancel_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._cancel_header_timer()
            super().on_response_complete()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            if header_timeout > 0:
                self._header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            self.logger.debug("closing a connection that did not send its headers in time")
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
            )
            self.transport.close()

    return GuardedH11Protocol
