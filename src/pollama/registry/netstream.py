"""The byte pipe under the registry client: asyncio's own transports, read in large pieces.

httpcore's default stream (anyio over asyncio) gives the HTTP parser at most 64 KiB per read
and pauses and resumes the transport around each one, and h11 and httpcore then copy every
byte of a body four times, so the Python work per byte, not the network or the disk, held a blob
download to a fifth of disk speed (``bench/pull_bench.py``). Here the transport reads on its
own (up to 256 KiB per ``recv``) into a queue; a read returns everything queued, up to
:data:`READ_SIZE`, so the work per byte falls as the transfer gets faster; and a large body
is received past the parser straight into the downloader's buffers (:func:`raw_body`,
:meth:`RawBody.fill`: ``recv_into``, no bytes object per read, no copy). TLS is asyncio's
(``loop.start_tls``: the context's certificate and host name checks; records are decrypted
into the same buffers).

What must stay true:

* **Only a pipe.** Which address to connect to is decided and checked by the caller
  (:mod:`pollama.registry.hosts`); this module connects to exactly the one it is given.
* **httpcore's errors.** Failures surface as ``httpcore.ConnectError``/``ConnectTimeout``,
  ``ReadError``/``ReadTimeout`` and ``WriteError``/``WriteTimeout``, as from httpcore's own
  streams, so httpx (and the transfer's retry rules) see what they saw before.
* **A body bypasses the parser only when the parser holds none of it.** From a request's
  first write until the head of its final response, a read stops at the end of a response
  head (and the transport stops reading there, so a body nobody reads yet, such as the
  next part's asked for ahead, waits in the socket, not in Python's memory), and
  :func:`raw_body` hands out a body only when the last read ended exactly there;
  anything else (a proxy's connection, HTTP/2, chunked or encoded bodies) is read through
  httpx as before. A connection whose body was read directly is closed, never reused.
* **Bounded memory.** The transport stops reading while more than :data:`HIGH_WATER` bytes
  wait in the queue, or while a body's buffer is full, and writes wait while the transport's
  send buffer is full.
* **A buffer is lent for one read at a time.** :meth:`_Pipe.get_buffer` lends a filling
  body's free space only between a :meth:`RawBody.fill`'s start and its return; at any other
  time a read lands in the scratch buffer and is queued (and the next fill copies it out).
* A read may return more than httpcore's ``max_bytes`` (h11 takes any amount), never more
  than :data:`READ_SIZE` but for one piece the transport received whole; ``b""`` only at the
  end of the stream.
* **A handed-over socket is read by one reader.** :meth:`RawBody.hand_over` stops the
  transport's reading for good (nothing resumes it), so the caller that takes the socket's
  descriptor is its only reader; the descriptor stays open until the response is closed,
  which the caller does only once it stopped using it.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
import typing
from collections import deque
from collections.abc import Iterator

import httpcore
import httpx

__all__ = ["READ_SIZE", "HandedOver", "RawBody", "connect", "raw_body"]

READ_SIZE = 1 << 20
"""The most one read returns."""
HIGH_WATER = 4 << 20
"""Queued bytes at which the transport stops reading until the queue drains."""
_SCRATCH = 256 << 10
"""The buffer a read goes into when no body is filling (its bytes are then queued)."""
_MAX_HEAD = 64 << 10
"""Longer than any response head h11 accepts."""
_ADDRESSES = {"client_addr": "sockname", "server_addr": "peername"}


@contextlib.contextmanager
def _mapped(timeout_error: type[Exception], error: type[Exception]) -> Iterator[None]:
    try:
        yield
    except TimeoutError as exc:  # before OSError, of which it is a subclass
        raise timeout_error(str(exc) or "timed out") from exc
    except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
        raise error(str(exc) or type(exc).__name__) from exc


class _Pipe(asyncio.BufferedProtocol):
    """What the transport received, queued for :meth:`_Stream.read`; write flow control.

    The transport receives into the buffer :meth:`get_buffer` lends it: a :class:`RawBody`'s
    while one is filling (the body's bytes land where they will be written from, with no
    copy and no new object per read), else a scratch buffer whose bytes are queued."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.queued = 0
        self.eof = False
        self.error: Exception | None = None
        self.transport: asyncio.Transport | None = None
        self.paused_reading = False
        self.handed_over = False  # a reader took the socket: the transport never reads again
        self.sink: RawBody | None = None
        self._lent: RawBody | None = None
        self._scratch = memoryview(bytearray(_SCRATCH))
        self._readable: asyncio.Event = asyncio.Event()
        self._writable: asyncio.Event = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def get_buffer(self, _sizehint: int) -> memoryview:
        sink = self.sink
        if sink is not None and sink.room:
            self._lent = sink
            return sink.free
        self._lent = None
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._lent is not None:
            if not self._lent.received(nbytes):  # full: the socket keeps the rest for now
                self.pause()
            return
        self.data_received(bytes(self._scratch[:nbytes]))

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.queued += len(data)
        self._readable.set()
        if self.queued > HIGH_WATER:
            self.pause()

    def pause(self) -> None:
        if self.transport is not None and not self.paused_reading:
            self.transport.pause_reading()
            self.paused_reading = True

    def resume(self) -> None:
        """Read again, unless the queue is still too full (:meth:`take_pieces` resumes) or
        the socket was handed over."""
        if self.handed_over:
            return
        if self.paused_reading and self.queued <= HIGH_WATER // 2 and self.transport is not None:
            self.paused_reading = False
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._readable.set()
        if self.sink is not None:
            self.sink.wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._readable.set()
        self._writable.set()
        if self.sink is not None:
            self.sink.wake()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def take_pieces(self, limit: int) -> list[bytes]:
        """Queued pieces, as received, up to ``limit`` bytes (at least one byte if any)."""
        pieces: list[bytes] = []
        size = 0
        while self.chunks and size < limit:
            piece = self.chunks.popleft()
            if size + len(piece) > limit:
                self.chunks.appendleft(piece[limit - size :])
                piece = piece[: limit - size]
            pieces.append(piece)
            size += len(piece)
        self.queued -= size
        self.resume()
        return pieces

    def take(self, limit: int) -> bytes:
        """What is queued, joined, up to ``limit`` bytes (``b""``: the end of the stream)."""
        pieces = self.take_pieces(limit)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def unread(self, data: bytes) -> None:
        self.chunks.appendleft(data)
        self.queued += len(data)

    async def wait_readable(self) -> None:
        while not self.chunks and not self.eof:
            self._readable.clear()
            await self._readable.wait()

    async def wait_writable(self) -> None:
        await self._writable.wait()


def _readable(fd: int) -> bool:
    """Whether a read from ``fd`` would return at once (bytes, or the end)."""
    if not hasattr(select, "poll"):  # Windows: select takes any socket there
        return bool(select.select([fd], [], [], 0)[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, pipe: _Pipe, *, tls: bool = False) -> None:
        self._transport = transport
        self._pipe = pipe
        self.tls = tls  # the socket carries TLS records, not the body's bytes
        # Response heads: from a request's first write until the head of its final response
        # has been read, a read ends at the end of a head at the latest (see raw_body).
        self._in_head = False
        self._status = b""  # the first bytes of the head being read
        self._tail = b""  # the last bytes read of it, for an empty line split across two reads
        self.at_body = False  # the last read ended exactly at the end of a final head
        self.detached = False  # a RawBody reads the connection now

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        pipe = self._pipe
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            if self.detached:
                raise OSError("the body of this response is being read directly")
            pipe.resume()
            async with asyncio.timeout(timeout):
                await pipe.wait_readable()
            if not pipe.chunks and pipe.error is not None:
                raise pipe.error
            data = pipe.take(READ_SIZE)
            self.at_body = False
            return self._end_at_head(data) if self._in_head else data

    def _end_at_head(self, data: bytes) -> bytes:
        """Cut ``data`` after the end of the response head it holds, if it ends there, and
        give the rest back to the queue."""
        if len(self._status) < 12:
            self._status += data[: 12 - len(self._status)]
        window = self._tail + data[:_MAX_HEAD]
        # A head ends at the first empty line, which h11 finds as LF (CR) LF.
        ends = [i + len(sep) for sep in (b"\n\n", b"\n\r\n") if (i := window.find(sep)) >= 0]
        if not ends:
            self._tail = window[-2:]
            if len(data) > _MAX_HEAD:  # no head is this long: the parser will refuse it
                self._in_head = False
            return data
        cut = min(ends) - len(self._tail)
        if cut < len(data):
            self._pipe.unread(data[cut:])
            data = data[:cut]
        informational = self._status[9:10] == b"1"  # "HTTP/1.1 1xx": another head follows
        self._status = self._tail = b""
        if not informational:
            self._in_head = False
            self.at_body = True
            self._pipe.pause()  # the body stays in the socket until someone reads it
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._in_head, self._status, self._tail, self.at_body = True, b"", b"", False
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            if self._transport.is_closing():
                raise self._pipe.error or ConnectionResetError("the connection is closed")
            self._transport.write(buffer)
            async with asyncio.timeout(timeout):
                await self._pipe.wait_writable()

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
                async with asyncio.timeout(timeout):
                    transport = await loop.start_tls(
                        self._transport,
                        self._pipe,
                        ssl_context,
                        server_hostname=server_hostname,
                    )
        except BaseException:
            self._transport.close()
            raise
        if transport is None:  # the transport closed during the handshake
            raise httpcore.ConnectError("the connection closed during the TLS handshake")
        tls = typing.cast(asyncio.Transport, transport)
        self._pipe.transport = tls  # flow control now goes through the TLS layer
        return _Stream(tls, self._pipe, tls=True)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":  # an idle connection the server closed, or sent junk on
            pipe = self._pipe
            if pipe.chunks or pipe.eof:
                return True
            # Paused at the end of a head with no body read after it (HEAD, 204, an empty
            # body): the transport has not looked since, so look at the socket itself.
            sock = self._transport.get_extra_info("socket")
            return pipe.paused_reading and sock is not None and _readable(sock.fileno())
        if info in _ADDRESSES:
            return self._transport.get_extra_info(_ADDRESSES[info])
        return self._transport.get_extra_info(info)


async def connect(
    ip: str,
    port: int,
    *,
    timeout: float | None = None,
    local_address: str | None = None,
    socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
) -> httpcore.AsyncNetworkStream:
    """A TCP connection to exactly ``ip``:``port`` (a literal address, no lookup)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in socket_options or ():
                sock.setsockopt(*option)
            if local_address is not None:
                sock.bind((local_address, 0))
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (ip, port))
            transport, pipe = await loop.create_connection(_Pipe, sock=sock)
    except BaseException:
        sock.close()
        raise
    return _Stream(transport, pipe)


class HandedOver(typing.NamedTuple):
    """A body's socket, given up by :meth:`RawBody.hand_over`."""

    fd: int
    """The socket's descriptor (non-blocking)."""
    received: list[bytes]
    """What the transport had received of the body already: it comes first."""
    left: int
    """The body's bytes still to read from the socket."""


class RawBody:
    """The rest of a response's body, received straight into the caller's buffers
    (:meth:`fill`): no HTTP parser copying each byte, no bytes object per read.

    Only for a plain ``Content-Length`` body whose head ended exactly where the connection's
    last read ended (nothing of the body is in the parser's buffer); :func:`raw_body` checks
    that. Reading the rest of the body this way leaves the HTTP connection mid-response, so
    httpcore closes it when the response is closed: use this for large bodies only.
    """

    def __init__(self, stream: _Stream, length: int) -> None:
        self._pipe = stream._pipe
        self._stream = stream
        self._left = length
        self._view = memoryview(b"")
        self._filled = 0
        self._enough = 0
        self._ready = asyncio.Event()

    @property
    def room(self) -> int:
        """Free bytes in the buffer being filled."""
        return len(self._view) - self._filled

    @property
    def free(self) -> memoryview:
        return self._view[self._filled :]

    def received(self, count: int) -> bool:
        """The transport put ``count`` bytes into :attr:`free`; False once the buffer is full."""
        self._filled += count
        if self._filled >= self._enough:
            self._ready.set()
        return self._filled < len(self._view)

    def wake(self) -> None:
        self._ready.set()

    def lower(self, enough: int) -> None:
        """Let the :meth:`fill` in progress return once it holds ``enough`` bytes."""
        self._enough = min(self._enough, max(1, enough))
        if self._filled >= self._enough:
            self._ready.set()

    def hand_over(self) -> HandedOver | None:
        """The socket itself, for a reader that moves the rest of the body without Python
        touching its bytes (:mod:`pollama.registry.spliced`): the transport stops reading
        for good. The caller reads at most :attr:`HandedOver.left` bytes from the descriptor
        and never closes it (closing the response does). None where the socket's bytes are
        not the body's (TLS), or when the connection already ended or failed (read the body
        with :meth:`fill`)."""
        pipe = self._pipe
        sock = self._stream._transport.get_extra_info("socket")
        if self._stream.tls or sock is None or pipe.eof or pipe.error is not None:
            return None
        pipe.pause()
        pipe.handed_over = True
        received = pipe.take_pieces(self._left)
        self._left -= sum(len(piece) for piece in received)
        return HandedOver(sock.fileno(), received, self._left)

    async def fill(self, buffer: memoryview, enough: int, idle_timeout: float | None) -> int:
        """Receive into ``buffer`` until it holds ``enough`` bytes, is full, or the body
        ends; return how many it holds. 0 only at the end of the body, or when the
        connection closed early (the caller counts the bytes it got). ``TimeoutError`` when
        no byte arrives for ``idle_timeout`` seconds (a slow link that keeps sending is not
        idle: the wait only ends early when ``enough`` bytes are in)."""
        pipe = self._pipe
        buffer = buffer[: self._left]
        filled = 0
        while pipe.chunks and filled < len(buffer):  # what the queue took before: copied
            piece = pipe.take(len(buffer) - filled)
            buffer[filled : filled + len(piece)] = piece
            filled += len(piece)
        self._view, self._filled, self._enough = buffer, filled, min(max(1, enough), len(buffer))
        try:
            if self._filled < self._enough and not pipe.eof:
                await self._wait(idle_timeout)
        finally:
            filled, self._view, self._filled = self._filled, memoryview(b""), 0
            pipe.sink = None
        self._left -= filled
        if not filled and pipe.error is not None:
            raise httpx.ReadError(str(pipe.error) or type(pipe.error).__name__)
        return filled

    async def _wait(self, idle_timeout: float | None) -> None:
        pipe = self._pipe
        pipe.sink = self
        pipe.resume()
        seen = self._filled
        while self._filled < self._enough and not pipe.eof:
            self._ready.clear()
            try:
                async with asyncio.timeout(idle_timeout):
                    await self._ready.wait()
            except TimeoutError:
                if self._filled == seen:
                    if self._filled:  # return what arrived; the next fill finds the stall
                        return
                    raise
            seen = self._filled


def raw_body(response: httpx.Response) -> RawBody | None:
    """A :class:`RawBody` for the response's body, or None when it must be read through
    httpx (another kind of connection, a proxy, HTTP/2, a chunked or encoded body, a response
    without a body, or a parser that already holds part of it)."""
    stream = response.extensions.get("network_stream")
    length = response.headers.get("content-length", "")
    if (
        not isinstance(stream, _Stream)
        or not stream.at_body
        or stream.detached
        or response.request.method == "HEAD"
        or response.status_code in (204, 304)
        or response.http_version != "HTTP/1.1"
        or "transfer-encoding" in response.headers
        or response.headers.get("content-encoding", "identity").lower() not in ("", "identity")
        or not length.isdigit()
    ):
        return None
    stream.detached = True
    stream.at_body = False
    return RawBody(stream, int(length))
