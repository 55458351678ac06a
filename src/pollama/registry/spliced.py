"""A download's bytes moved from the socket to the file inside the kernel (Linux ``splice``).

On a fast link a pull is bound by the CPU, and most of it went to moving bytes: the kernel
copied each one into a receive buffer, Python's event loop woke for every piece, and the
kernel copied it again into the page cache. Here a thread of its own splices the socket
into a pipe and the pipe into the file (``os.splice``): the bytes reach the page cache in
one copy, Python never sees them, and the event loop only hears of progress. Measured with
``bench/pull_bench.py`` against a loopback registry, a pull went from 0.7 of a disk copy to
about one. The hash then reads the file back (:meth:`PartialFile.claim`), which costs less
than the copy it saves.

What must stay true:

* **The same guarantees as a write.** Bytes count as received (``report``) only once they
  are in the file, and each range is handed to the file's writeback as a write's is.
* **At most ``count`` bytes are read from the socket**: nothing past the body's end.
* **Bounded and stoppable.** One thread per body, at most :data:`MAX_MOVERS` in the
  process (:func:`take_mover`: a body that finds none free is not moved here), one pipe of
  at most :data:`PIPE_SIZE` bytes each, no buffer in Python. A move waits for the socket in
  ``poll`` together with a :class:`Wakeup`, so :meth:`Wakeup.set` stops it at once; and it
  raises ``TimeoutError`` when nothing arrives for ``idle_timeout`` seconds.
  :func:`move_body` returns only once its thread has ended, so the socket and the file
  outlive it.
* **Errors keep their side.** A failure of the socket is an ``httpx.ReadError`` (a transfer
  error the retry rules know); a failure of the file (``ENOSPC``) stays an ``OSError``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from pollama.registry.netstream import HandedOver
from pollama.registry.partial import PartialFile

__all__ = [
    "AVAILABLE",
    "MAX_MOVERS",
    "PIPE_SIZE",
    "Wakeup",
    "give_back_mover",
    "move",
    "move_body",
    "take_mover",
]

AVAILABLE = hasattr(os, "splice") and hasattr(select, "poll")
"""Whether this platform can splice (Linux, Python 3.10+)."""
PIPE_SIZE = 1 << 20
"""The pipe between the socket and the file: bytes moved per round (the kernel may give less:
``/proc/sys/fs/pipe-max-size``, a user's pipe quota)."""
MAX_MOVERS = 64
"""Bodies moved at once in the process (four downloads of 16 parts): a thread each. A part
that finds them all taken is read on the event loop instead, so a move never waits for a
thread (nor does a pull that leaves)."""
_movers_free = threading.BoundedSemaphore(MAX_MOVERS)
REPORT_SIZE = 8 << 20
REPORT_EVERY = 0.02
"""Bytes in the file are reported once this many have come in, or this many seconds after
the last report, whichever is first (and whenever the socket has nothing more yet): each
report wakes the event loop, which on a fast link would otherwise wake a hundred times per
100 MB and hold up the threads that move and hash the bytes."""
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class Wakeup:
    """A descriptor that ``poll`` sees readable once :meth:`set` was called (any thread)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self.is_set = False

    def fileno(self) -> int:
        return self._read

    def set(self) -> None:
        if not self.is_set:
            self.is_set = True
            with contextlib.suppress(OSError):  # already written (full) or closed: still set
                os.write(self._write, b"!")

    def close(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def _pipe() -> Iterator[tuple[int, int, int]]:
    """(read end, write end, capacity) of a pipe as large as the kernel allows up to
    :data:`PIPE_SIZE`."""
    read, write = os.pipe()
    try:
        with contextlib.suppress(OSError):  # EPERM past the limits: keep the default size
            fcntl.fcntl(write, _F_SETPIPE_SZ, PIPE_SIZE)
        yield read, write, min(PIPE_SIZE, fcntl.fcntl(write, _F_GETPIPE_SZ))
    finally:
        os.close(read)
        os.close(write)


def _wait_readable(sock: int, wakeup: Wakeup, idle_timeout: float | None) -> bool:
    """Wait until the socket has something (True) or the wakeup is set (False);
    ``TimeoutError`` after ``idle_timeout`` seconds of neither."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wakeup.fileno(), select.POLLIN)
    ms = None if idle_timeout is None else max(1, int(idle_timeout * 1000))
    events = poller.poll(ms)
    if wakeup.is_set:
        return False
    if not events:
        raise TimeoutError(f"no data for {idle_timeout} s")
    return True


def move(
    sock: int,
    file: PartialFile,
    offset: int,
    count: int,
    *,
    wakeup: Wakeup,
    idle_timeout: float | None,
    report: Callable[[int], None],
) -> int:
    """Move up to ``count`` bytes from the socket into the file at ``offset`` (run in a
    thread of its own); ``report(n)`` once ``n`` more bytes are in the file (batched:
    :data:`REPORT_SIZE`, :data:`REPORT_EVERY`; all of them by the time this returns or
    raises). Returns the
    bytes moved: fewer than ``count`` when the connection ended or :meth:`Wakeup.set` was
    called."""
    moved = unreported = 0
    reported_at = time.monotonic()
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    try:
        with _pipe() as (pipe_read, pipe_write, capacity):
            while moved < count and not wakeup.is_set:
                try:
                    got = os.splice(sock, pipe_write, min(capacity, count - moved), flags=flags)
                except BlockingIOError:
                    if unreported:  # the link is slower than the disk: report what is in
                        report(unreported)
                        unreported, reported_at = 0, time.monotonic()
                    if not _wait_readable(sock, wakeup, idle_timeout):
                        break
                    continue
                except OSError as exc:
                    raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
                if not got:  # the connection ended
                    break
                file.call(file.splice_in, pipe_read, got, offset + moved)
                moved += got
                unreported += got
                if unreported >= REPORT_SIZE or time.monotonic() - reported_at >= REPORT_EVERY:
                    report(unreported)
                    unreported, reported_at = 0, time.monotonic()
    finally:
        if unreported:
            report(unreported)
    return moved


def take_mover() -> bool:
    """Take one of the :data:`MAX_MOVERS` movers; False when none is free."""
    return _movers_free.acquire(blocking=False)


def give_back_mover() -> None:
    """Give back a mover that :func:`take_mover` gave (once its move has ended)."""
    _movers_free.release()


async def move_body(
    file: PartialFile,
    handed: HandedOver,
    start: int,
    count: int,
    *,
    idle_timeout: float | None,
    advance: Callable[[int], None],
) -> None:
    """Bytes ``[start, start + count)`` of the file from a handed-over body, in a mover
    thread: what the connection had received first, then the socket's (:func:`move`), no
    more than the body holds (a shorter body is a short read for the caller to find).
    ``advance(n)`` runs on the event loop once ``n`` more bytes are in the file, in batches
    (:class:`_Progress`). Returns once the thread has stopped, whatever happened (a
    cancelled caller stops it first), so the socket and the file outlive it. Raises
    :func:`move`'s errors."""
    count = min(count, sum(len(piece) for piece in handed.received) + handed.left)
    pieces = _cut(handed.received, count)
    loop = asyncio.get_running_loop()
    progress = _Progress(loop, advance)
    wakeup = Wakeup()

    def work() -> None:
        received = file.call(file.write, pieces, start) if pieces else 0
        if received:
            progress.report(received)
        if received < count:
            move(
                handed.fd,
                file,
                start + received,
                count - received,
                wakeup=wakeup,
                idle_timeout=idle_timeout,
                report=progress.report,
            )

    moving = loop.run_in_executor(_movers(), work)
    try:
        await asyncio.shield(moving)
    finally:
        if not moving.done():
            wakeup.set()
            await _until_done(moving)
        wakeup.close()
        progress.take()


class _Progress:
    """Bytes a mover reports (any thread), handed to ``advance`` on the event loop: a report
    made while the one before it still waits for the loop joins it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, advance: Callable[[int], None]) -> None:
        self._loop = loop
        self._advance = advance
        self._lock = threading.Lock()
        self._unreported = 0

    def report(self, n: int) -> None:
        with self._lock:
            self._unreported += n
            if self._unreported > n:  # a report is on its way and will take these too
                return
        with contextlib.suppress(RuntimeError):  # the loop closed: the end takes them
            self._loop.call_soon_threadsafe(self.take)

    def take(self) -> None:
        """On the event loop: advance by what was reported since the last take."""
        with self._lock:
            n, self._unreported = self._unreported, 0
        if n:
            self._advance(n)


def _cut(pieces: list[bytes], limit: int) -> list[bytes]:
    """The first ``limit`` bytes of ``pieces``, as pieces."""
    kept: list[bytes] = []
    for piece in pieces:
        if limit <= 0:
            break
        kept.append(piece[:limit])
        limit -= len(kept[-1])
    return kept


@functools.cache
def _movers() -> concurrent.futures.ThreadPoolExecutor:
    """The mover threads (at most :data:`MAX_MOVERS`, which :func:`take_mover` counts, so
    a move never waits for one), kept for the next download."""
    return concurrent.futures.ThreadPoolExecutor(MAX_MOVERS, thread_name_prefix="blob-splice")


async def _until_done(future: asyncio.Future[Any]) -> None:
    """Wait for ``future`` to end, whatever it ends with, even when this task is cancelled
    meanwhile (the cancellation is raised once it ended)."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError:
            cancelled = True
    if not future.cancelled():
        future.exception()  # retrieved: the caller has its own error to raise
    if cancelled:
        raise asyncio.CancelledError
