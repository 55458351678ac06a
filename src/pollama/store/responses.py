"""Stored responses of ``/v1/responses`` (``store: true``): one SQLite file under the home.

OpenAI keeps a response so that ``previous_response_id`` can continue its conversation and
``GET``/``DELETE /v1/responses/{id}`` can read or remove it; Ollama keeps nothing (its
issue #15954). Here a record holds what those need: the response object as it was answered,
the input items the request sent (``input_items``), and the conversation so far as native
chat messages (every earlier turn, this request's input and this answer), which a follow-up
extends. Instructions are not part of the conversation: as in OpenAI, each request's
``instructions`` apply to it alone.

What must stay true:

* **Durable.** A record is written in one SQLite transaction (WAL, ``synchronous=FULL``)
  before the answer's last event or body is sent, so a client that saw a response id can use
  it after a crash or a restart. A file SQLite cannot open is moved aside (kept, never
  deleted) and a new one started, with an error in the log.
* **Bounded** by count, age and bytes (``POLLAMA_RESPONSES_MAX``, ``_MAX_AGE``,
  ``_MAX_BYTES``): each write evicts the oldest records past any bound; a record older than
  the age bound is gone for reads even before that.
* **Private.** A record belongs to the API key that made it (its id; ``""`` on a server
  without keys) and is found only under that owner: any other caller gets the same answer
  as for an id that never existed. The file is readable by its owner alone, and ids are
  random (192 bits), never counters.
* Every call is blocking I/O: the server calls it in a thread (``run_in_threadpool``);
  one lock serializes the calls on the one connection.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pollama.config import Settings

__all__ = ["ResponseRecord", "ResponseStore"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created);
"""


@dataclass
class ResponseRecord:
    """One stored response. ``conversation`` is native chat messages (``role``, ``content``,
    ``images``, ``thinking``, ``tool_calls``…), the whole conversation up to and including
    this response's answer."""

    id: str
    owner: str
    response: dict[str, Any]
    input_items: list[dict[str, Any]] = field(default_factory=list)
    conversation: list[dict[str, Any]] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    def _data(self) -> bytes:
        body = {"response": self.response, "input_items": self.input_items,
                "conversation": self.conversation}  # fmt: skip
        return zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 6)

    @classmethod
    def _from_row(cls, ident: str, owner: str, created: float, data: bytes) -> ResponseRecord:
        body = json.loads(zlib.decompress(data))
        return cls(id=ident, owner=owner, created=created, response=body["response"],
                   input_items=body["input_items"], conversation=body["conversation"])


class ResponseStore:
    """The records in ``path`` (created, with its folder, on first use), within the bounds:
    at most ``max_count`` records, none older than ``max_age`` seconds, ``max_bytes`` of
    compressed data in all. ``max_count`` 0 keeps nothing."""

    def __init__(self, path: Path, *, max_count: int, max_age: float, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_count = max_count
        self.max_age = max_age
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ResponseStore:
        """The store at ``settings.responses_path`` with the ``POLLAMA_RESPONSES_*`` bounds."""
        return cls(settings.responses_path, max_count=settings.responses_max,
                   max_age=settings.responses_max_age, max_bytes=settings.responses_max_bytes)

    @property
    def enabled(self) -> bool:
        return self.max_count > 0 and self.max_bytes > 0

    # -- the connection ----------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # private from the first byte: conversations are
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM responses").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self._db = self._open()
            except sqlite3.DatabaseError as exc:
                aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
                log.error("stored responses file %s is unreadable (%s); moved to %s and a "
                          "new one started", self.path, exc, aside)  # fmt: skip
                self.path.rename(aside)
                for suffix in ("-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
                self._db = self._open()
        return self._db

    def _absent(self) -> bool:
        """Nothing was ever stored: reads answer without creating the file."""
        return self._db is None and not self.path.exists()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- records -----------------------------------------------------------------------------

    def put(self, record: ResponseRecord) -> None:
        """Write ``record`` (replacing one with its id), then evict past the bounds."""
        if not self.enabled:
            return
        data = record._data()
        if len(data) > self.max_bytes:
            log.warning("response %s not stored: %d bytes compressed, over "
                        "POLLAMA_RESPONSES_MAX_BYTES", record.id, len(data))  # fmt: skip
            return
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO responses (id, owner, created, size, data) "
                "VALUES (?, ?, ?, ?, ?)",
                (record.id, record.owner, record.created, len(data), data),
            )
            self._evict(db)

    def get(self, ident: str, owner: str) -> ResponseRecord | None:
        """The record ``ident`` of ``owner``; None when it does not exist, expired, was
        deleted or belongs to another owner (the caller cannot tell which)."""
        if not self.enabled or self._absent():
            return None
        with self._lock:
            row = self._connection().execute(
                "SELECT id, owner, created, data FROM responses WHERE id = ? AND owner = ? "
                "AND created >= ?",
                (ident, owner, time.time() - self.max_age),
            ).fetchone()
        return ResponseRecord._from_row(*row) if row else None

    def delete(self, ident: str, owner: str) -> bool:
        """Remove ``owner``'s record ``ident``; False when there was none for that owner."""
        if not self.enabled or self._absent():
            return False
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM responses WHERE id = ? AND owner = ?", (ident, owner)
            ).rowcount > 0

    def count(self) -> int:
        if not self.enabled or self._absent():
            return 0
        with self._lock:
            return int(self._connection().execute("SELECT count(*) FROM responses").fetchone()[0])

    def _evict(self, db: sqlite3.Connection) -> None:
        """Drop what is past the age bound, then the oldest records until the count and the
        bytes are within theirs (the newest record always stays: it fits alone)."""
        db.execute("DELETE FROM responses WHERE created < ?", (time.time() - self.max_age,))
        db.execute(
            "DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY created "
            "DESC, rowid DESC LIMIT -1 OFFSET ?)",
            (self.max_count,),
        )
        total = db.execute("SELECT coalesce(sum(size), 0) FROM responses").fetchone()[0]
        if total <= self.max_bytes:
            return
        cut = 0
        for ident, size in db.execute(
            "SELECT id, size FROM responses ORDER BY created, rowid"
        ).fetchall():
            if total <= self.max_bytes:
                break
            db.execute("DELETE FROM responses WHERE id = ?", (ident,))
            total -= size
            cut += 1
        log.info("stored responses over POLLAMA_RESPONSES_MAX_BYTES: %d oldest removed", cut)
