"""The prompt cache across unloads (docs/ollama-behaviour.md#the-prompt-cache-across-unloads).

When a worker stops gracefully (keep-alive expiry, eviction, ``keep_alive: 0``, ``pollama
stop``, the server's shutdown: the ``shutdown`` message), it writes each idle slot's KV
sequence to the cache directory (``store/kvcache.py``), under a key made of what shapes
that state (:func:`cache_material`). The next worker loaded with the same key reads the
files back into its empty slots before the engine admits its first request, so the next
turn of a conversation reuses its prefix exactly as it would on a warm slot: the restored
cells are the very bytes the warm slot held.

What must stay true:

* Only the thread that runs the engine's loop calls these, and only while the loop is not
  running (before :meth:`Engine.run`, after it returned): they touch the context.
* A slot holds a restored sequence only when llama.cpp accepted its state whole, into an
  empty sequence; otherwise the sequence is emptied and the slot stays empty, so
  ``slot.tokens`` is always what the KV holds. A file that fails a check is deleted and
  named in a log line; any other failure costs the cache, never the worker (which guards
  each step: ``worker._guarded``).
* Bounded: a save stops at its deadline (:data:`SAVE_SECONDS`, inside the server's wait
  for the worker to exit; a killed worker saves nothing and leaves no partial file), a
  restore reads at most one file per empty slot, each within the directory's bound.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollama.runner.base import LoadSpec
from pollama.runner.prefill import ShortChunks
from pollama.store.kvcache import KVCacheDir, KVFileError, KVRecord, cache_key, file_identity

if TYPE_CHECKING:
    from pollama.runner.engine import Engine

__all__ = ["MIN_TOKENS", "SAVE_SECONDS", "PromptCache", "cache_material"]

FORMAT = 1  # of the key material below: a change makes every earlier file another key's
# A save's time budget: the server waits 5 s for a worker to exit before killing it
# (``SubprocessRunner``'s close timeout), and the worker still has to free the model.
SAVE_SECONDS = 3.0
RESTORE_SECONDS = 10.0  # reading back: the first request waits for it
MIN_TOKENS = 32  # a shorter sequence costs more to save and read than to evaluate again


def cache_material(spec: LoadSpec, *, n_ctx: int, type_k: int, type_v: int) -> dict[str, Any]:
    """What shapes a sequence's saved state: the weights and adapters (by digest), the
    context per sequence, the cache's types, flash attention (the V layout), the engine's
    version. The thread count, the batch size, mmap and the placement do not."""
    from pollama.runner import llama

    return {
        "format": FORMAT,
        "engine": llama.state_format(),
        "model": file_identity(spec.model_path),
        "adapters": [file_identity(path) for path in spec.adapters],
        "projectors": [file_identity(path) for path in spec.projectors],
        "n_ctx": n_ctx,
        "type_k": type_k,
        "type_v": type_v,
        "flash_attn": llama.flash_attn_type(spec.flash_attention, spec.kv_cache_type),
    }


def _is_prefix(short: Sequence[int], long: Sequence[int]) -> bool:
    return len(short) <= len(long) and list(long[: len(short)]) == list(short)


class PromptCache:
    """One worker's use of the cache directory, for one key (see the module docstring)."""

    def __init__(
        self, directory: KVCacheDir, key: bytes, log: Callable[[str], None]
    ) -> None:
        self.dir = directory
        self.key = key
        self._log = log
        self._restored: list[tuple[Path, list[int]]] = []  # read back at load

    @classmethod
    def open(
        cls, root: str, max_bytes: int, material: dict[str, Any], log: Callable[[str], None]
    ) -> PromptCache | None:
        """The cache under ``root``, or None when it is off (``max_bytes`` 0) or its
        directory cannot be made (logged)."""
        if max_bytes <= 0:
            return None
        directory = KVCacheDir(Path(root), max_bytes)
        try:
            directory.ensure()
        except OSError as exc:
            log(f"prompt cache off: {exc}")
            return None
        return cls(directory, cache_key(material), log)

    # -- on load -----------------------------------------------------------------------

    def restore(self, engine: Engine) -> int:
        """Read the key's most recently used files into the engine's empty slots, one file
        in memory at a time; returns how many slots now hold one."""
        self._restore_costs(engine)
        free = engine.empty_slots() if engine.can_shift else []
        start = time.monotonic()
        adopted: list[tuple[int, list[int]]] = []
        try:
            for path in self.dir.candidates(self.key) if free else ():
                if len(adopted) == len(free) or time.monotonic() - start > RESTORE_SECONDS:
                    break
                record = self._read(path, engine)
                if record is not None and self._set(engine, free[len(adopted)], record):
                    self.dir.touch(path, -len(adopted))  # read newest first: keep the order
                    adopted.append((free[len(adopted)], record.tokens))
                    self._restored.append((path, record.tokens))
        finally:  # whatever happens, each slot says what its sequence holds
            for seq, tokens in reversed(adopted):  # the most recently used file last
                engine.adopt_slot(seq, tokens)
        if adopted:
            elapsed = (time.monotonic() - start) * 1000
            count = sum(len(tokens) for _, tokens in adopted)
            self._log(
                f"prompt cache: restored {len(adopted)} sequence(s), {count} tokens, "
                f"in {elapsed:.0f} ms"
            )
        return len(adopted)

    def _restore_costs(self, engine: Engine) -> None:
        """Hand the engine what earlier workers of this key measured of short prompt chunks
        (``runner/prefill.py``), so that a restored conversation's next turn is evaluated
        the cheaper way at once; a malformed file is discarded with a log line."""
        data = self.dir.read_costs(self.key)
        if data is None:
            return
        try:
            engine.short_chunks = ShortChunks.from_json(json.loads(data))
        except ValueError as exc:  # json's errors included
            self._log(f"prompt cache: discarded the costs file: {exc}")
            self.dir.discard_costs(self.key)

    def _set(self, engine: Engine, seq: int, record: KVRecord) -> bool:
        """Put the record's state into the empty sequence ``seq``; on any failure the
        sequence is left empty and a refused file discarded."""
        try:
            accepted = engine.ctx.set_seq_state(seq, record.state)
        except BaseException:
            engine.ctx.seq_rm(seq, -1, -1)
            raise
        if not accepted:
            self._log(f"prompt cache: discarded {record.path.name}: llama.cpp refused it")
            self.dir.discard(record.path)
        return accepted

    def _read(self, path: Path, engine: Engine) -> KVRecord | None:
        try:
            return self.dir.read(
                path, self.key, max_tokens=engine.n_ctx, n_vocab=engine.model.n_vocab
            )
        except KVFileError as exc:
            self._log(f"prompt cache: discarded {path.name}: {exc}")
        except OSError as exc:
            self._log(f"prompt cache: discarded {path.name}: unreadable: {exc}")
        self.dir.discard(path)
        return None

    # -- on a graceful stop ------------------------------------------------------------

    def save(self, engine: Engine) -> int:
        """Write every idle text slot worth keeping (most recently used first, none that
        another one extends), drop the files read back at load that a saved slot now
        extends, and bound the directory; returns how many files the slots are in."""
        start = time.monotonic()
        deadline = start + SAVE_SECONDS
        kept: list[list[int]] = []
        paths: list[Path] = []
        written = 0
        for seq, tokens in engine.resting_slots():
            if len(tokens) < MIN_TOKENS or any(_is_prefix(tokens, other) for other in kept):
                continue
            if time.monotonic() > deadline:
                self._log("prompt cache: out of time; the older sequences are not saved")
                break
            path = self.dir.path(self.key, tokens)
            if path.exists():  # read back at load and unchanged since
                kept.append(tokens)
                paths.append(path)
                continue
            try:
                saved = self.dir.write(self.key, tokens, engine.ctx.seq_state(seq), deadline)
            except OSError as exc:
                self._log(f"prompt cache: could not save sequence {seq}: {exc}")
                continue
            if saved is not None:
                kept.append(tokens)
                paths.append(saved)
                written += 1
        if kept:  # what this worker measured, for the next one to read back with them
            costs = json.dumps(engine.short_chunks.to_json()).encode()
            try:
                self.dir.write_costs(self.key, costs)
            except (OSError, ValueError) as exc:
                self._log(f"prompt cache: could not keep the costs: {exc}")
        for order, path in enumerate(reversed(paths)):  # the most recently used the newest
            self.dir.touch(path, order)
        for path, restored in self._restored:
            if any(_is_prefix(restored, t) and t != restored for t in kept):
                self.dir.discard(path)  # a saved slot holds it and more
        self.dir.evict()
        if kept:
            elapsed = (time.monotonic() - start) * 1000
            self._log(
                f"prompt cache: saved {len(kept)} sequence(s) ({written} written, the rest "
                f"unchanged) in {elapsed:.0f} ms"
            )
        return len(kept)
