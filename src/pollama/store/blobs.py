"""Content-addressed blob storage: ``<models>/blobs/sha256-<hex>``.

This module and :mod:`pollama.store.manifests` are the only code that turns a digest or a
model name into a filesystem path. A digest is accepted only as ``sha256:`` or ``sha256-``
followed by exactly 64 lowercase hex digits, so no caller-controlled string can ever reach
``os.path.join`` with a ``/``, ``..`` or NUL in it (CVE-2024-37032 and its regressions).

Writes go to a temporary file inside ``blobs/`` (same filesystem, so the final
``os.replace`` is atomic), are hashed while they are written, and are renamed into place
only when the hash is known and, where one was promised, matches. A reader therefore never
sees a partial blob under a final name.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pollama.errors import BlobNotFound, DigestMismatch, InvalidDigest

_DIGEST_RE = re.compile(r"sha256[:-]([0-9a-f]{64})")
_BLOB_FILE_RE = re.compile(r"sha256-([0-9a-f]{64})")
TEMP_PREFIX = "tmp-"
PARTIAL_SUFFIX = "-partial"
_COPY_CHUNK = 1 << 20


def parse_digest(value: str) -> str:
    """Return the canonical ``sha256:<hex>`` form, or raise :class:`InvalidDigest`."""
    match = _DIGEST_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidDigest()
    return f"sha256:{match.group(1)}"


def is_digest(value: str) -> bool:
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class StoredBlob:
    """The outcome of a write: the digest, its size, and whether this write created it."""

    digest: str
    size: int
    created: bool


class BlobWriter:
    """Streams bytes into a temp file while hashing them; :meth:`commit` publishes the blob.

    Use as a context manager: leaving the block without a commit removes the temp file,
    so an aborted upload or a failed hash check leaves nothing behind.
    """

    def __init__(self, store: BlobStore, expected: str | None) -> None:
        self._store = store
        self._expected = parse_digest(expected) if expected is not None else None
        self._hash = hashlib.sha256()
        self._size = 0
        self.temp_path = store.dir / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        self._file: BinaryIO | None = open(self.temp_path, "xb")  # noqa: SIM115
        self._done = False
        store.active.add(self.temp_path)

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "write after commit/abort"
        self._file.write(chunk)
        self._hash.update(chunk)
        self._size += len(chunk)

    @property
    def size(self) -> int:
        return self._size

    def commit(self) -> StoredBlob:
        """Fsync, verify against the expected digest, and rename into place."""
        assert self._file is not None, "commit after commit/abort"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        actual = f"sha256:{self._hash.hexdigest()}"
        if self._expected is not None and actual != self._expected:
            self.abort()
            raise DigestMismatch(self._expected, actual)
        final = self._store.path(actual)
        created = not final.exists()
        if created:
            os.chmod(self.temp_path, 0o644)
            os.replace(self.temp_path, final)
        else:
            self.temp_path.unlink(missing_ok=True)
            os.utime(final)
        self._done = True
        self._store.active.discard(self.temp_path)
        return StoredBlob(actual, self._size, created)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.temp_path.unlink(missing_ok=True)
        self._done = True
        self._store.active.discard(self.temp_path)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()


class BlobStore:
    """The ``blobs/`` folder of a models directory, passed in (never a global path)."""

    def __init__(self, models_dir: Path) -> None:
        self.dir = Path(models_dir) / "blobs"
        # Temp files being written right now; garbage collection must not touch them.
        self.active: set[Path] = set()

    def ensure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """The path of a blob. The digest is validated here, whatever the caller did."""
        canonical = parse_digest(digest)
        return self.dir / ("sha256-" + canonical.removeprefix("sha256:"))

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"blob {parse_digest(digest)} not found") from None

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise BlobNotFound(f"blob {parse_digest(digest)} not found") from None

    def read_bytes(self, digest: str, limit: int = 64 << 20) -> bytes:
        """Read a small blob (template, params…), refusing anything over ``limit`` bytes."""
        with self.open(digest) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise BlobNotFound(f"blob {parse_digest(digest)} is too large to read as metadata")
        return data

    def writer(self, expected: str | None = None) -> BlobWriter:
        self.ensure()
        return BlobWriter(self, expected)

    def put_bytes(self, data: bytes) -> StoredBlob:
        with self.writer() as w:
            w.write(data)
            return w.commit()

    def put_file(self, source: Path) -> StoredBlob:
        """Copy a local file (our own temp output, never a caller's path) into the store."""
        with self.writer() as w, open(source, "rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                w.write(chunk)
            return w.commit()

    def remove(self, digest: str) -> int:
        """Delete a blob; return the bytes freed (0 if it was already gone)."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def digests(self) -> Iterator[str]:
        """Every well-formed blob in the folder."""
        if not self.dir.is_dir():
            return
        for entry in os.scandir(self.dir):
            match = _BLOB_FILE_RE.fullmatch(entry.name)
            if match and entry.is_file(follow_symlinks=False):
                yield f"sha256:{match.group(1)}"

    def stray_files(self) -> Iterator[os.DirEntry[str]]:
        """Files in ``blobs/`` that are not blobs: temp files and ``-partial`` downloads."""
        if not self.dir.is_dir():
            return
        for entry in os.scandir(self.dir):
            if not _BLOB_FILE_RE.fullmatch(entry.name):
                yield entry

    def fix_legacy_names(self) -> None:
        """Rename legacy ``sha256:<hex>`` file names to ``sha256-<hex>`` (Ollama's fixblobs)."""
        if not self.dir.is_dir():
            return
        for entry in os.scandir(self.dir):
            match = re.match(r"^sha256:([0-9a-f]{64})$", entry.name)
            if match:
                os.replace(entry.path, self.dir / f"sha256-{match.group(1)}")
