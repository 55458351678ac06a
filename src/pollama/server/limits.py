"""Limits that keep one client from holding the server: body sizes, upload slots, slow
clients, connections per client, and ``Retry-After`` on every 503.

* **Body size.** A request body may be at most ``POLLAMA_MAX_BODY_SIZE`` bytes: a declared
  ``Content-Length`` over it is refused before a byte is read, a chunked body as soon as it
  passes it (413). Blob uploads (:data:`UPLOAD_ROUTES`) are exempt; their route caps them
  by the free space in the models directory.
* **Upload slots.** At most ``POLLAMA_MAX_UPLOADS`` blob uploads run at once; one more gets
  503 with ``Retry-After`` at once, instead of queueing while holding a socket and disk.
* **Slow clients** (slow-loris). Every phase of a request has a deadline, so a connection
  that sends too slowly is closed instead of being held:

  - the request line and headers must arrive within ``POLLAMA_HEADER_TIMEOUT`` (5 s) of the
    connection opening, or of the first byte of a later request on a kept-alive connection
    (:func:`guarded_h11_protocol`; uvicorn itself only times out idle kept-alive
    connections); else a bare 408 and the connection is closed;
  - no gap between two body chunks may exceed ``POLLAMA_CLIENT_TIMEOUT`` (30 s), and the
    whole body must arrive within ``POLLAMA_BODY_TIMEOUT`` (60 s) of the route's first read
    (408). A blob upload is legitimately large, so its deadline grows with what it has
    received: ``POLLAMA_BODY_TIMEOUT`` plus one second per ``POLLAMA_MIN_UPLOAD_RATE``
    bytes (256 KiB/s), i.e. an upload must keep an average of that rate once the first
    ``POLLAMA_BODY_TIMEOUT`` is spent; ``POLLAMA_MIN_UPLOAD_RATE=0`` leaves uploads only
    the gap timeout (they need the ``manage`` scope and one of the few upload slots).

  An asyncio server has no worker per connection to exhaust, but each connection holds a
  socket, buffers and a slot of ``POLLAMA_MAX_CONNECTIONS`` until it is closed.
* **Connections per client.** At most ``POLLAMA_MAX_CONNECTIONS_PER_CLIENT`` (64) open
  connections per peer address (a global IPv6 address counts by its /64, which one host on
  the internet usually holds whole). One more is answered with a bare 503 and closed as it
  opens, before a byte is parsed, so one address cannot take every connection slot however
  fast it opens them.
  Behind a reverse proxy on the same machine every client has the proxy's address: raise
  the cap there, or set 0 (no cap) and let the proxy limit clients.
* **Retry-After.** Any 503 the app sends (the scheduler's full queue, a full upload slot
  set) gets ``Retry-After: 1`` if it has none, so clients back off instead of hammering.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from pollama.config import Settings
from pollama.errors import InvalidRequest
from pollama.server.access_log import current_record, route_template
from pollama.server.errors import ollama_body
from pollama.server.refusals import json_error

__all__ = ["UPLOAD_ROUTES", "LimitsMiddleware", "client_key", "guarded_h11_protocol"]

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
    """As :class:`_BodyTooLarge`, for a body that did not arrive in time (answered with
    408); the message names the deadline that ran out."""


@dataclass
class _BodyDeadlines:
    """The deadlines of one request body: ``gap`` between chunks, and a total one that
    starts at the route's first read (a route that reads late is not the client's fault).

    The total is ``total`` seconds, plus for uploads one second per ``upload_rate`` bytes
    received so far (0: uploads have no total deadline). None means no such deadline.
    """

    gap: float | None
    total: float | None
    upload_rate: int
    upload: bool
    started: float | None = None

    def next_wait(self, received: int, now: float) -> tuple[float | None, _BodyTimeout]:
        """How long the next chunk may take, and the error to raise if it does not come."""
        if self.started is None:
            self.started = now
        wait, error = self.gap, _BodyTimeout(
            f"the request body stopped arriving for {self.gap or 0:g}s (POLLAMA_CLIENT_TIMEOUT)"
        )
        end = self._end(received)
        if end is not None and (wait is None or end - now < wait):
            wait, error = end - now, self._total_error()
        return wait, error

    def _end(self, received: int) -> float | None:
        if self.total is None or self.started is None:
            return None
        if not self.upload:
            return self.started + self.total
        if self.upload_rate <= 0:
            return None
        return self.started + self.total + received / self.upload_rate

    def _total_error(self) -> _BodyTimeout:
        if self.upload:
            return _BodyTimeout(
                f"the upload is slower than {self.upload_rate} bytes/s after its first "
                f"{self.total or 0:g}s (POLLAMA_MIN_UPLOAD_RATE, POLLAMA_BODY_TIMEOUT)"
            )
        return _BodyTimeout(
            f"the request body did not arrive within {self.total or 0:g}s (POLLAMA_BODY_TIMEOUT)"
        )


def _with_retry_after(start: Message) -> Message:
    """A response start, with ``Retry-After`` added to a 503 that has none."""
    headers = list(start.get("headers", ()))
    if start["status"] != 503 or any(k.lower() == b"retry-after" for k, _ in headers):
        return start
    return {**start, "headers": [*headers, (b"retry-after", str(RETRY_AFTER_SECONDS).encode())]}


def _positive(seconds: float) -> float | None:
    return seconds if seconds > 0 else None


@dataclass
class BodyLimits:
    """The request-body limits :class:`LimitsMiddleware` reads at each request: one object,
    updated in place when the configuration is reloaded (``server/reload.py``), so the next
    request sees the new values and requests under way keep theirs."""

    max_body: int
    max_uploads: int
    client_timeout: float | None
    body_timeout: float | None = None
    min_upload_rate: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        """0 or less means no timeout; at least one upload at a time."""
        return cls(
            max_body=settings.max_body_size,
            max_uploads=max(settings.max_uploads, 1),
            client_timeout=_positive(settings.client_timeout),
            body_timeout=_positive(settings.body_timeout),
            min_upload_rate=max(settings.min_upload_rate, 0),
        )

    def update(self, settings: Settings) -> None:
        """Take the reloaded settings' values."""
        self.__dict__.update(dataclasses.asdict(BodyLimits.from_settings(settings)))


class LimitsMiddleware:
    def __init__(self, app: ASGIApp, *, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits
        self.uploads = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = current_record()
        template = record.route if record is not None else route_template(scope)
        upload = (scope["method"], template) in UPLOAD_ROUTES
        declared = Headers(scope=scope).get("content-length")

        max_body = self.limits.max_body
        if not upload and declared and declared.isdigit() and int(declared) > max_body:
            await self._refuse(scope, receive, send, "body_size", 413, "request_too_large",
                               self._too_large_message())  # fmt: skip
            return
        if upload:
            if self.uploads >= self.limits.max_uploads:
                await self._refuse(scope, receive, send, "uploads", 503, "overloaded_error", (
                    f"too many uploads at once (at most {self.limits.max_uploads}, "
                    "POLLAMA_MAX_UPLOADS); try again shortly"
                ))  # fmt: skip
                return
            self.uploads += 1
        try:
            await self._guarded(scope, receive, send, upload)
        finally:
            if upload:
                self.uploads -= 1

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, upload: bool) -> None:
        """Run the app with a ``receive`` that enforces the size cap and the deadlines, and
        a ``send`` that adds ``Retry-After`` to 503s and replaces a route's own answer to a
        tripped limit with the limit's."""
        received = 0
        body_done = False
        started = False
        tripped: _BodyTooLarge | _BodyTimeout | None = None  # a limit hit while reading
        limit = None if upload else self.limits.max_body
        deadlines = _BodyDeadlines(self.limits.client_timeout, self.limits.body_timeout,
                                   self.limits.min_upload_rate, upload)  # fmt: skip
        loop = asyncio.get_running_loop()

        async def guarded_receive() -> Message:
            nonlocal received, body_done, tripped
            if body_done:
                return await receive()
            wait, late = deadlines.next_wait(received, loop.time())
            try:
                if wait is not None and wait <= 0:
                    raise TimeoutError
                async with asyncio.timeout(wait):
                    message = await receive()
            except TimeoutError:
                tripped = late
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
                message = _with_retry_after(message)
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except (_BodyTooLarge, _BodyTimeout) as exc:
            if started:
                raise
            await self._refuse_for(exc, scope, receive, send)

    async def _refuse_for(
        self, exc: _BodyTooLarge | _BodyTimeout, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if isinstance(exc, _BodyTooLarge):
            await self._refuse(scope, receive, send, "body_size", 413, "request_too_large",
                               self._too_large_message())  # fmt: skip
        else:
            await self._refuse(scope, receive, send, "body_timeout", 408, "timeout_error",
                               exc.message)  # fmt: skip

    def _too_large_message(self) -> str:
        return (
            f"request body is larger than {self.limits.max_body} bytes "
            "(POLLAMA_MAX_BODY_SIZE); "
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


# -- the protocol layer: before any request is parsed ------------------------------------------


def client_key(peer: Any) -> str | None:
    """The address a connection is counted under, or None for a peer without one (a unix
    socket), which is not counted.

    It is the peer's IP address, except for a global IPv6 address: its /64, since one host
    on the internet usually holds a whole /64 and could take a new address per connection.
    Link-local and unique-local IPv6 addresses are a LAN's, where many hosts share a /64,
    so they count one by one.
    """
    if not isinstance(peer, tuple | list) or not peer:
        return None
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if ip.is_global:
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _busy_response(cap: int) -> bytes:
    """The whole answer to a connection over the cap: refused before its request is parsed,
    so in Ollama's shape whatever the path."""
    body = json.dumps(ollama_body(
        f"too many connections from your address (at most {cap}, "
        "POLLAMA_MAX_CONNECTIONS_PER_CLIENT); close some and try again"
    )).encode()  # fmt: skip
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nretry-after: %d\r\nconnection: close\r\n"
        b"content-type: application/json; charset=utf-8\r\ncontent-length: %d\r\n\r\n%s"
    ) % (RETRY_AFTER_SECONDS, len(body), body)


class _ConnectionCounts:
    """The open connections of one server, per client address: a connection is counted
    from ``connection_made`` to ``connection_lost`` (asyncio calls each exactly once), and
    one over the cap is refused without being counted. A cap of 0 counts nothing."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.counts: Counter[str] = Counter()
        self.busy = _busy_response(cap)

    def admit(self, key: str | None) -> tuple[bool, str | None]:
        """Whether a connection from ``key`` may go on, and the key it is counted under."""
        if key is None or self.cap <= 0:
            return True, None
        if self.counts[key] >= self.cap:
            return False, None
        self.counts[key] += 1
        return True, key

    def release(self, key: str) -> None:
        self.counts[key] -= 1
        if self.counts[key] <= 0:
            del self.counts[key]


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and a cap on the
    connections one client address holds open; :func:`guarded_h11_protocol` makes one
    subclass per server, with its ``header_timeout`` and its shared ``per_client`` counts."""

    header_timeout: ClassVar[float] = 0.0
    per_client: ClassVar[_ConnectionCounts] = _ConnectionCounts(0)
    _header_timer: asyncio.TimerHandle | None = None
    _counted_as: str | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        key = client_key(transport.get_extra_info("peername"))
        admitted, self._counted_as = self.per_client.admit(key)
        if not admitted:
            self.logger.debug("refusing a connection over the cap for %s", key)
            transport.write(self.per_client.busy)
            transport.close()
            return
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
        key, self._counted_as = self._counted_as, None
        if key is not None:
            self.per_client.release(key)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._cancel_header_timer()
        super().on_response_complete()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        if self.header_timeout > 0:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)

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


def guarded_h11_protocol(header_timeout: float, max_per_client: int = 0) -> type[H11Protocol]:
    """uvicorn's h11 protocol, plus a deadline for each request head and a cap on the
    connections one client address holds open (both explained in the module docstring).

    The header timer runs while h11 waits for a request (``their_state`` IDLE) and data is
    expected: from the connection's start, and from the first byte of each later request
    (uvicorn's keep-alive timer covers the idle gap before it). When it fires with the head
    still incomplete, the connection gets a bare 408 and is closed.

    The per-address counts are shared by every connection of the server that uses the
    returned class (:class:`_ConnectionCounts`).
    """
    timeout, counts = header_timeout, _ConnectionCounts(max_per_client)

    class GuardedH11Protocol(_GuardedH11Protocol):
        header_timeout = timeout
        per_client = counts

    return GuardedH11Protocol
