"""The engine's KV positions (``runner/engine.py``), checked against a fake llama.cpp context.

The fake context keeps each sequence's cells as llama.cpp's KV cache does (a position, and
what the cell holds), cuts them by position (``seq_rm``) and refuses, as llama.cpp does for
M-RoPE models, a token whose position is not past every cell of its sequence. No shared
library is loaded: a stand-in ``pollama.runner.llama`` gives the engine numpy batches.

What these prove: for an ordinary model every entry sits at its index (nothing changed); for
an M-RoPE model an image's rows share the positions from its start, the text after it
continues ``n_pos`` later, and a cached prefix is cut at a position, so that after every
request the KV holds exactly ``slot.tokens``. A context shift (a window of 128 here) keeps
``num_keep`` entries, drops half of the rest and moves the others back, so positions stay
the indexes and the window never overflows; a request that shifted leaves only its kept
prefix for the next one; a slot with media, a cache that cannot shift or ``shift`` off end
with ``length`` at the window instead. Drafts of speculative decoding (a fake model that
mostly repeats itself) go into the cells after the pending token and the ones not kept are
cut: the output is the same as without drafting, and so is what the KV holds.
"""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from pollama.runner.base import CompletionChunk, CompletionRequest, SamplingOptions
from pollama.runner.engine import Engine
from pollama.runner.prefill import ShortChunks

N_VOCAB = 64
EOG = 2
ROW = "row"
GREEDY = SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=3)


class _Batch:
    """``llama.Batch`` without ctypes: the same numpy rows."""

    def __init__(self, capacity: int) -> None:
        self.token = np.zeros(capacity, dtype=np.int64)
        self.pos = np.zeros(capacity, dtype=np.int64)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, output: bool) -> int:
        return self.add_run([token], pos, seq, output)

    def add_run(self, tokens: list[int], pos0: int, seq: int, output_last: bool) -> int:
        i, end = self.n_tokens, self.n_tokens + len(tokens)
        self.token[i:end] = tokens
        self.pos[i:end] = np.arange(pos0, pos0 + len(tokens))
        self.seq[i:end] = seq
        self.n_tokens = end
        return end - 1


class _Sampler:
    def add_greedy(self) -> None: ...
    def accept(self, token: int) -> None: ...
    def close(self) -> None: ...


class _Context:
    """Cells per sequence: (position, token id or :data:`ROW`), llama.cpp's M-RoPE rule,
    at most ``capacity`` cells per sequence (a decode past it would overflow the window)."""

    def __init__(self, capacity: int = 128, shiftable: bool = True) -> None:
        self.cells: dict[int, list[tuple[int, Any]]] = {}
        self.cuts: list[int] = []
        self.shifts: list[tuple[int, int, int]] = []
        self.decodes = 0
        self.capacity = capacity
        self.shiftable = shiftable

    def _append(self, seq: int, pos: int, what: Any, *, embedding: bool) -> None:
        cells = self.cells.setdefault(seq, [])
        last = max((p for p, _ in cells), default=-1)
        assert pos > last or (embedding and pos >= last), (pos, last)
        assert len(cells) < self.capacity, "the window overflowed"
        cells.append((pos, what))

    def decode(self, batch: _Batch) -> int:
        for i in range(batch.n_tokens):
            self._append(int(batch.seq[i]), int(batch.pos[i]), int(batch.token[i]),
                         embedding=False)
        self.decodes += 1
        return 0

    def decode_embeddings(self, rows: Any, positions: Any, seq: int, **_: Any) -> int:
        first = (np.full(len(rows), positions) + np.arange(len(rows))
                 if isinstance(positions, int) else positions[0])
        for pos in first:
            self._append(seq, int(pos), ROW, embedding=True)
        self.decodes += 1
        return 0

    def logits(self, row: int) -> np.ndarray:
        logits = np.zeros(N_VOCAB, dtype=np.float32)
        logits[10 + self.decodes % 7] = 1.0
        return logits

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        """llama.cpp's range: [p0, p1), p0 < 0 from the start, p1 < 0 to the end."""
        self.cuts.append(p0)
        self.cells[seq] = [(p, w) for p, w in self.cells.get(seq, [])
                           if (p0 >= 0 and p < p0) or (p1 >= 0 and p >= p1)]
        return True

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        assert self.shiftable, "seq_add on a cache that cannot shift"
        self.shifts.append((p0, p1, delta))
        self.cells[seq] = [(p + delta if p0 <= p < p1 else p, w)
                           for p, w in self.cells.get(seq, [])]

    def can_shift(self) -> bool:
        return self.shiftable

    def set_threads(self, *_: int) -> None: ...


class _Model:
    n_vocab = N_VOCAB
    add_bos = False

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def token_to_piece(self, token: int) -> bytes:
        return b"x"

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return []  # no other spellings of a learned edit


@dataclass
class _Span:
    """What the engine reads of ``media.MediaSpan``."""

    start: int
    n_tokens: int
    key: int
    n_pos: int
    kind: str = "image"
    non_causal: bool = False
    chunk: Any = None
    embeddings: Any = None
    error: str = ""
    queued: bool = False

    @property
    def end(self) -> int:
        return self.start + self.n_tokens


class _Projector:
    """Prompts are token ids and ``I`` (an image of 6 rows on 3 positions, M-RoPE style:
    every row's first section is the image's first position)."""

    ROWS, N_POS, KEY = 6, 3, -77

    def tokenize(self, prompt: str, media: Any, add_special: bool) -> tuple[list[int], list]:
        tokens: list[int] = []
        spans = []
        for word in prompt.split():
            if word == "I":
                spans.append(_Span(len(tokens), self.ROWS, self.KEY, self.N_POS))
                tokens += [self.KEY] * self.ROWS
            else:
                tokens.append(int(word))
        return tokens, spans

    def encode(self, span: _Span) -> np.ndarray:
        return np.zeros((span.n_tokens, 4), dtype=np.float32)

    def positions(self, span: _Span, pos0: int) -> np.ndarray:
        rows = np.arange(span.n_tokens)
        return np.stack([np.full(span.n_tokens, pos0), pos0 + rows // 3, pos0 + rows % 3,
                         np.zeros(span.n_tokens, dtype=np.int64)]).astype(np.int32)

    def release(self, span: _Span) -> None: ...


@pytest.fixture(name="engine")
def engine_fixture(monkeypatch: pytest.MonkeyPatch) -> Any:
    fake = types.ModuleType("pollama.runner.llama")
    fake.Batch = _Batch  # type: ignore[attr-defined]
    fake.SamplerChain = _Sampler  # type: ignore[attr-defined]
    fake.DEFAULT_SEED = 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pollama.runner.llama", fake)

    def make(projector: Any = None, shiftable: bool = True, context: Any = None,
             n_ctx: int = 128, n_batch: int = 16, costs: Any = None,
             n_parallel: int = 1) -> Engine:  # fmt: skip
        """``costs``: what the engine starts from of short chunks (``runner/prefill.py``),
        as after a prompt cache's restore, before its loop runs."""
        context = context or _Context(shiftable=shiftable)
        engine = Engine(_Model(), context, n_ctx=n_ctx, n_batch=n_batch,  # type: ignore[arg-type]
                        n_parallel=n_parallel, projector=projector)
        if costs is not None:
            engine.short_chunks = ShortChunks.from_json(costs)
        thread = threading.Thread(target=engine.run, daemon=True)
        thread.start()
        made.append((engine, thread))
        return engine

    made: list[tuple[Engine, threading.Thread]] = []
    yield make
    for engine, thread in made:
        engine.stop()
        thread.join(10)


def _run(engine: Engine, request: CompletionRequest) -> CompletionChunk:
    return _run_together(engine, [request])[0]


def _kv(engine: Engine) -> list[tuple[int, Any]]:
    return engine.ctx.cells.get(0, [])  # type: ignore[attr-defined]


def _held(engine: Engine) -> list[Any]:
    return [ROW if t < 0 else t for t in engine.slots[0].tokens]


def test_an_ordinary_models_entries_sit_at_their_indexes(engine: Any) -> None:
    eng = engine()
    prompt = [1, 20, 21, 22, 23]
    first = _run(eng, CompletionRequest(tokens=prompt, options=GREEDY, return_tokens=True))
    assert first.tokens is not None
    assert [p for p, _ in _kv(eng)] == list(range(len(_kv(eng))))
    follow = _run(eng, CompletionRequest(tokens=prompt + [30, 31], options=GREEDY))
    assert follow.prompt_cached == len(prompt)
    assert eng.ctx.cuts == [len(prompt)]  # type: ignore[attr-defined]
    assert [p for p, _ in _kv(eng)] == list(range(len(_kv(eng))))
    assert [w for _, w in _kv(eng)] == _held(eng)
    assert eng.slots[0].lag == 0


def test_text_after_an_m_rope_image_continues_after_its_positions(engine: Any) -> None:
    eng = engine(_Projector())
    media = (b"image",)
    first = _run(eng, CompletionRequest(prompt="1 20 I 21 22", media=media, options=GREEDY))
    assert first.prompt_eval_count == 2 + 6 + 2
    # text 0, 1; the image's rows all at 2 (first section); then 5, 6 and the answer on
    expected = [0, 1] + [2] * 6 + list(range(5, 5 + 2 + 2))
    assert [p for p, _ in _kv(eng)] == expected
    assert [w for _, w in _kv(eng)] == _held(eng)
    assert eng.slots[0].lag == 3
    # A follow-up that shares the image and one token after it: cut at that token's
    # position (6), not at its index (9).
    follow = _run(eng, CompletionRequest(prompt="1 20 I 21 40 41", media=media,
                                         options=GREEDY))
    assert follow.prompt_cached == 9
    assert eng.ctx.cuts == [6]  # type: ignore[attr-defined]
    assert [p for p, _ in _kv(eng)] == [0, 1] + [2] * 6 + list(range(5, 5 + 3 + 2))
    assert [w for _, w in _kv(eng)] == _held(eng)
    # A prompt that leaves the image: the cut drops it and the slot's lag with it.
    _run(eng, CompletionRequest(prompt="1 20 50", media=media, options=GREEDY))
    assert eng.ctx.cuts[-1] == 2  # type: ignore[attr-defined]
    assert eng.slots[0].lag == 0
    assert [p for p, _ in _kv(eng)] == list(range(len(_kv(eng))))


LONG = SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=300)


def _positions_are_indexes(engine: Engine) -> None:
    assert [p for p, _ in _kv(engine)] == list(range(len(_kv(engine))))
    assert [w for _, w in _kv(engine)] == _held(engine)


def test_a_full_window_shifts_and_generation_goes_on(engine: Any) -> None:
    eng = engine()
    prompt = list(range(20, 30))
    done = _run(eng, CompletionRequest(tokens=prompt, options=LONG))
    assert (done.done_reason, done.eval_count) == ("length", 300)
    # 10 + 299 decoded entries in a window of 128: keep 4, drop (128 - 4) // 2 = 62 a time
    assert eng.ctx.shifts[0] == (4 + 62, 128, -62)  # type: ignore[attr-defined]
    assert done.context_shifted == 62 * len(eng.ctx.shifts) >= 3 * 62  # type: ignore[attr-defined]
    # the slot keeps only the prefix no dropped token ever preceded
    assert eng.slots[0].tokens == prompt[:4]
    _positions_are_indexes(eng)
    again = _run(eng, CompletionRequest(tokens=prompt, options=GREEDY))
    assert again.prompt_cached == 4 and again.context_shifted == 0
    _positions_are_indexes(eng)


def test_num_keep_minus_one_keeps_the_prompt_and_drops_at_least_one(engine: Any) -> None:
    eng = engine()
    prompt = [20 + i % 40 for i in range(127)]  # keeping all of it leaves one entry to drop
    opts = SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=5, num_keep=-1)
    done = _run(eng, CompletionRequest(tokens=prompt, options=opts))
    assert (done.done_reason, done.eval_count) == ("length", 5)
    # 4 of the 5 tokens decoded, the first into the last free cell: 3 shifts of one entry
    assert done.context_shifted == len(eng.ctx.shifts) == 3  # type: ignore[attr-defined]
    assert eng.slots[0].tokens == prompt
    _positions_are_indexes(eng)


def test_infinite_generation_is_bounded_to_ten_windows(engine: Any) -> None:
    eng = engine()
    opts = SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=-1)
    done = _run(eng, CompletionRequest(tokens=[20, 21, 22], options=opts))
    assert (done.done_reason, done.eval_count) == ("length", 10 * 128)
    assert done.context_shifted > 0


@pytest.mark.parametrize("why", ["asked", "cache", "media"])
def test_without_a_shift_a_full_window_ends_with_length(engine: Any, why: str) -> None:
    eng = engine(_Projector() if why == "media" else None, shiftable=why != "cache")
    request = CompletionRequest(tokens=list(range(20, 30)), options=LONG, shift=why != "asked")
    if why == "media":
        request = CompletionRequest(prompt="1 20 I 21 22", media=(b"image",), options=LONG)
    done = _run(eng, request)
    assert (done.done_reason, done.context_shifted) == ("length", 0)
    assert done.eval_count == 128 + 1 - done.prompt_eval_count  # the last one never decoded
    assert eng.ctx.shifts == []  # type: ignore[attr-defined]
    assert [w for _, w in _kv(eng)] == _held(eng)


class _Repeating(_Context):
    """A model whose next token depends on each row's own token and position: mostly a
    cycle through 20..39 (so drafts from its own output are right), but 41 at every 13th
    position (so some drafts are wrong)."""

    def decode(self, batch: _Batch) -> int:
        self.rows = [(int(batch.token[i]), int(batch.pos[i])) for i in range(batch.n_tokens)]
        return super().decode(batch)

    def logits(self, row: int) -> np.ndarray:
        token, pos = self.rows[row]
        logits = np.zeros(N_VOCAB, dtype=np.float32)
        logits[41 if pos % 13 == 0 else 20 + (token * 7 + 3) % 20] = 1.0
        return logits


@pytest.fixture
def cheap_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows cost almost nothing, so every draft found is verified whole."""
    from pollama.runner import ngram

    monkeypatch.setattr(ngram.StepCosts, "time", lambda self, rows: 1.0 + 0.01 * rows)


def _greedy(n: int, draft: int) -> SamplingOptions:
    return SamplingOptions(temperature=0, repeat_penalty=1.0, num_predict=n,
                           draft_num_predict=draft)


@pytest.mark.usefixtures("cheap_rows")
@pytest.mark.parametrize("n", [5, 60, 300])
def test_drafts_change_nothing_but_the_number_of_decodes(engine: Any, n: int) -> None:
    prompt = [20, 23, 30, 21, 20, 23]
    outputs = {}
    for draft in (0, 8):
        eng = engine(context=_Repeating())
        done = _run(eng, CompletionRequest(tokens=prompt, options=_greedy(n, draft),
                                           return_tokens=True))
        assert (done.done_reason, done.eval_count) == ("length", n)
        outputs[draft] = (done.tokens, done.context_shifted, eng.ctx.decodes)  # type: ignore[attr-defined]
        _positions_are_indexes(eng)  # the cells of drafts not kept were cut
        if draft == 0:
            assert done.draft_tokens == done.draft_accepted == 0
        elif n > 5:
            assert 0 < done.draft_accepted < done.draft_tokens  # kept some, not all
    (plain, shifted, decodes), (drafted, shifted_d, decodes_d) = outputs[0], outputs[8]
    assert drafted == plain and shifted_d == shifted
    if n == 300:
        assert shifted > 0  # drafts never reach past the window: the fake would overflow
        assert decodes_d < decodes / 2


@pytest.mark.usefixtures("cheap_rows")
def test_a_draft_never_reaches_past_the_window_without_a_shift(engine: Any) -> None:
    prompt = [20, 23, 30, 21, 20, 23]
    eng = engine(context=_Repeating())
    done = _run(eng, CompletionRequest(tokens=prompt, options=_greedy(300, 8), shift=False))
    assert done.done_reason == "length" and done.eval_count == 128 + 1 - len(prompt)
    assert done.draft_accepted > 0
    _positions_are_indexes(eng)


def test_no_copy_is_looked_up_where_no_draft_could_pay(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row costs a whole step: even a draft kept whole yields its tokens in as many
    steps' time, so none can pay (``StepCosts.longest_that_may_pay`` is 0), and the engine
    neither looks a copy up nor learns from one (at many streams on a CPU: a weighing pass
    a row for nothing). The output is the same."""
    from pollama.runner import ngram

    monkeypatch.setattr(ngram.StepCosts, "time", lambda self, rows: float(rows))
    lookups: list[int] = []
    real_lookup = Engine._lookup
    monkeypatch.setattr(Engine, "_lookup", lambda self, job, limit: (
        lookups.append(limit), real_lookup(self, job, limit))[1])
    prompt = [20, 23, 30, 21, 20, 23]
    outputs = []
    for draft in (0, 8):
        done = _run(engine(context=_Repeating()),
                    CompletionRequest(tokens=prompt, options=_greedy(60, draft),
                                      return_tokens=True))
        outputs.append(done.tokens)
        assert done.draft_tokens == 0
    assert lookups == [] and outputs[0] == outputs[1]


def test_the_index_catches_up_when_drafts_pay_again(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are dear while two streams decode and cheap for one (as on a CPU at many
    streams, then alone): the long request looks nothing up beside the short one, then
    drafts from its whole output, and its tokens are those it makes without drafting."""
    from pollama.runner import ngram

    monkeypatch.setattr(ngram.StepCosts, "time", lambda self, rows: (
        float(rows) if self._reference > 1 else 1.0 + 0.01 * rows))
    prompt = [20, 23, 30, 21, 20, 23]
    outputs = []
    for draft in (0, 8):
        eng = engine(context=_Repeating(), n_parallel=2)
        short = CompletionRequest(tokens=[25, 26], options=_greedy(20, draft))
        long = CompletionRequest(tokens=prompt, options=_greedy(80, draft), return_tokens=True)
        finals = _run_together(eng, [short, long])
        assert finals[0].eval_count == 20 and finals[1].eval_count == 80
        outputs.append(finals[1])
    plain, drafted = outputs
    assert drafted.tokens == plain.tokens
    assert plain.draft_tokens == 0 and drafted.draft_accepted > 20


def _run_together(engine: Engine, requests: list[CompletionRequest]) -> list[CompletionChunk]:
    """Submit ``requests`` at once; their final chunks, in order."""
    finals: dict[int, Any] = {}
    done = threading.Event()

    def emitter(i: int) -> Any:
        def emit(event: Any) -> bool:
            if not isinstance(event, CompletionChunk) or event.done:
                finals[i] = event
                if len(finals) == len(requests):
                    done.set()
            return True

        return emit

    for i, request in enumerate(requests):
        engine.submit(i, request, emitter(i))
    assert done.wait(10)
    assert all(isinstance(finals[i], CompletionChunk) for i in finals), finals
    return [finals[i] for i in range(len(requests))]


class _Copying(_Context):
    """A model that follows each row's token with its successor in :attr:`NEXT` (11
    otherwise), so that it copies a prompt holding that chain."""

    NEXT = {20: 21, 21: 22, 22: 23, 23: EOG}

    def decode(self, batch: _Batch) -> int:
        self.rows = [int(batch.token[i]) for i in range(batch.n_tokens)]
        return super().decode(batch)

    def logits(self, row: int) -> np.ndarray:
        logits = np.zeros(N_VOCAB, dtype=np.float32)
        logits[self.NEXT.get(self.rows[row], 11)] = 1.0
        return logits


@pytest.mark.usefixtures("cheap_rows")
def test_a_draft_ends_at_an_end_of_generation_token(engine: Any) -> None:
    """The prompt holds the answer, then an end of turn and more text (as a chat template
    does): the draft that copies it stops after that end, since nothing after it can be
    kept."""
    prompt = [20, 21, 22, 23, EOG, 30, 31, 32, 33, 34, 35, 36, 20, 21]
    done = _run(engine(context=_Copying()), CompletionRequest(
        tokens=prompt, options=_greedy(20, 8), return_tokens=True))
    assert done.done_reason == "stop" and done.tokens == [*prompt, 22, 23]
    # drafted [23, EOG], not 8 tokens; the end itself ends the request rather than being kept
    assert (done.draft_tokens, done.draft_accepted) == (2, 1)


def test_media_and_unshiftable_caches_never_draft(engine: Any) -> None:
    image = CompletionRequest(prompt="20 23 I 20 23", media=(b"image",), options=_greedy(30, 8))
    assert _run(engine(_Projector()), image).draft_tokens == 0
    text = CompletionRequest(tokens=[20, 23, 30, 20, 23], options=_greedy(30, 8))
    assert _run(engine(context=_Repeating(shiftable=False)), text).draft_tokens == 0
