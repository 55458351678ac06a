"""The prompt cache's files (``store/kvcache.py``) and the worker's use of them
(``runner/kvstate.py``), in process: no shared library is loaded.

The file checks: a round trip keeps the tokens and the state; a flipped byte, a cut or
padded file, another magic, version or key, too many tokens, a token outside the vocabulary
and a file over the bound are each refused with their reason; files and directory are
private; a write past its deadline or over the bound leaves nothing; the bound evicts the
least recently used files and stale temporary ones. Then the real engine over a fake
context: a save keeps idle text slots worth keeping (not short ones, not one another
extends), a restore fills empty slots newest last so the next request reuses its prefix,
and a file that fails a check or that llama.cpp refuses is discarded with a log line.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pollama.runner.base import CompletionChunk, CompletionRequest, SamplingOptions
from pollama.store.kvcache import (
    HEADER_SIZE,
    KVCacheDir,
    KVFileError,
    cache_key,
    file_identity,
)

KEY = cache_key({"model": "sha256:" + "a" * 64, "n_ctx": 128})
OTHER = cache_key({"model": "sha256:" + "a" * 64, "n_ctx": 256})
FAR = time.monotonic() + 3600


def _dir(tmp_path: Path, max_bytes: int = 1 << 20) -> KVCacheDir:
    cache = KVCacheDir(tmp_path / "kvcache", max_bytes)
    cache.ensure()
    return cache


def _write(cache: KVCacheDir, tokens: list[int], state: bytes = b"state" * 10) -> Path:
    path = cache.write(KEY, tokens, state, FAR)
    assert path is not None
    return path


def _read(cache: KVCacheDir, path: Path, key: bytes = KEY, max_tokens: int = 128) -> Any:
    return cache.read(path, key, max_tokens=max_tokens, n_vocab=100)


def test_a_file_reads_back_what_was_written_and_is_private(tmp_path: Path) -> None:
    cache = _dir(tmp_path)
    path = _write(cache, [1, 2, 3, 99], b"\x00\x01state")
    record = _read(cache, path)
    assert record.tokens == [1, 2, 3, 99] and bytes(record.state) == b"\x00\x01state"
    assert path == cache.path(KEY, [1, 2, 3, 99]) and path.parent == cache.root
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.root.stat().st_mode) == 0o700
    assert os.listdir(cache.root) == [path.name]  # no temporary file left


def test_an_existing_open_directory_is_made_private(tmp_path: Path) -> None:
    root = tmp_path / "kvcache"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    KVCacheDir(root, 1 << 20).ensure()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def _damaged(tmp_path: Path, damage: Any) -> str:
    cache = _dir(tmp_path)
    path = _write(cache, [5, 6, 7, 8])
    data = bytearray(path.read_bytes())
    data = damage(data)
    path.write_bytes(bytes(data))
    with pytest.raises(KVFileError) as info:
        _read(cache, path)
    return str(info.value)


def _flip(at: int) -> Any:
    def flip(data: bytearray) -> bytearray:
        data[at] ^= 0xFF
        return data

    return flip


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_flip(-1), "checksum mismatch"),  # the state
        (_flip(HEADER_SIZE), "checksum mismatch"),  # a token
        (_flip(HEADER_SIZE - 1), "checksum mismatch"),  # the checksum itself
        (_flip(0), "bad magic"),
        (_flip(8), "format version"),
        (_flip(12), "another model or other load options"),
        (lambda d: d[:-3], "truncated or padded"),
        (lambda d: d + b"xyz", "truncated or padded"),
        (lambda d: d[:40], "truncated"),
        (lambda d: bytearray(), "truncated (0 bytes)"),
    ],
)
def test_a_damaged_file_is_refused_with_its_reason(
    tmp_path: Path, damage: Any, reason: str
) -> None:
    assert reason in _damaged(tmp_path, damage)


def test_header_counts_are_checked_before_anything_is_believed(tmp_path: Path) -> None:
    cache = _dir(tmp_path)
    path = _write(cache, list(range(20)))
    with pytest.raises(KVFileError, match="20 tokens, outside 1..10"):
        _read(cache, path, max_tokens=10)
    with pytest.raises(KVFileError, match="another model"):
        _read(cache, path, key=OTHER)
    big = _write(cache, [1, 2, 150])  # token 150 is outside a vocabulary of 100
    with pytest.raises(KVFileError, match="outside the vocabulary"):
        _read(cache, big)
    smaller = KVCacheDir(cache.root, 64)  # the bound was lowered since
    with pytest.raises(KVFileError, match="over the cache's bound"):
        _read(smaller, path)


def test_a_symlink_is_never_followed(tmp_path: Path) -> None:
    cache = _dir(tmp_path)
    real = _write(cache, [1, 2])
    link = cache.path(KEY, [3, 4])
    link.symlink_to(real)
    with pytest.raises(OSError):
        _read(cache, link)


def test_a_write_over_the_bound_or_past_its_deadline_leaves_nothing(tmp_path: Path) -> None:
    cache = _dir(tmp_path, max_bytes=200)
    assert cache.write(KEY, [1, 2], b"x" * 500, FAR) is None
    roomy = _dir(tmp_path)
    assert roomy.write(KEY, [1, 2], b"x" * 500, time.monotonic() - 1) is None
    assert roomy.write(KEY, [], b"x", FAR) is None and roomy.write(KEY, [1], b"", FAR) is None
    assert os.listdir(roomy.root) == []


def test_candidates_are_the_keys_files_most_recent_first(tmp_path: Path) -> None:
    cache = _dir(tmp_path)
    old = _write(cache, [1, 2])
    new = _write(cache, [3, 4])
    os.utime(old, (1_000, 1_000))
    other = cache.write(OTHER, [5, 6], b"s", FAR)
    (cache.root / "notes.txt").write_text("not ours")
    assert cache.candidates(KEY) == [new, old]
    assert other is not None and cache.candidates(OTHER) == [other]
    cache.touch(old)
    assert cache.candidates(KEY) == [old, new]


def test_the_bound_evicts_the_least_recently_used_first(tmp_path: Path) -> None:
    state = b"s" * 300
    probe = _dir(tmp_path / "probe")
    size = _write(probe, [1, 2, 3], state).stat().st_size
    cache = _dir(tmp_path, max_bytes=2 * size + 10)
    a, b = _write(cache, [1, 2, 3], state), _write(cache, [4, 5, 6], state)
    os.utime(a, (1_000, 1_000))
    os.utime(b, (2_000, 2_000))
    cache.touch(a)  # a was read back: now the most recently used
    c = _write(cache, [7, 8, 9], state)
    stale = cache.root / ".tmp-1-abc"
    stale.write_bytes(b"partial")
    os.utime(stale, (1_000, 1_000))
    fresh = cache.root / ".tmp-2-def"
    fresh.write_bytes(b"being written")
    assert cache.evict() == size
    assert sorted(os.listdir(cache.root)) == sorted([a.name, c.name, fresh.name])
    assert cache.evict() == 0


def test_identity_and_key() -> None:
    digest = "b" * 64
    assert file_identity(f"/models/blobs/sha256-{digest}") == f"sha256:{digest}"
    assert cache_key({"a": 1, "b": [2]}) == cache_key({"b": [2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2}) and len(KEY) == 32


def test_a_plain_file_is_named_by_path_size_and_time(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    first = file_identity(model)
    assert first.startswith(str(model.resolve())) and ":4:" in first
    model.write_bytes(b"GGUF changed")
    assert file_identity(model) != first


# -- the worker's side: the real engine over a fake context -----------------------------

N_VOCAB = 64
GREEDY = SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=3)


class _Batch:
    def __init__(self, capacity: int) -> None:
        self.rows: list[tuple[int, int, int]] = []
        self.n_tokens = 0

    def clear(self) -> None:
        self.rows.clear()
        self.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, output: bool) -> int:
        return self.add_run([token], pos, seq, output)

    def add_run(self, tokens: list[int], pos0: int, seq: int, output_last: bool) -> int:
        self.rows += [(t, pos0 + i, seq) for i, t in enumerate(tokens)]
        self.n_tokens = len(self.rows)
        return self.n_tokens - 1


class _Sampler:
    def add_greedy(self) -> None: ...
    def accept(self, token: int) -> None: ...
    def close(self) -> None: ...


class _Context:
    """Cells per sequence as (position, token); a sequence's state is its cells as JSON,
    which ``set_seq_state`` refuses unless ``accept``."""

    def __init__(self) -> None:
        self.cells: dict[int, list[tuple[int, int]]] = {}
        self.accept = True

    def decode(self, batch: _Batch) -> int:
        for token, pos, seq in batch.rows:
            self.cells.setdefault(seq, []).append((pos, token))
        return 0

    def logits(self, row: int) -> np.ndarray:
        logits = np.zeros(N_VOCAB, dtype=np.float32)
        logits[40 + row % 5] = 1.0
        return logits

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        self.cells[seq] = [(p, t) for p, t in self.cells.get(seq, []) if 0 <= p < p0]
        return True

    def can_shift(self) -> bool:
        return True

    def set_threads(self, *_: int) -> None: ...

    def seq_state(self, seq: int) -> bytearray:
        return bytearray(json.dumps(self.cells.get(seq, [])).encode())

    def set_seq_state(self, seq: int, state: memoryview) -> bool:
        if not self.accept:
            return False
        self.cells[seq] = [tuple(cell) for cell in json.loads(bytes(state))]  # type: ignore[misc]
        return True


class _Model:
    n_vocab = N_VOCAB
    add_bos = False

    def is_eog(self, token: int) -> bool:
        return False

    def token_to_piece(self, token: int) -> bytes:
        return b"x"

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return []  # no other spellings of a learned edit


@pytest.fixture
def make_engine(monkeypatch: pytest.MonkeyPatch) -> Any:
    fake = types.ModuleType("pollama.runner.llama")
    fake.Batch = _Batch  # type: ignore[attr-defined]
    fake.SamplerChain = _Sampler  # type: ignore[attr-defined]
    fake.DEFAULT_SEED = 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pollama.runner.llama", fake)
    from pollama.runner.engine import Engine

    def make(n_parallel: int = 2) -> Engine:
        return Engine(_Model(), _Context(), n_ctx=128, n_batch=64,  # type: ignore[arg-type]
                      n_parallel=n_parallel)

    return make


def _serve(engine: Any, prompts: list[list[int]]) -> list[CompletionChunk]:
    """Run the loop, answer ``prompts`` one after the other, stop the loop."""
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    finals: list[CompletionChunk] = []
    for i, prompt in enumerate(prompts):
        done = threading.Event()

        def emit(event: Any, done: threading.Event = done) -> bool:
            if not isinstance(event, CompletionChunk) or event.done:
                finals.append(event)
                done.set()
            return True

        engine.submit(i, CompletionRequest(tokens=prompt, options=GREEDY), emit)
        assert done.wait(10)
    engine.stop()
    thread.join(10)
    return finals


def _kv_names(tmp_path: Path) -> list[str]:
    """The sequence files (beside them: the costs file, ``runner/prefill.py``)."""
    return sorted(path.name for path in (tmp_path / "kvcache").glob("*.kv"))


def _cache(tmp_path: Path, log: list[str]) -> Any:
    from pollama.runner.kvstate import PromptCache

    cache = PromptCache.open(str(tmp_path / "kvcache"), 1 << 20, {"model": "m"}, log.append)
    assert cache is not None
    return cache


def test_a_saved_slot_is_read_back_and_reused_by_prefix(
    make_engine: Any, tmp_path: Path
) -> None:
    long_a, long_b = list(range(1, 40)), list(range(2, 50))
    short = [7, 8, 9]
    log: list[str] = []
    first = make_engine(n_parallel=3)
    _serve(first, [long_a, long_b, short])
    cache = _cache(tmp_path, log)
    assert cache.save(first) == 2  # the short slot is not worth a file
    assert len(_kv_names(tmp_path)) == 2

    second = make_engine(n_parallel=3)
    assert _cache(tmp_path, log).restore(second) == 2
    held = {tuple(slot.tokens[: len(long_b)]) for slot in second.slots if slot.tokens}
    assert held == {tuple(long_a + first.slots[0].tokens[len(long_a):])[: len(long_b)],
                    tuple(long_b)}
    newest = max(second.slots, key=lambda slot: slot.last_used)
    assert newest.tokens[: len(long_b)] == long_b  # b was used last, before the unload
    assert second.ctx.cells[newest.seq] == first.ctx.cells[1]  # type: ignore[attr-defined]
    final = _serve(second, [long_b + [60, 61]])[0]
    assert final.prompt_cached == len(long_b)
    assert any("restored 2 sequence(s)" in line for line in log)


def test_a_slot_another_one_extends_is_not_saved_and_its_old_file_goes(
    make_engine: Any, tmp_path: Path
) -> None:
    log: list[str] = []
    prompt = list(range(1, 40))
    first = make_engine(n_parallel=1)
    _serve(first, [prompt])
    _cache(tmp_path, log).save(first)
    (old,) = _kv_names(tmp_path)

    second = make_engine(n_parallel=1)
    cache = _cache(tmp_path, log)
    assert cache.restore(second) == 1
    _serve(second, [second.slots[0].tokens + [50, 51, 52]])  # the conversation goes on
    assert cache.save(second) == 1
    (new,) = _kv_names(tmp_path)
    assert new != old  # the longer sequence replaced the one it extends

    third = make_engine(n_parallel=1)
    again = _cache(tmp_path, log)
    again.restore(third)
    assert again.save(third) == 1 and _kv_names(tmp_path) == [new]  # unchanged


def test_a_bad_or_refused_file_is_discarded_with_a_log_line(
    make_engine: Any, tmp_path: Path
) -> None:
    log: list[str] = []
    first = make_engine(n_parallel=2)
    _serve(first, [list(range(1, 40)), list(range(3, 45))])
    _cache(tmp_path, log).save(first)
    bad, good = sorted((tmp_path / "kvcache").glob("*.kv"))
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0x01
    bad.write_bytes(bytes(data))

    second = make_engine(n_parallel=2)
    assert _cache(tmp_path, log).restore(second) == 1
    assert any(f"discarded {bad.name}: checksum mismatch" in line for line in log)
    assert not bad.exists() and good.exists()
    assert sum(1 for slot in second.slots if slot.tokens) == 1

    third = make_engine(n_parallel=2)
    third.ctx.accept = False
    assert _cache(tmp_path, log).restore(third) == 0
    assert any(f"discarded {good.name}: llama.cpp refused it" in line for line in log)
    assert not good.exists() and all(not slot.tokens for slot in third.slots)


def test_what_a_worker_measured_of_short_chunks_goes_to_the_next_one(
    make_engine: Any, tmp_path: Path
) -> None:
    log: list[str] = []
    first = make_engine(n_parallel=1)
    _serve(first, [list(range(1, 40))])
    first.short_chunks.record(1, 900, 0.01)  # a one-row decode at depth 900
    first.short_chunks.record(25, 900, 0.25)  # 10 ms each further row of a short chunk
    first.short_chunks.record(64, 900, 0.12)  # a tile there
    _cache(tmp_path, log).save(first)
    (costs,) = (tmp_path / "kvcache").glob("*.costs")
    assert stat.S_IMODE(costs.stat().st_mode) == 0o600

    second = make_engine(n_parallel=1)
    assert second.short_chunks.rows_back(25, 900) == 0  # nothing measured yet
    assert _cache(tmp_path, log).restore(second) == 1
    assert second.short_chunks.to_json() == first.short_chunks.to_json()
    assert second.short_chunks.rows_back(25, 900) == 39  # a tile at once


@pytest.mark.parametrize(
    "content",
    [b"{", b"[]", b'{"one": {"10": -1}}', b'{"extra": {"x": 0.1}}', b'{"other": {}}',
     b'{"one": {"10": NaN}}', b'{"tile": {"10": true}}', b'{"scaled": {"99": 0.1}}'],
)
def test_a_malformed_costs_file_is_discarded_with_a_log_line(
    make_engine: Any, tmp_path: Path, content: bytes
) -> None:
    log: list[str] = []
    first = make_engine(n_parallel=1)
    _serve(first, [list(range(1, 40))])
    _cache(tmp_path, log).save(first)
    (costs,) = (tmp_path / "kvcache").glob("*.costs")
    costs.write_bytes(content)
    second = make_engine(n_parallel=1)
    assert _cache(tmp_path, log).restore(second) == 1  # the sequences are still read back
    assert any("discarded the costs file" in line for line in log)
    assert not costs.exists() and second.short_chunks.to_json() == {
        "one": {}, "extra": {}, "tile": {}, "scaled": {}}  # fmt: skip


def test_a_costs_file_goes_with_the_last_sequence_of_its_key(tmp_path: Path) -> None:
    cache = KVCacheDir(tmp_path, 1 << 20)
    cache.ensure()
    key, other = b"k" * 32, b"o" * 32
    cache.write_costs(key, b"{}")
    cache.write_costs(other, b"{}")
    cache.write(key, [1, 2, 3], b"state", time.monotonic() + 10)
    cache.evict()
    assert cache.read_costs(key) == b"{}" and cache.read_costs(other) is None
    with pytest.raises(ValueError):
        cache.write_costs(key, b" " * 20000)
    big = tmp_path / f"{key.hex()[:32]}.costs"
    big.write_bytes(b" " * 20000)
    assert cache.read_costs(key) is None and not big.exists()  # too big: discarded
    os.mkfifo(big)  # a pipe in its place: no wait for a writer, discarded
    assert cache.read_costs(key) is None and not big.exists()
    big.symlink_to(tmp_path / "elsewhere")  # a link: not followed, discarded
    (tmp_path / "elsewhere").write_bytes(b"{}")
    assert cache.read_costs(key) is None and not big.is_symlink()
    big.mkdir()  # a directory: refused, and no error
    assert cache.read_costs(key) is None


def test_the_cache_is_off_at_zero_bytes(tmp_path: Path) -> None:
    from pollama.runner.kvstate import PromptCache

    assert PromptCache.open(str(tmp_path / "kvcache"), 0, {}, print) is None
    assert not (tmp_path / "kvcache").exists()
