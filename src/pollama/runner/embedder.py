"""Embedding batches: which tokens go into which forward pass, and the thread that runs them.

Pure Python (no ``llama_cpp``): the llama.cpp side is an :class:`EmbeddingBackend`
(``runner/llama.py`` ``EmbeddingContext``); tests drive a fake one.

How a request's inputs are packed (:func:`plan`):

* every input is its own sequence (seq id) and every token of it is an output row, as
  llama.cpp's pooled embeddings require;
* a *round* starts from an empty cache: inputs are added in order while the round holds at
  most ``n_seq_max`` sequences and its tokens fit the cache (``n_ctx`` cells); each input
  starts at an aligned cell, the gap filled by a filler sequence (:func:`plan`);
* a round is cut into *passes* (one ``llama_decode`` each) of at most ``n_batch`` tokens. An
  input may span passes only when the backend is ``splittable`` (causal attention with
  last-token pooling: the last pass sees the earlier tokens through the cache, and the pooled
  vector is the last token's). Otherwise (mean or CLS pooling, or bidirectional attention
  such as BERT's) a round is one pass holding whole inputs.

Reranking (a job with a ``query``) runs on the same plan: each input is then a document, and
its sequence is the pair the backend frames (:meth:`EmbeddingBackend.pair_frame`: the
query's tokens and the model's separators around the document's); a cross-encoder's pooled
"vector" is its classifier's scores for the pair. Truncation cuts the document, never the
query.

What must stay true: an input's vector does not depend on what else is in its batch. The
sequences of one pass never attend to each other (their seq ids differ), the cache is
cleared before every round, every input starts at an aligned cell, and the backend keeps
the arithmetic independent of the batch (flash attention off: see ``EmbeddingContext``).
Measured on SmolLM2 (Q4_1): without the alignment an input's normalized vector moved by up
to 0.009 per component with its neighbours; with it, not at all.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pollama.errors import ContextOverflow, InvalidRequest
from pollama.runner.base import EmbeddingResult

__all__ = [
    "FILLER",
    "EmbeddingBackend",
    "EmbeddingLoop",
    "Naming",
    "Piece",
    "fit_tokens",
    "plan",
    "run_plan",
]

log = logging.getLogger(__name__)


class EmbeddingBackend(Protocol):
    """A context in embedding mode. Used by one thread only (the :class:`EmbeddingLoop`'s)."""

    limit: int  # the most tokens one input may have
    n_batch: int  # tokens per forward pass
    n_seq_max: int  # sequence ids per round (one of them the filler's)
    n_ctx: int  # cache cells: the tokens of one round
    splittable: bool  # an input may span passes (see the module docstring)
    n_tail: int  # special tokens the tokenizer appends (EOS/SEP); kept when truncating
    align: int  # inputs start at multiples of it in the cache (see :func:`plan`)
    round_tokens: int  # the tokens a round of several inputs may hold (see :func:`plan`)
    pad_token: int  # the filler's token
    ranks: bool  # a cross-encoder (pooling type rank): it scores pairs, it has no embeddings

    def tokenize(self, text: str) -> list[int]:
        """The input's tokens, with the special tokens the model adds (BOS, SEP…)."""

    def pair_frame(self, query: str) -> tuple[list[int], list[int]]:
        """A cross-encoder's tokens before and after a document for this query: the pair's
        sequence is ``before + tokenize_text(document) + after``."""

    def tokenize_text(self, text: str) -> list[int]:
        """The text's tokens alone: no special tokens added, none parsed from the text."""

    def clear(self) -> None:
        """Empty the cache (a new round starts)."""

    def forward(
        self, pieces: Sequence[tuple[int, Sequence[int], int]], finished: Sequence[int]
    ) -> list[bytes]:
        """One forward pass of ``(seq, tokens, first position)`` pieces; returns the pooled
        vectors (little-endian float32) of the ``finished`` seq ids, in that order."""


FILLER = -1
"""The ``index`` of filler pieces (see :func:`plan`)."""


@dataclass(frozen=True)
class Piece:
    """Tokens ``[start, end)`` of input ``index`` (or of the round's filler sequence, index
    :data:`FILLER`), as sequence ``seq`` of its round."""

    index: int
    seq: int
    start: int
    end: int
    final: bool  # the input's last piece: its vector is read after this pass


def fit_tokens(
    tokens: list[int], limit: int, *, n_tail: int, truncate: bool, name: str = "the input"
) -> list[int]:
    """``tokens`` cut to ``limit``, keeping the ``n_tail`` special tokens at the end (an EOS
    or SEP that the model was trained to see last); :class:`ContextOverflow` naming both
    counts when ``truncate`` is off: Ollama's message, then the numbers."""
    if len(tokens) <= limit:
        return tokens
    if not truncate:
        raise ContextOverflow(
            f"the input length exceeds the context length: {name} has {len(tokens)} "
            f"tokens, the context holds {limit}"
        )
    tail = min(n_tail, limit - 1) if limit > 1 else 0
    return tokens[: limit - tail] + (tokens[len(tokens) - tail :] if tail else [])


def plan(
    lengths: Sequence[int],
    *,
    n_batch: int,
    n_seq_max: int,
    n_ctx: int,
    splittable: bool,
    align: int = 1,
    round_tokens: int = 0,
) -> list[list[list[Piece]]]:
    """Rounds of passes of pieces for inputs of these token ``lengths`` (see the module
    docstring). Every length must be 1 to the round capacity (``n_ctx`` when splittable,
    else ``min(n_ctx, n_batch)``); the caller truncated or refused longer inputs.

    ``align``: every input starts at a multiple of it in its round's token stream (so in the
    cache), the gaps filled by a filler sequence (seq id ``n_seq_max - 1``) whose vector is
    never read. The reductions inside attention run over cache cells in SIMD lanes, so an
    input at another offset gets different rounding, which a quantized model amplifies
    (see ``EmbeddingContext``); aligned, its arithmetic is the same in any company.

    ``round_tokens`` (0: no bound) bounds a round's tokens, except that a longer input still
    gets a round of its own: every token attends over all the cells of its round (masked or
    not), so a big round costs attention that a small one does not.
    """
    if n_batch < 1 or n_seq_max < 1 or n_ctx < 1 or align < 1:
        raise ValueError("n_batch, n_seq_max, n_ctx and align must be positive")
    capacity = n_ctx if splittable else min(n_ctx, n_batch)
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"input {i} has {n} tokens; a round holds 1 to {capacity}")
    shared = min(capacity, round_tokens) if round_tokens > 0 else capacity
    # One seq id is the filler's; with a single id, one input per round needs no filler.
    members_max = n_seq_max - 1 if align > 1 and n_seq_max > 1 else n_seq_max
    rounds: list[list[list[Piece]]] = []
    i = 0
    while i < len(lengths):
        segments: list[tuple[int, int]] = []  # (index or FILLER, tokens)
        used = 0
        members = 0
        while i < len(lengths) and members < members_max:
            start = -(-used // align) * align if align > 1 else used
            if members and start + lengths[i] > shared:
                break
            if start > used:
                segments.append((FILLER, start - used))
            segments.append((i, lengths[i]))
            used = start + lengths[i]
            members += 1
            i += 1
        rounds.append(_passes(segments, n_batch, filler_seq=n_seq_max - 1))
    return rounds


def _passes(segments: list[tuple[int, int]], n_batch: int, *, filler_seq: int) -> list[list[Piece]]:
    """Cut one round's token stream into passes of at most ``n_batch`` tokens. Inputs are
    seqs 0, 1, 2… in order; the filler's positions run on across its segments."""
    passes: list[list[Piece]] = [[]]
    room = n_batch
    seq = 0
    filler_pos = 0
    for index, length in segments:
        offset = filler_pos if index == FILLER else 0
        start = offset
        while start < offset + length:
            if room == 0:
                passes.append([])
                room = n_batch
            end = min(offset + length, start + room)
            if index == FILLER:
                passes[-1].append(Piece(FILLER, filler_seq, start, end, False))
            else:
                passes[-1].append(Piece(index, seq, start, end, end == length))
            room -= end - start
            start = end
        if index == FILLER:
            filler_pos += length
        else:
            seq += 1
    return passes


class Cancelled(Exception):
    """The job's requester went away; raised between passes."""


def run_plan(
    backend: EmbeddingBackend,
    tokens: Sequence[Sequence[int]],
    cancelled: Callable[[], bool] = lambda: False,
) -> list[bytes]:
    """Every input's vector, computed pass by pass as :func:`plan` says."""
    rounds = plan(
        [len(t) for t in tokens],
        n_batch=backend.n_batch,
        n_seq_max=backend.n_seq_max,
        n_ctx=backend.n_ctx,
        splittable=backend.splittable,
        align=backend.align,
        round_tokens=backend.round_tokens,
    )
    vectors: list[bytes | None] = [None] * len(tokens)
    for passes in rounds:
        backend.clear()
        for pieces in passes:
            if cancelled():
                raise Cancelled
            rows = [
                (
                    p.seq,
                    tokens[p.index][p.start : p.end]
                    if p.index != FILLER
                    else [backend.pad_token] * (p.end - p.start),
                    p.start,
                )
                for p in pieces
            ]
            finals = [p for p in pieces if p.final]
            out = backend.forward(rows, [p.seq for p in finals])
            for piece, vector in zip(finals, out, strict=True):
                vectors[piece.index] = vector
    backend.clear()  # leave no input's tokens in the cache
    assert all(v is not None for v in vectors)
    return [v for v in vectors if v is not None]


@dataclass(frozen=True)
class Naming:
    """How errors name a job's inputs: ``label`` and the index of its first input in the
    caller's request (a request is cut into several jobs: ``runner/process.py``)."""

    label: str = "input"  # "input", "document" or "query"
    offset: int = 0

    def name(self, i: int, count: int) -> str:
        if self.label == "query":
            return "the query"
        if self.label == "input" and count == 1 and self.offset == 0:
            return "the input"
        return f"{self.label} {self.offset + i}"


@dataclass(eq=False)
class _Job:
    req_id: object
    inputs: list[str]
    truncate: bool
    reply: Callable[[EmbeddingResult | BaseException], object]
    query: str | None = None  # rerank: score each input paired with it
    naming: Naming = field(default_factory=Naming)
    cancelled: threading.Event = field(default_factory=threading.Event)


class EmbeddingLoop:
    """Runs embedding jobs one at a time on one thread, the only user of the backend.

    ``open_backend`` is called on that thread before the first job: a generation model's
    worker creates its embedding context only when the first embedding request comes (and
    keeps it), so generation-only use costs nothing. ``reply`` receives the
    :class:`EmbeddingResult`, or the error: :class:`InvalidRequest` for the caller's
    mistakes (an over-long input with ``truncate`` off, an empty input), anything else for
    failures, and nothing at all for a cancelled job.

    Either :meth:`run` it on a thread of one's own (an embedding model's worker has nothing
    else to do), or let :meth:`submit` start a daemon thread for it (``background``).
    """

    def __init__(
        self, open_backend: Callable[[], EmbeddingBackend], *, background: bool = False
    ) -> None:
        self._open = open_backend
        self._backend: EmbeddingBackend | None = None
        self._open_error: BaseException | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._active: dict[object, _Job] = {}
        self._lock = threading.Lock()
        self._background = background
        self._thread: threading.Thread | None = None
        self._stopped = False

    def submit(
        self,
        req_id: object,
        inputs: list[str],
        truncate: bool,
        reply: Callable[[EmbeddingResult | BaseException], object],
        *,
        query: str | None = None,
        naming: Naming | None = None,
    ) -> None:
        """Queue a job: embed ``inputs``, or with a ``query`` score each input paired with
        it (a cross-encoder's job)."""
        job = _Job(req_id, list(inputs), truncate, reply, query, naming or Naming())
        with self._lock:
            if self._stopped:
                raise RuntimeError("the embedding loop has stopped")
            self._active[req_id] = job
            if self._background and self._thread is None:
                self._thread = threading.Thread(target=self.run, name="embedder", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def cancel(self, req_id: object) -> None:
        """Stop that job at its next pass (unknown ids are ignored: it may be done)."""
        with self._lock:
            job = self._active.get(req_id)
        if job is not None:
            job.cancelled.set()

    def stop(self) -> None:
        """End :meth:`run`: the job in progress stops at its next pass and queued ones are
        dropped, all without a reply (the worker is exiting: its socket closing fails them
        on the server's side)."""
        with self._lock:
            self._stopped = True
            for job in self._active.values():
                job.cancelled.set()
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for a background thread; True when no thread is running any more."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if job.cancelled.is_set():
                    continue
                try:
                    result: EmbeddingResult | BaseException = self._embed(job)
                except Cancelled:
                    continue
                except Exception as exc:  # every failure is the job's answer, not the loop's end
                    result = exc
                job.reply(result)
            finally:
                with self._lock:
                    self._active.pop(job.req_id, None)

    def _backend_for_jobs(self) -> EmbeddingBackend:
        if self._backend is None:
            if self._open_error is not None:
                raise self._open_error
            try:
                self._backend = self._open()
            except Exception as exc:
                self._open_error = exc
                raise
        return self._backend

    def _embed(self, job: _Job) -> EmbeddingResult:
        backend = self._backend_for_jobs()
        if job.query is not None:
            tokens = _pair_tokens(backend, job)
        elif backend.ranks:
            raise InvalidRequest(
                "this model is a reranker (pooling type rank): it scores query-document pairs "
                "through /api/rerank and has no embeddings"
            )
        else:
            tokens = []
            for i, text in enumerate(job.inputs):
                name = job.naming.name(i, len(job.inputs))
                toks = backend.tokenize(text)
                if not toks:
                    raise InvalidRequest(f"{name} is empty: it has no tokens to embed")
                tokens.append(fit_tokens(
                    toks, backend.limit, n_tail=backend.n_tail, truncate=job.truncate, name=name
                ))  # fmt: skip
        vectors = run_plan(backend, tokens, job.cancelled.is_set)
        return EmbeddingResult(vectors=vectors, token_counts=[len(t) for t in tokens])


def _pair_tokens(backend: EmbeddingBackend, job: _Job) -> list[list[int]]:
    """Each document's pair sequence (see :meth:`EmbeddingBackend.pair_frame`), the document
    cut to what the window leaves after the query (or refused, naming it, with ``truncate``
    off). A query that leaves no room for one token of a document is refused whatever
    ``truncate`` says: cutting the query would rank against another question."""
    if not backend.ranks:
        raise InvalidRequest(
            "this model does not score pairs: only a cross-encoder (pooling type rank) does"
        )
    assert job.query is not None
    before, after = backend.pair_frame(job.query)
    room = backend.limit - len(before) - len(after)
    if room < 1:
        raise ContextOverflow(
            f"the query is too long: with the model's separators it has "
            f"{len(before) + len(after)} tokens, and the context holds {backend.limit}, "
            "which leaves no room for a document"
        )
    tokens = []
    for i, text in enumerate(job.inputs):
        document = backend.tokenize_text(text)
        if len(document) > room and not job.truncate:
            total = len(before) + len(document) + len(after)
            raise ContextOverflow(
                f"the input length exceeds the context length: "
                f"{job.naming.name(i, len(job.inputs))} has {total} tokens with the query, "
                f"the context holds {backend.limit}"
            )
        tokens.append(before + document[:room] + after)
    return tokens
