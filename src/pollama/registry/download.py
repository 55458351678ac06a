"""Resumable, verified, shared blob downloads (docs/ollama-behaviour.md#downloads, Ollama's
``server/download.go``).

A blob is fetched in up to 16 ranged parts into ``<blob>-partial`` in the store, with each
part's progress recorded in ``<blob>-partial-<N>`` as Ollama records it
(``{"N","Offset","Size","Completed"}``), so a download interrupted by a cancelled request, a
killed server or a reboot continues from the bytes on disk, and Ollama and pollama can each
resume the other's. The parts take connections in file order, one at first, more while the
link is slower than ``fast_link`` (:meth:`BlobDownload._ramp`); a plain-HTTP body goes from
the socket to the file in the kernel (:mod:`pollama.registry.spliced`). What must stay true:

* **Nothing unverified gets a blob's name.** The data is hashed in file order while it is
  written, in a thread of its own (from memory once a write that continues the hashed prefix
  has landed, else by reading back what was spliced or what the other parts wrote once the
  prefix reaches it: :mod:`pollama.registry.partial`), and
  ``-partial`` is renamed to the blob only when the sha256 equals the digest. A mismatch
  deletes the partial data and its part files, nothing else.
* **A part file never claims bytes that are not on disk.** Counters move only after
  ``pwrite`` (or the ``splice`` into the file) returns, and a checkpoint ``fdatasync``\\ s
  the data before it writes the part files (atomically), so even a power cut leaves a state
  that resumes correctly.
* **A stall is not a failure.** A part that receives nothing for ``stall_timeout`` seconds
  is retried at once from where it stopped, without using up a retry; other errors retry
  with exponential backoff, and an attempt that made progress resets the count.
* **One download per digest per process.** Pulls of the same blob follow one download; it is
  cancelled (keeping its progress) when the last follower goes away. An exclusive ``flock``
  on the partial file keeps a second process from writing the same file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from pollama.registry import spliced
from pollama.registry.client import RegistrySession
from pollama.registry.errors import BlobDigestMismatch, InsufficientDiskSpace, RegistryError
from pollama.registry.netstream import HandedOver, RawBody, raw_body
from pollama.registry.partial import PartialFile, preallocate, recycle_buffer, take_buffer
from pollama.registry.transfer import Part, TransferOptions, describe, retryable
from pollama.store.blobs import PARTIAL_SUFFIX, TEMP_PREFIX, BlobStore

log = logging.getLogger(__name__)

_MIN_FLUSH = 1 << 20
"""A part hands what it received to a write once it holds this much and its previous write
has landed, so progress moves in steps of about this size on a slow link (while the previous
write still runs, it fills its buffer)."""
_MAX_PART_FILE = 4096
T = TypeVar("T")

__all__ = ["BlobDownload", "DownloadManager", "Part", "TransferOptions"]


class PartStalled(Exception):
    """No bytes arrived for the stall timeout."""


class ShortRead(Exception):
    """The response ended before the part was complete (a dropped connection)."""


class DirectURLExpired(Exception):
    """A CDN refused the direct URL (expired signature): resolve it again."""


class _Source(Protocol):
    """A response body, received into the caller's buffers."""

    async def fill(self, buffer: memoryview, enough: int, idle_timeout: float | None) -> int: ...

    def lower(self, enough: int) -> None: ...


class _ChunkSource:
    """A body read through httpx (where :func:`~pollama.registry.netstream.raw_body` does
    not allow reading it directly): its chunks copied into the caller's buffers, with
    :class:`~pollama.registry.netstream.RawBody`'s :meth:`fill` contract."""

    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_raw()
        self._rest = memoryview(b"")
        self._error: BaseException | None = None

    def lower(self, enough: int) -> None:
        """Nothing to do: a fill here returns as soon as what it holds is enough."""

    async def fill(self, buffer: memoryview, enough: int, idle_timeout: float | None) -> int:
        """Up to ``enough`` bytes; an error (a stall too) after some bytes is raised by the
        next call, so the bytes that arrived are kept."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        filled, enough = 0, min(max(1, enough), len(buffer))
        while filled < enough:
            if not self._rest:
                try:
                    async with asyncio.timeout(idle_timeout):
                        self._rest = memoryview(await anext(self._chunks))
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    if not filled:
                        raise
                    self._error = exc
                    break
            count = min(len(self._rest), len(buffer) - filled)
            buffer[filled : filled + count] = self._rest[:count]
            self._rest = self._rest[count:]
            filled += count
        return filled


def _source(response: httpx.Response) -> _Source:
    """The body straight from the connection where that is safe, else through httpx."""
    return raw_body(response) or _ChunkSource(response)


class BlobDownload:
    """The download of one blob; :meth:`follow` it, the task runs on its own."""

    def __init__(
        self,
        blobs: BlobStore,
        digest: str,
        size: int,
        session: RegistrySession,
        opts: TransferOptions,
        previous: BlobDownload | None = None,
    ) -> None:
        self.blobs = blobs
        self.digest = digest
        self.path = blobs.path(digest)
        self.partial = Path(str(self.path) + PARTIAL_SUFFIX)
        self.total = size
        self.completed = 0
        self.resumed = 0  # bytes that were on disk from an earlier pull when this one began
        self.parts: list[Part] = []
        self.opts = opts
        self.session = session.acquire()
        self.refs = 0
        self.abandoned = False
        self._previous = previous
        self._file: PartialFile | None = None
        self._direct: httpx.URL | None = None
        self._direct_lock = asyncio.Lock()
        self._progressed = asyncio.Event()
        self._state_lock = threading.Lock()
        self._finished = False
        self._saved: dict[int, int] = {}
        self._active_paths: set[Path] = set()
        self.task: asyncio.Task[None] = asyncio.create_task(self._run(), name=f"pull {digest}")

    # -- following --------------------------------------------------------------------------

    async def follow(self) -> AsyncIterator[tuple[int, int]]:
        """(total, completed) now and every progress interval until done; raises its error.

        Leaving early (a client that went away) drops this follower; the last one to leave
        cancels the download, which keeps what it has on disk for the next pull.
        """
        self.hold()
        try:
            yield self.total, self.completed
            while True:
                done, _ = await asyncio.wait({self.task}, timeout=self.opts.progress_interval)
                if done:
                    break
                yield self.total, self.completed
            self.task.result()
            yield self.total, self.total
        finally:
            self.release()

    def hold(self) -> None:
        """One more pull needs this download (a follower, or a pull that will follow it
        once the layers before it are done)."""
        self.refs += 1

    def release(self) -> None:
        """A pull no longer needs it; the last one to leave cancels the download, which
        keeps what it has on disk for the next pull."""
        self.refs -= 1
        if self.refs == 0 and not self.task.done():
            self.abandoned = True
            self.task.cancel()

    # -- files --------------------------------------------------------------------------------

    def _part_path(self, n: int) -> Path:
        return self.partial.with_name(f"{self.partial.name}-{n}")

    def _part_files(self) -> list[Path]:
        pattern = glob.escape(str(self.partial)) + "-*"
        return [Path(p) for p in glob.glob(pattern) if p[len(str(self.partial)) + 1 :].isdigit()]

    def _load_parts(self, data_size: int) -> list[Part] | None:
        """The recorded parts, or None when there are none, they do not add up, or the data
        file is shorter than what they claim."""
        files = self._part_files()
        if not files:
            return None
        parts: list[Part] = []
        for path in files:
            try:
                with open(path, "rb") as f:
                    doc = json.loads(f.read(_MAX_PART_FILE))
                values = [doc["N"], doc["Offset"], doc["Size"], doc["Completed"]]
            except (OSError, ValueError, KeyError, TypeError):
                return None
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                return None
            parts.append(Part(*values))
        parts.sort(key=lambda p: p.n)
        offset = 0
        for index, part in enumerate(parts):
            if part.n != index or part.offset != offset or part.size <= 0:
                return None
            if not 0 <= part.completed <= part.size or part.start > data_size:
                return None
            offset += part.size
        return parts if offset == self.total else None

    def _discard(self) -> None:
        for path in [*self._part_files(), self.partial]:
            path.unlink(missing_ok=True)

    def _write_part(self, part: Part, completed: int) -> None:
        tmp = self.blobs.dir / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        with open(tmp, "wb") as f:
            f.write(part.to_json(completed))
        os.replace(tmp, self._part_path(part.n))

    def _checkpoint(self) -> None:
        """Make the recorded progress durable: data first, then the part files."""
        with self._state_lock:
            if self._finished or self._file is None or self._file.closed:
                return
            snapshot = [(p, p.completed) for p in self.parts]
            changed = [(p, c) for p, c in snapshot if self._saved.get(p.n) != c]
            if not changed:
                return
            self._file.datasync()
            for part, completed in changed:
                self._write_part(part, completed)
                self._saved[part.n] = completed

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.opts.checkpoint_interval)
            await self._data.run(self._checkpoint)

    # -- running ------------------------------------------------------------------------------

    async def _run(self) -> None:
        if self._previous is not None and not self._previous.task.done():
            await asyncio.wait({self._previous.task})  # let it save its progress first
        self._previous = None
        try:
            await self._prepare()
            await self._download()
        finally:
            if self._file is not None and not self._file.closed:
                try:
                    self._checkpoint()
                except OSError as exc:
                    log.warning("could not save the progress of %s: %s", self.digest, exc)
                self._file.close()
            self.blobs.active.difference_update(self._active_paths)
            await self.session.release()

    async def _prepare(self) -> None:
        """Lock the partial file, then resume its recorded parts or plan new ones (the file
        work in two thread calls: what is recorded, then laying out what is planned)."""
        self.blobs.ensure()
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RegistryError(
                f"{self.digest} is being downloaded by another process; try again when it ends"
            ) from None
        file = self._file = PartialFile(fd)
        self._active_paths = {self.partial}
        self.blobs.active.add(self.partial)
        parts = await file.run(self._recorded_parts, fd)
        fresh = parts is None
        if parts is None:
            if not self.total:  # the manifest's size is checked against the first answer
                self.total = await self._remote_size()
            parts = [Part(n, off, size) for n, (off, size) in enumerate(self.opts.plan(self.total))]
        else:
            done = sum(p.completed for p in parts)
            log.info("resuming %s from %d bytes", self.digest[7:19], done)
        with self._disk_errors():
            await file.run(self._lay_out, fd, parts, fresh)
        self.parts = parts
        self._saved = {p.n: p.completed for p in parts}
        self.completed = self.resumed = sum(p.completed for p in parts)
        paths = {self._part_path(p.n) for p in parts}
        self._active_paths |= paths
        self.blobs.active.update(paths)
        if parts:
            log.info("downloading %s in %d part(s)", self.digest[7:19], len(parts))

    def _recorded_parts(self, fd: int) -> list[Part] | None:
        """The parts an earlier download recorded; None (its part files deleted) when
        there are none to resume."""
        parts = self._load_parts(os.fstat(fd).st_size)
        if parts is None:
            for path in self._part_files():
                path.unlink(missing_ok=True)
        return parts

    def _lay_out(self, fd: int, parts: list[Part], fresh: bool) -> None:
        """Record new parts (Ollama's part files), give the data file its size and reserve
        its blocks."""
        if fresh:
            for part in parts:
                self._write_part(part, 0)
        if os.fstat(fd).st_size != self.total:
            os.ftruncate(fd, self.total)
        preallocate(fd, self.total)

    async def _remote_size(self) -> int:
        """``HEAD`` the blob, for a manifest that gives no size (Ollama always asks)."""
        url = self.session.url("blobs", self.digest)

        async def head() -> int | None:
            async with self.session.stream("HEAD", url) as response:
                length = response.headers.get("content-length", "")
                return int(length) if length.isdigit() else None

        return await self._with_retries(head, "HEAD") or 0

    async def _with_retries(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Retry a small request on transport errors and 5xx/408/429, with backoff."""
        tries = 0
        while True:
            try:
                return await call()
            except (httpx.TransportError, RegistryError) as exc:
                if isinstance(exc, RegistryError) and not retryable(exc):
                    raise
                tries += 1
                if tries > self.opts.max_retries:
                    raise RegistryError(
                        f"{what} {self.digest[7:19]}: max retries exceeded: {exc}"
                    ) from exc
                await asyncio.sleep(self.opts.backoff(tries))

    async def _request_part(self, part: Part) -> httpx.Response:
        """The ``GET`` of the rest of a part, from where the bytes are. The first request of
        a download also finds that out (the other parts wait for it): the registry answers
        it, or redirects it to another host (a CDN), whose URL serves the rest, without the
        registry's credentials (``RegistrySession``)."""
        headers = {"Range": f"bytes={part.start}-{part.end - 1}", "Accept-Encoding": "identity"}
        async with self._direct_lock:
            if self._direct is None:
                url = self.session.url("blobs", self.digest)
                response = await self.session.send("GET", url, headers=headers, same_host_only=True)
                location = response.headers.get("location")
                if response.status_code not in (301, 302, 303, 307, 308) or not location:
                    self._direct = response.url
                    return response
                await response.aclose()
                self._direct = self.session.redirect_target(response.url, location)
        ok = () if self.session.is_registry_host(self._direct) else (401, 403)
        return await self.session.send("GET", self._direct, headers=headers, ok_statuses=ok)

    async def _download(self) -> None:
        ramped = self.opts.ramp_interval > 0
        conns = _Connections(1, ahead=1) if ramped else _Connections(self.opts.max_parts)
        workers = [
            asyncio.create_task(self._download_part(p, conns)) for p in self.parts if not p.done
        ]
        hasher = asyncio.create_task(self._hash_in_order())
        checkpointer = asyncio.create_task(self._checkpoint_loop())
        ramp = asyncio.create_task(self._ramp(conns, len(workers))) if ramped else None
        try:
            pending = set(workers)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            actual = await hasher
        finally:
            others: list[asyncio.Task[Any]] = [*workers, hasher, checkpointer]
            others += [ramp] if ramp is not None else []
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        await asyncio.to_thread(self._finish, actual)

    async def _ramp(self, conns: _Connections, parts: int) -> None:
        """Open more connections while the link is what limits the download: every
        ``ramp_interval``, if fewer than ``fast_link`` bytes a second came in, double the
        connections (up to ``max_parts`` and the parts to fetch). Parts take connections in
        file order, so on a link faster than the hash one connection fetches them one after
        another and the hash reads each as it lands, instead of most of the file after the
        last byte (which on a loopback registry made a 491 MB pull in 5 parts a third
        slower than in one); on a slower link, parallel parts still add up their speeds."""
        limit = min(self.opts.max_parts, parts)
        seen = self.completed
        while conns.count < limit:
            await asyncio.sleep(self.opts.ramp_interval)
            rate = (self.completed - seen) / self.opts.ramp_interval
            seen = self.completed
            if rate < self.opts.fast_link:
                conns.grow(min(conns.count, limit - conns.count))

    def _finish(self, actual: str) -> None:
        """Publish the verified blob, or delete the bad data (and only that)."""
        file = self._data
        with self._state_lock:
            self._finished = True
        if actual != self.digest:
            file.close()
            self._discard()
            raise BlobDigestMismatch(self.digest, actual)
        file.call(file.fsync)
        file.close()
        os.chmod(self.partial, 0o644)
        os.replace(self.partial, self.path)
        for path in self._part_files():
            path.unlink(missing_ok=True)

    @property
    def _data(self) -> PartialFile:
        """The open partial file (from :meth:`_prepare` on)."""
        assert self._file is not None, "the download is not prepared"
        return self._file

    def _frontier(self) -> int:
        """End of the contiguous completed prefix of the file (a part's bytes are in the
        file from its offset up to ``start``)."""
        frontier = 0
        for part in self.parts:
            if not part.done:
                return part.start
            frontier = part.end
        return frontier

    async def _hash_in_order(self) -> str:
        """Feed the hash the completed prefix as it grows: a write that continues it gave
        the hash its bytes already; what the other parts wrote is read back by the hash
        thread once the prefix reaches it (:meth:`PartialFile.claim`)."""
        file = self._data
        while True:
            self._progressed.clear()
            file.claim(self._frontier())
            if file.claimed >= self.total:
                await file.run(file.wait_hashed, self.total)
                return file.digest()
            await self._progressed.wait()

    async def _download_part(self, part: Part, conns: _Connections) -> None:
        async with conns.asking:
            tries = stalls = 0
            while not part.done:
                before = part.completed
                try:
                    await self._fetch_part(part, conns)
                except (PartStalled, httpx.ReadTimeout):
                    stalls = 0 if part.completed > before else stalls + 1
                    log.info(
                        "%s part %d stalled; retrying. If this persists, press ctrl-c to exit, "
                        "then 'pollama pull' to find a faster connection.",
                        self.digest[7:19],
                        part.n,
                    )
                    if stalls > self.opts.max_stalls:
                        raise RegistryError(
                            f"download of {self.digest[7:19]} keeps stalling"
                        ) from None
                    continue
                except DirectURLExpired:
                    self._direct = None
                    exc: Exception = RegistryError("the download URL was refused")
                except (httpx.TransportError, ShortRead) as err:
                    exc = err
                except RegistryError as err:
                    if not retryable(err):
                        raise
                    exc = err
                else:
                    continue
                tries = 1 if part.completed > before else tries + 1
                if tries > self.opts.max_retries:
                    raise RegistryError(f"max retries exceeded: {describe(exc)}")
                delay = self.opts.backoff(tries)
                log.info(
                    "%s part %d attempt %d failed: %s, retrying in %.1fs",
                    self.digest[7:19],
                    part.n,
                    tries,
                    describe(exc),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _fetch_part(self, part: Part, conns: _Connections) -> None:
        """One attempt at the rest of a part: its request, then its body once one of the
        connections that receive is free."""
        response = await self._request_part(part)
        try:
            async with conns.receiving:
                await self._receive_part(part, response)
        finally:
            await response.aclose()

    async def _receive_part(self, part: Part, response: httpx.Response) -> None:
        """The body of a part's answer. It goes from the socket to the file in the kernel
        where it can (:meth:`_move_part`); else what arrives is received into buffers of
        :data:`~pollama.registry.partial.BUFFER_SIZE` bytes that are written in order, one
        in flight while the next fills; a buffer is handed over once it holds
        :data:`_MIN_FLUSH` bytes and the write before it has landed (or once it is full), so
        batches grow with the link's speed. Whatever arrived before an error is kept."""
        buffer = take_buffer()
        filled = 0
        writing: asyncio.Task[None] | None = None
        try:
            source = _source(response)
            skip = self._check_part_response(response, part)
            handed = self._hand_over(source, skip)
            if handed is not None:
                await self._move_part(part, handed)
            else:
                await self._skip(source, buffer, skip)
            left = 0 if handed is not None else part.end - part.start
            while left > 0:
                got = await self._receive(source, buffer[filled : filled + left], filled, writing)
                if not got:
                    break
                filled, left = filled + got, left - got
                idle = writing is None or writing.done()
                if filled == len(buffer) or not left or (filled >= _MIN_FLUSH and idle):
                    writing = await self._write_next(part, buffer, filled, writing)
                    buffer, filled = take_buffer(), 0
        finally:
            failed = False
            if writing is not None:  # let the write in flight land before anything else
                await asyncio.gather(writing, return_exceptions=True)
                failed = writing.cancelled() or writing.exception() is not None
            if filled and not failed:  # bytes that arrived are good: keep them for the retry
                try:
                    self._write(part, buffer, filled)
                except Exception as exc:  # noqa: BLE001 - the original error matters more
                    log.warning("could not keep %d bytes of %s: %s", filled, self.digest, exc)
            elif not filled:
                recycle_buffer(buffer)
        if writing is not None and not writing.cancelled() and writing.exception() is not None:
            raise writing.exception()  # type: ignore[misc]
        if not part.done:
            raise ShortRead(f"connection closed at {part.start} of part {part.n}")

    def _hand_over(self, source: _Source, skip: int) -> HandedOver | None:
        """The socket and what it had received, where the body can go to the file in the
        kernel (:mod:`pollama.registry.spliced`): a plain connection's body, from the
        part's first byte, on a platform that splices, unless the options say not to, and
        while a mover is free (else the body is read here)."""
        if skip or not (self.opts.splice and spliced.AVAILABLE) or not isinstance(source, RawBody):
            return None
        if not spliced.take_mover():
            return None
        handed = source.hand_over()
        if handed is None:
            spliced.give_back_mover()
        return handed

    async def _move_part(self, part: Part, handed: HandedOver) -> None:
        """The rest of a part from the handed-over socket into the file
        (:func:`pollama.registry.spliced.move_body`); gives the mover back."""
        try:
            with self._disk_errors():
                await spliced.move_body(
                    self._data,
                    handed,
                    part.start,
                    part.end - part.start,
                    idle_timeout=self.opts.idle_timeout,
                    advance=lambda n: self._advance(part, n),
                )
        except TimeoutError:
            raise PartStalled() from None
        finally:
            spliced.give_back_mover()

    async def _receive(
        self, source: _Source, free: memoryview, filled: int, writing: asyncio.Task[None] | None
    ) -> int:
        """Fill ``free`` (the rest of a buffer holding ``filled`` bytes): up to
        :data:`_MIN_FLUSH` in all while no write runs, else until it is full or the write
        lands. :class:`PartStalled` when nothing arrives for the stall timeout."""
        early = _MIN_FLUSH - filled
        enough = early
        if writing is not None and not writing.done():
            writing.add_done_callback(lambda _task: source.lower(early))
            enough = len(free)
        try:
            return await source.fill(free, enough, self.opts.idle_timeout)
        except TimeoutError:
            raise PartStalled() from None

    async def _skip(self, source: _Source, buffer: memoryview, skip: int) -> None:
        """Drop the body's first ``skip`` bytes (a server that ignored the ``Range``)."""
        while skip > 0:
            got = await self._receive(source, buffer[:skip], 0, None)
            if not got:
                raise ShortRead("connection closed before the part's range")
            skip -= got

    def _check_part_response(self, response: httpx.Response, part: Part) -> int:
        """Bytes to skip at the start of the body (a server that ignored the Range). The
        blob's size the answer gives must be the manifest's."""
        encoding = response.headers.get("content-encoding", "identity").lower()
        if encoding not in ("", "identity"):
            raise RegistryError(f"blob sent with Content-Encoding {encoding!r}", 400)
        if response.status_code == 206:
            content_range = response.headers.get("content-range", "")
            if content_range and not content_range.startswith(f"bytes {part.start}-"):
                raise RegistryError(f"unexpected Content-Range {content_range!r}")
            self._check_size(content_range.rpartition("/")[2])
            return 0
        if response.status_code == 200:
            self._check_size(response.headers.get("content-length", ""))
            return part.start
        if response.status_code in (401, 403):
            raise DirectURLExpired()
        raise RegistryError(f"unexpected status code {response.status_code}")

    def _check_size(self, reported: str) -> None:
        if reported.isdigit() and int(reported) != self.total:
            raise RegistryError(  # the registry's blob is not the manifest's: no retry
                f"registry reports {reported} bytes for {self.digest}, the manifest {self.total}",
                400,
            )

    async def _write_next(
        self, part: Part, buffer: memoryview, size: int, writing: asyncio.Task[None] | None
    ) -> asyncio.Task[None]:
        """Start writing a buffer's first ``size`` bytes once the write before it has landed
        (or raise its error); the buffer belongs to the file from then on."""
        if writing is not None:
            await writing
        return asyncio.create_task(self._flush(part, buffer, size))

    async def _flush(self, part: Part, buffer: memoryview, size: int) -> None:
        file = self._data
        with self._disk_errors():
            await file.run(file.write, [buffer[:size]], part.start, buffer)
        self._advance(part, size)

    def _write(self, part: Part, buffer: memoryview, size: int) -> None:
        """:meth:`_flush` in this thread (a part's last bytes, after an error)."""
        file = self._data
        with self._disk_errors():
            file.call(file.write, [buffer[:size]], part.start, buffer)
        self._advance(part, size)

    @contextlib.contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """A failure of the file raised as :meth:`_disk_error` says it (a ``TimeoutError``,
        which only a stalled socket raises, stays one)."""
        try:
            yield
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise self._disk_error(exc) from exc

    def _advance(self, part: Part, count: int) -> None:
        part.completed += count
        self.completed += count
        self._progressed.set()

    def _disk_error(self, exc: OSError) -> Exception:
        if exc.errno == errno.ENOSPC:
            return InsufficientDiskSpace(f"no space left on device while downloading {self.digest}")
        return exc


class _Connections:
    """How many parts of a download receive at once, and how many have asked for theirs.

    While one part receives, the next part's request is already on its way (``ahead``), so
    the registry's time to its first byte passes while the part before it arrives instead
    of between the two. Once more connections receive, none asks ahead: on a link slow
    enough to need them, an answer kept waiting could be closed by the server meanwhile."""

    def __init__(self, count: int, *, ahead: int = 0) -> None:
        self.count = count
        self.ahead = ahead
        self.receiving = asyncio.Semaphore(count)
        self.asking = asyncio.Semaphore(count + ahead)

    def grow(self, more: int) -> None:
        """``more`` connections receive from now on (the request ahead becomes one)."""
        for _ in range(more):
            self.receiving.release()
        for _ in range(more - self.ahead):
            self.asking.release()
        self.count += more
        self.ahead = 0


class DownloadManager:
    """The downloads in flight in this process, by digest, so pulls share them."""

    def __init__(self) -> None:
        self._active: dict[str, BlobDownload] = {}

    def get(
        self,
        blobs: BlobStore,
        digest: str,
        size: int,
        session: RegistrySession,
        opts: TransferOptions,
    ) -> BlobDownload:
        current = self._active.get(digest)
        if current is not None and not current.abandoned and not current.task.done():
            return current
        download = BlobDownload(blobs, digest, size, session, opts, previous=current)
        self._active[digest] = download

        def forget(_task: asyncio.Task[None]) -> None:
            if self._active.get(digest) is download:
                del self._active[digest]

        download.task.add_done_callback(forget)
        return download

    def active(self) -> list[str]:
        return sorted(self._active)
