"""The data file of one download (``<blob>-partial``): positioned writes from parallel parts,
the sha256 of the file in file order, and writeback that starts while the data arrives.

What must stay true:

* **The hash sees bytes [0, hashed) of the file, each once, in order.** It runs in a thread
  of its own fed in file order (``claimed``: how far it has been fed). A write that lands
  exactly at ``claimed`` gives it the memory it was written from (after the write returned,
  so the hash never sees bytes that are not in the file), so a download in one part never
  reads anything back; every other byte is read back from the file
  (:meth:`PartialFile.claim`), and only once everything before it is complete.
* **A receive buffer is reused only when nothing reads it.** :func:`take_buffer`'s buffers
  go back (:func:`recycle_buffer`) after their write, or after the hash if it took them; a
  buffer dropped on an error is simply freed.
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
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

_READ_BACK = 1 << 20
"""Bytes per read when hashing what is already in the file (into one reused buffer)."""
_MAX_WRITE = 1 << 20
"""Bytes per write call (see :func:`_pwritev_all`)."""
BUFFER_SIZE = 2 << 20
"""Bytes of one receive buffer (:func:`take_buffer`): 4 MiB measured no faster."""
_MAX_FREE = 6
"""Receive buffers the process keeps for the next download (12 MiB): new memory costs a
page fault and zeroing per 4 KiB, which on a VM that hands free memory back to its host
cost a quarter of the receiving thread's time when every download took fresh buffers."""
_MAX_HELD = 8 << 20
"""Written bytes that may wait for the hash thread before a write waits for it."""
_MAX_IOV = 512
"""Buffers per ``pwritev`` (Linux takes up to 1024)."""
_HAS_PWRITEV = hasattr(os, "pwritev")
_HAS_PREADV = hasattr(os, "preadv")
_SYNC_FILE_RANGE_WRITE = 2

Buffer = bytes | bytearray | memoryview


def _libc(name: str, *argtypes: type) -> Callable[[int, int, int, int], int] | None:
    """A libc function Python's ``os`` does not offer (Linux only), typed to return an
    ``int``; None elsewhere or when this libc lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range``; or None."""
    return _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's ``fallocate``, without ``posix_fallocate``'s fallback of writing zeros where
    the filesystem cannot allocate; or None."""
    return _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def preallocate(fd: int, size: int) -> None:
    """Give the file's first ``size`` bytes their disk blocks now, where the filesystem can:
    the space is reserved before the download (``ENOSPC`` now, not halfway), and each
    write then only fills blocks instead of reserving them page by page (on ext4 a third
    less CPU per byte written). Other failures (a filesystem without it) change nothing."""
    fn = _fallocate()
    if fn is None or size <= 0 or fn(fd, 0, 0, size) == 0:
        return
    error = ctypes.get_errno()
    if error in (errno.ENOSPC, errno.EDQUOT):
        raise OSError(error, os.strerror(error))


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


_free: list[memoryview] = []
_free_lock = threading.Lock()


def take_buffer() -> memoryview:
    """A receive buffer of :data:`BUFFER_SIZE` bytes: a used one if any is free."""
    with _free_lock:
        if _free:
            return _free.pop()
    return memoryview(bytearray(BUFFER_SIZE))


def recycle_buffer(buffer: memoryview | None) -> None:
    """Give back a buffer from :func:`take_buffer` that nothing reads or writes any more."""
    if buffer is not None:
        with _free_lock:
            if len(_free) < _MAX_FREE:
                _free.append(buffer)


class PartialFile:
    """An open ``-partial`` file and the running sha256 of its completed prefix.

    The sha256 runs in a thread of its own, fed in file order: the writes that continue the
    hashed prefix hand it their buffers (it hashes them while the next batch is written), and
    :meth:`claim` hands it ranges to read back. ``claimed`` is how far it has been fed, and
    :meth:`wait_hashed` waits until it got somewhere; so on two cores a download hashes,
    writes and receives at once instead of hashing and writing in turn.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._cond = threading.Condition()
        self._busy = 0
        self._hasher = hashlib.sha256()
        self._claimed = 0
        self._hashed = 0
        self._jobs: deque[_HashJob] = deque()
        self._held = 0  # bytes of written buffers waiting in _jobs
        self._hash_error: BaseException | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def claimed(self) -> int:
        """How many bytes from the start of the file the hash has been given (or will read)."""
        return self._claimed

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
        """Stop the hash thread (what it was given but has not hashed is dropped), wait for
        the file work in flight, close the descriptor."""
        with self._cond:
            self._stopping = True
            self._jobs.clear()
            self._held = 0
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)
        with self._cond:
            self._cond.wait_for(lambda: self._busy == 0, timeout=60)
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- file work (through call/run) ---------------------------------------------------------

    def write(self, buffers: Sequence[Buffer], offset: int, owned: memoryview | None = None) -> int:
        """Write at ``offset`` and start its writeback; if it continues what the hash was
        given, give it these buffers too (waiting while :data:`_MAX_HELD` bytes wait).
        ``owned`` (a buffer from :func:`take_buffer` that ``buffers`` are views of) goes
        back for reuse when neither needs it any more."""
        size = _pwritev_all(self._fd, buffers, offset)
        _start_writeback(self._fd, offset, size)
        with self._cond:
            if self._claimed == offset:
                self._cond.wait_for(lambda: self._held < _MAX_HELD or self._idle)
                if self._claimed == offset and not self._idle:
                    self._enqueue(_HashJob(offset, size, buffers, owned))
                    self._held += size
                    return size
            recycle_buffer(owned)
        return size

    def splice_in(self, pipe: int, size: int, offset: int) -> None:
        """Move ``size`` bytes waiting in ``pipe`` into the file at ``offset`` (``splice``:
        in the kernel, no copy through Python) and start their writeback. If they continue
        what the hash was given, it reads them back from the file at once, and this waits
        while it has more than :data:`_MAX_HELD` bytes to catch up on: a hash far behind
        would be left alone at the end, on one core, instead of sharing the transfer's."""
        done = 0
        while done < size:
            moved = os.splice(pipe, self._fd, size - done, offset_dst=offset + done)
            if not moved:
                raise OSError(errno.EIO, "the pipe ended before its bytes were in the file")
            done += moved
        _start_writeback(self._fd, offset, size)
        with self._cond:
            if self._claimed == offset and not self._idle:
                self._enqueue(_HashJob(offset, size, None, None))
                self._cond.wait_for(lambda: self._claimed - self._hashed <= _MAX_HELD or self._idle)

    def claim(self, end: int) -> None:
        """Have the hash read back the file from ``claimed`` to ``end`` (bytes that other
        parts wrote), after what it was given before."""
        with self._cond:
            if end > self._claimed and not self._idle:
                self._enqueue(_HashJob(self._claimed, end - self._claimed, None, None))

    def wait_hashed(self, end: int) -> None:
        """Block until the hash has seen ``end`` bytes; raise its error (a failed read)."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._hashed >= end or self._hash_error is not None or self._stopping
            )
            if self._hash_error is not None:
                raise self._hash_error
            if self._hashed < end:
                raise OSError(errno.EBADF, "the download was closed")

    def datasync(self) -> None:
        os.fdatasync(self._fd)

    def fsync(self) -> None:
        os.fsync(self._fd)

    # -- the hash thread ------------------------------------------------------------------------

    @property
    def _idle(self) -> bool:
        """The hash thread takes no more work: the file is closing, or a read failed."""
        return self._stopping or self._hash_error is not None

    def _enqueue(self, job: _HashJob) -> None:
        """Queue a job at ``claimed`` (under the condition) and start the thread if needed."""
        self._jobs.append(job)
        self._claimed += job.size
        self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._hash_loop, name="blob-sha256", daemon=True)
            self._thread.start()

    def _hash_loop(self) -> None:
        read_back: memoryview | None = None
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._jobs) or self._stopping)
                if self._stopping:
                    return
                job = self._jobs[0]
            try:
                if job.buffers is not None:
                    for buffer in job.buffers:
                        self._hasher.update(buffer)
                else:
                    read_back = read_back or memoryview(bytearray(_READ_BACK))
                    self._read_back(job, read_back)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the hash
                with self._cond:
                    self._hash_error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                if self._jobs and self._jobs[0] is job:
                    self._jobs.popleft()
                    self._hashed += job.size
                    if job.buffers is not None:
                        self._held -= job.size
                    recycle_buffer(job.owned)
                self._cond.notify_all()

    def _read_back(self, job: _HashJob, buffer: memoryview) -> None:
        """Hash ``job``'s range from the file, a buffer at a time (stopping with the file)."""
        offset, end = job.offset, job.offset + job.size
        while offset < end and not self._stopping:
            want = min(len(buffer), end - offset)
            if _HAS_PREADV:
                chunk = buffer[: os.preadv(self._fd, [buffer[:want]], offset)]
            else:
                chunk = memoryview(os.pread(self._fd, want, offset))
            if not chunk:
                raise OSError(errno.EIO, "partial download is shorter than its progress")
            self._hasher.update(chunk)
            offset += len(chunk)
        if offset < end:
            raise OSError(errno.EBADF, "the download was closed")


@dataclass(frozen=True)
class _HashJob:
    """Bytes ``[offset, offset + size)`` for the hash: ``buffers`` as written, or (None) to
    be read back from the file; ``owned`` is recycled once they are hashed."""

    offset: int
    size: int
    buffers: Sequence[Buffer] | None
    owned: memoryview | None
