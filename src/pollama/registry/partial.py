"""The data file of one download (``<blob>-partial``): positioned writes from parallel parts,
the sha256 of the file in file order, and writeback that starts while the data arrives.

What must stay true:

* **The hash sees bytes [0, hashed) of the file, each once, in order.** A write that lands
  exactly at ``hashed`` is hashed from the memory it was written from, so a download in one
  part never reads anything back; every other byte is read back from the file
  (:meth:`PartialFile.hash_to`), and only once everything before it is complete.
* **The descriptor outlives every thread using it.** File work runs in threads, which a
  cancelled ``await`` does not stop; :meth:`PartialFile.close` waits for them, so a late
  write can never land in a reused descriptor.
* **Durability still comes from ``fdatasync``/``fsync`` alone.** Starting writeback early
  (``sync_file_range`` on Linux) only means that the final ``fsync`` waits for the last
  pieces instead of the whole blob.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import hashlib
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

_READ_BACK = 1 << 20
"""Bytes per read when hashing what is already in the file (into one reused buffer)."""
_MAX_WRITE = 1 << 20
"""Bytes per write call (see :func:`_pwritev_all`)."""
_MAX_IOV = 512
"""Buffers per ``pwritev`` (Linux takes up to 1024)."""
_HAS_PWRITEV = hasattr(os, "pwritev")
_HAS_PREADV = hasattr(os, "preadv")
_SYNC_FILE_RANGE_WRITE = 2

Buffer = bytes | bytearray | memoryview


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), which Python's ``os`` does not offer; or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def _start_writeback(fd: int, offset: int, size: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting for it."""
    fn = _sync_file_range()
    if fn is not None and size > 0:
        fn(fd, offset, size, _SYNC_FILE_RANGE_WRITE)  # advisory: a failure changes nothing


def _pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _groups(buffers: Sequence[Buffer]) -> Iterator[list[Buffer]]:
    """The buffers in groups of at most :data:`_MAX_WRITE` bytes (a larger one is cut)."""
    group: list[Buffer] = []
    size = 0
    for buffer in buffers:
        view = memoryview(buffer)
        while view:
            piece = view[: _MAX_WRITE - size]
            group.append(piece)
            size += len(piece)
            view = view[len(piece) :]
            if size == _MAX_WRITE or len(group) == _MAX_IOV:
                yield group
                group, size = [], 0
    if group:
        yield group


def _pwritev_all(fd: int, buffers: Sequence[Buffer], offset: int) -> int:
    """Write the buffers one after the other from ``offset``; return the bytes written.

    One call writes at most :data:`_MAX_WRITE` bytes: a longer write lets the page cache
    allocate folios of 2 MiB and more, which costs several times the copy itself on some
    machines (a VM that hands its free memory back to the host)."""
    total = 0
    for group in _groups(buffers):
        size = sum(len(b) for b in group)
        written = os.pwritev(fd, group, offset) if _HAS_PWRITEV else 0
        if written < size:  # a short write (or no pwritev): the rest piece by piece
            _pwrite_all(fd, b"".join(group)[written:], offset + written)
        offset += size
        total += size
    return total


class PartialFile:
    """An open ``-partial`` file and the running sha256 of its completed prefix."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._cond = threading.Condition()
        self._busy = 0
        self._hash_lock = threading.Lock()
        self._hasher = hashlib.sha256()
        self._hashed = 0
        self._read_back: memoryview | None = None

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def hashed(self) -> int:
        """How many bytes from the start of the file the hash has seen."""
        return self._hashed

    def digest(self) -> str:
        return f"sha256:{self._hasher.hexdigest()}"

    # -- threads ------------------------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run file work on the open descriptor (in whatever thread calls this)."""
        with self._cond:
            if self._fd < 0:
                raise OSError(errno.EBADF, "the download was closed")
            self._busy += 1
        try:
            return fn(*args)
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """:meth:`call` in a worker thread."""
        return await asyncio.to_thread(self.call, fn, *args)

    def close(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._busy == 0, timeout=60)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- file work (through call/run) ---------------------------------------------------------

    def write(self, buffers: Sequence[Buffer], offset: int) -> int:
        """Write at ``offset``, start its writeback, and hash it if it continues the hash."""
        size = _pwritev_all(self._fd, buffers, offset)
        _start_writeback(self._fd, offset, size)
        if self._hash_lock.acquire(blocking=False):  # busy reading back: it will come to these
            try:
                if self._hashed == offset:
                    for buffer in buffers:
                        self._hasher.update(buffer)
                    self._hashed += size
            finally:
                self._hash_lock.release()
        return size

    def hash_to(self, end: int) -> None:
        """Hash the file from ``hashed`` to ``end``, reading it back."""
        with self._hash_lock:
            if self._read_back is None:
                self._read_back = memoryview(bytearray(_READ_BACK))
            buffer = self._read_back
            while self._hashed < end:
                want = min(_READ_BACK, end - self._hashed)
                if _HAS_PREADV:
                    chunk = buffer[: os.preadv(self._fd, [buffer[:want]], self._hashed)]
                else:
                    chunk = memoryview(os.pread(self._fd, want, self._hashed))
                if not chunk:
                    raise OSError(errno.EIO, "partial download is shorter than its progress")
                self._hasher.update(chunk)
                self._hashed += len(chunk)

    def datasync(self) -> None:
        os.fdatasync(self._fd)

    def fsync(self) -> None:
        os.fsync(self._fd)
