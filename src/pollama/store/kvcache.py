"""The prompt cache on disk: KV sequences kept across unloads, under ``~/.ollama/kvcache``.

A file holds one sequence of a loaded model: the tokens its KV cache holds, in order, and
llama.cpp's state of that sequence (``llama_state_seq_get_data``), under a *key*, the
SHA-256 of what shapes that state: the model's weights (their digest), the adapters, the
context per sequence, the cache's types and layout, the engine's version
(``runner/kvstate.py`` assembles it). This module knows nothing of llama.cpp; it turns
keys into paths and keeps the files sound, private and bounded.

The layout (little-endian)::

    magic     8 bytes   b"PLMKVC\\r\\n"
    version   u32
    key       32 bytes
    n_tokens  u64
    n_state   u64
    checksum  32 bytes  SHA-256 of the 60 bytes before it and of everything after it
    tokens    n_tokens x i32
    state     n_state bytes

Beside them, one small ``<key>.costs`` file per key (at most :data:`MAX_COSTS_BYTES`, JSON
that ``runner/prefill.py`` checks) keeps what that key's workers measured of short prompt
chunks; it goes when the last sequence file of its key does.

What must stay true:

* **Atomic.** A file is written under a temporary name in the same directory, synced and
  renamed into place, so no reader ever sees a partial file under a final name, and two
  servers sharing a home never corrupt each other's files (the last rename wins).
* **Nothing is believed unchecked.** Before any byte reaches llama.cpp, the size the header
  declares must be the file's own size, within the directory's bound, its token count within
  the context and each token within the vocabulary, and the checksum must match; a file that
  fails is reported (:class:`KVFileError`) for the caller to log and :meth:`discard`.
* **Private.** The directory is made 0700 and each file 0600: the tokens are the
  conversation's text.
* **Bounded.** The files together take at most ``max_bytes``; after a save the least
  recently used go first (a file's mtime: a restore touches it). ``max_bytes`` 0: no cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "HEADER_SIZE",
    "MAX_COSTS_BYTES",
    "KVCacheDir",
    "KVFileError",
    "KVRecord",
    "cache_key",
    "file_identity",
]

MAGIC = b"PLMKVC\r\n"
VERSION = 1
_PREFIX = struct.Struct("<8sI32sQQ")
HEADER_SIZE = _PREFIX.size + 32
_SUFFIX = ".kv"
_TEMP_PREFIX = ".tmp-"
_STALE_TEMP_SECONDS = 3600.0  # a temporary file this old was left by a killed writer
_CHUNK = 8 << 20
_NAME_RE = re.compile(r"[0-9a-f]{32}-[0-9a-f]{32}\.kv")
_COSTS_SUFFIX = ".costs"
_COSTS_RE = re.compile(r"([0-9a-f]{32})\.costs")
MAX_COSTS_BYTES = 16384
# A cache file is opened for reading without following a link put in its place.
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_BLOB_NAME_RE = re.compile(r"sha256-([0-9a-f]{64})")


def _key_name(key: bytes) -> str:
    """A key's part of its files' names (a sequence file's first half, a costs file's
    whole stem)."""
    return key.hex()[:32]


class KVFileError(Exception):
    """A cache file that must not be used: why, in words (for the log line)."""


@dataclass(frozen=True)
class KVRecord:
    """A checked file: its tokens, and its state as a writable view of the bytes read."""

    path: Path
    tokens: list[int]
    state: memoryview


def cache_key(material: Mapping[str, Any]) -> bytes:
    """The 32-byte key of a JSON-able description of what shapes the cached state."""
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()


def file_identity(path: str | os.PathLike[str]) -> str:
    """What names a model file's content: its digest for a blob of the store
    (``sha256-<hex>``: the name is the hash of its bytes), else its real path, size and
    modification time (a file outside the store may change under its name)."""
    match = _BLOB_NAME_RE.fullmatch(os.path.basename(path))
    if match is not None:
        return f"sha256:{match.group(1)}"
    st = os.stat(path)
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def file_size(n_tokens: int, n_state: int) -> int:
    """The bytes a file of ``n_tokens`` tokens and ``n_state`` state bytes takes."""
    return HEADER_SIZE + 4 * n_tokens + n_state


def _tokens_bytes(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


class KVCacheDir:
    """The cache directory (see the module docstring); the only code that names its files."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max(int(max_bytes), 0)

    def ensure(self) -> None:
        """Make the directory (0700), and make it private if it was not."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.root.stat()
        if stat.S_IMODE(st.st_mode) != 0o700 and st.st_uid == os.getuid():
            os.chmod(self.root, 0o700)

    def path(self, key: bytes, tokens: Sequence[int]) -> Path:
        """Where the file of ``tokens`` under ``key`` lives: named by both, so the same
        sequence saved twice is one file."""
        content = hashlib.sha256(_tokens_bytes(tokens)).hexdigest()[:32]
        return self.root / f"{_key_name(key)}-{content}{_SUFFIX}"

    def candidates(self, key: bytes) -> list[Path]:
        """The files named for ``key``, most recently used first (unchecked)."""
        prefix = f"{_key_name(key)}-"
        found: list[tuple[int, Path]] = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        for entry in entries:
            if entry.name.startswith(prefix) and _NAME_RE.fullmatch(entry.name):
                try:
                    used = entry.stat(follow_symlinks=False).st_mtime_ns
                except OSError:
                    continue
                found.append((used, Path(entry.path)))
        found.sort(key=lambda item: item[0], reverse=True)
        return [path for _, path in found]

    # -- reading -----------------------------------------------------------------------

    def read(self, path: Path, key: bytes, *, max_tokens: int, n_vocab: int) -> KVRecord:
        """The file's tokens and state, every check of the module docstring passed;
        :class:`KVFileError` says which one failed (``OSError`` if it cannot be read)."""
        fd = os.open(path, _READ_FLAGS)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KVFileError("not a regular file")
            size = st.st_size
            if size < HEADER_SIZE:
                raise KVFileError(f"truncated ({size} bytes)")
            if size > self.max_bytes:
                raise KVFileError(f"{size} bytes, over the cache's bound of {self.max_bytes}")
            data = bytearray(size)
            if f.readinto(data) != size:
                raise KVFileError("truncated while reading")
        n_tokens, n_state = self._check_header(data, key, max_tokens)
        if file_size(n_tokens, n_state) != size:
            raise KVFileError(
                f"truncated or padded: the header says {file_size(n_tokens, n_state)} bytes, "
                f"the file has {size}"
            )
        digest = hashlib.sha256(memoryview(data)[: _PREFIX.size])
        digest.update(memoryview(data)[HEADER_SIZE:])
        if digest.digest() != bytes(data[_PREFIX.size : HEADER_SIZE]):
            raise KVFileError("checksum mismatch")
        tokens = np.frombuffer(data, dtype="<i4", count=n_tokens, offset=HEADER_SIZE)
        if n_tokens and (int(tokens.min()) < 0 or int(tokens.max()) >= n_vocab):
            raise KVFileError("a token outside the vocabulary")
        start = HEADER_SIZE + 4 * n_tokens
        return KVRecord(path, [int(t) for t in tokens], memoryview(data)[start:])

    @staticmethod
    def _check_header(data: bytearray, key: bytes, max_tokens: int) -> tuple[int, int]:
        magic, version, file_key, n_tokens, n_state = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise KVFileError("not a pollama KV cache file (bad magic)")
        if version != VERSION:
            raise KVFileError(f"format version {version}, this server reads {VERSION}")
        if file_key != key:
            raise KVFileError("made for another model or other load options")
        if not 0 < n_tokens <= max_tokens:
            raise KVFileError(f"{n_tokens} tokens, outside 1..{max_tokens}")
        if n_state == 0:
            raise KVFileError("no state")
        return n_tokens, n_state

    # -- writing -----------------------------------------------------------------------

    def write(
        self, key: bytes, tokens: Sequence[int], state: bytes | bytearray, deadline: float
    ) -> Path | None:
        """Write one sequence's file atomically (0600); None, leaving nothing, when it would
        exceed the bound alone or ``deadline`` (``time.monotonic``) passes while writing."""
        size = file_size(len(tokens), len(state))
        if not tokens or not state or size > self.max_bytes:
            return None
        final = self.path(key, tokens)
        token_bytes = _tokens_bytes(tokens)
        prefix = _PREFIX.pack(MAGIC, VERSION, key, len(tokens), len(state))
        digest = hashlib.sha256(prefix)
        digest.update(token_bytes)
        view = memoryview(state)
        for at in range(0, len(view), _CHUNK):
            digest.update(view[at : at + _CHUNK])

        def fill(f: BinaryIO) -> None:
            f.write(prefix + digest.digest() + token_bytes)
            for at in range(0, len(view), _CHUNK):
                if time.monotonic() > deadline:
                    raise TimeoutError
                f.write(view[at : at + _CHUNK])

        try:
            self._replace(final, fill)
        except TimeoutError:
            return None
        return final

    def write_costs(self, key: bytes, data: bytes) -> None:
        """Keep ``data`` (at most :data:`MAX_COSTS_BYTES`) as what the workers of ``key``
        measured (``runner/prefill.py``), atomically (0600), replacing what was there."""
        if len(data) > MAX_COSTS_BYTES:
            raise ValueError(f"{len(data)} bytes of costs, over {MAX_COSTS_BYTES}")
        self._replace(self._costs_path(key), lambda f: f.write(data))

    def read_costs(self, key: bytes) -> bytes | None:
        """What :meth:`write_costs` kept for ``key``; None when there is nothing, or
        something else than a small regular file (too big, a link, a pipe: discarded; a
        directory: left, never read)."""
        path = self._costs_path(key)
        try:  # never blocks on a pipe put in its place, nor follows a link
            fd = os.open(path, _READ_FLAGS | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            return None
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_COSTS_BYTES:
                    return os.read(fd, MAX_COSTS_BYTES + 1)
            finally:
                os.close(fd)
        with contextlib.suppress(OSError):  # a directory: left, and never read
            path.unlink(missing_ok=True)
        return None

    def discard_costs(self, key: bytes) -> None:
        self._costs_path(key).unlink(missing_ok=True)

    def _costs_path(self, key: bytes) -> Path:
        return self.root / f"{_key_name(key)}{_COSTS_SUFFIX}"

    def _replace(self, final: Path, fill: Callable[[BinaryIO], object]) -> None:
        """Write ``final`` atomically: ``fill`` writes a temporary file (0600) that is
        synced and renamed into place; on any failure nothing is left."""
        temp = self.root / f"{_TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(temp, flags, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self._sync_dir()

    def _sync_dir(self) -> None:
        try:
            fd = os.open(self.root, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- upkeep ------------------------------------------------------------------------

    @staticmethod
    def touch(path: Path, order: int = 0) -> None:
        """Mark the file as just used (least recently used goes first); files touched in
        one go with increasing ``order`` keep that order, whatever the clock's grain."""
        at = time.time_ns() + order * 1000
        try:
            os.utime(path, ns=(at, at))
        except OSError:
            pass

    @staticmethod
    def discard(path: Path) -> None:
        path.unlink(missing_ok=True)

    def evict(self) -> int:
        """Delete the least recently used files until all fit in ``max_bytes``, and any
        temporary file a killed writer left; returns the bytes freed."""
        files: list[tuple[int, int, Path]] = []
        now = time.time()
        freed = 0
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return 0
        costs: dict[str, Path] = {}
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.name.startswith(_TEMP_PREFIX):
                if now - st.st_mtime > _STALE_TEMP_SECONDS:
                    Path(entry.path).unlink(missing_ok=True)
            elif _NAME_RE.fullmatch(entry.name) and stat.S_ISREG(st.st_mode):
                files.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
            elif match := _COSTS_RE.fullmatch(entry.name):
                costs[match.group(1)] = Path(entry.path)
        total = sum(size for _, size, _ in files)
        kept = sorted(files, key=lambda item: item[0])
        while kept and total > self.max_bytes:
            _, size, path = kept.pop(0)
            path.unlink(missing_ok=True)
            total -= size
            freed += size
        keys = {path.name.partition("-")[0] for _, _, path in kept}
        for key, path in costs.items():  # a key's costs serve only its files' next turns
            if key not in keys:
                path.unlink(missing_ok=True)
        return freed
