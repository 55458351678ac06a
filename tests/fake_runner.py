"""A scripted in-process runner for scheduler, inference and API tests.

:class:`FakeRunner` satisfies :class:`pollama.runner.base.Runner` without a worker process:
it replays scripted chunks with controllable delays, can fail to load or crash mid-stream,
and records what was asked of it. Its embeddings are a fixed function of each input's bytes
(:func:`fake_vector`), so tests can compute the expected vector themselves. It also checks
the scheduler's central promise: closing it while a completion is running sets
:attr:`FakeRunner.closed_while_busy` (the use-after-free of CVE-2026-43631, were it a real
runner).

:class:`FakeRunnerFactory` is the ``runner_factory`` to hand a scheduler: it builds one
``FakeRunner`` per load, with defaults and per-model overrides, and keeps them all, plus a
shared ``events`` log of starts and closes in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from pollama.errors import ContextOverflow, RunnerCrashed
from pollama.runner.base import (
    CompletionChunk,
    CompletionRequest,
    EmbeddingResult,
    LoadSpec,
    RunnerInfo,
)

__all__ = ["BOS_TOKEN", "FAKE_EMBEDDING_DIM", "FakeRunner", "FakeRunnerFactory", "fake_vector"]

BOS_TOKEN = 256
"""The fake tokenizer is byte-level (token = byte value); this id stands for BOS."""

# A text chunk: a string, or a whole chunk (to script logprobs).
Scripted = str | CompletionChunk
Script = Sequence[Scripted] | Callable[[CompletionRequest], Sequence[Scripted]]

_pids = itertools.count(100_000)

FAKE_EMBEDDING_DIM = 8


def fake_vector(tokens: Sequence[int], dim: int = FAKE_EMBEDDING_DIM) -> list[float]:
    """The fake's raw (unnormalized) embedding of ``tokens``: bytes of their sha256, centred
    and scaled so that the norm is far from 1 (normalizing it must show)."""
    digest = hashlib.sha256(bytes(t % 256 for t in tokens) + bytes([len(tokens) % 256])).digest()
    return [float(digest[i % len(digest)] - 127.5) * 0.37 for i in range(dim)]


def fake_pair_tokens(query: str, document: str) -> list[int]:
    """The fake cross-encoder's sequence of a pair: BOS, the query, BOS again, the document."""
    return [BOS_TOKEN, *query.encode(), BOS_TOKEN, *document.encode()]


class FakeRunner:
    """A runner that replays ``script`` (chunks, or a function of the request).

    ``done_reason``, ``stop_sequence`` and ``context_shifted`` go on the final chunk.

    ``load_delay``/``chunk_delay`` are seconds; ``hold``, when given, is an event every
    completion waits for before its first chunk (to keep requests in flight). ``load_error``
    is raised by :meth:`start`; ``crash_after`` makes the runner die after that many chunks
    (every open completion then raises :class:`RunnerCrashed`), as :meth:`crash` does at
    any time.
    """

    def __init__(
        self,
        spec: LoadSpec,
        *,
        script: Script = ("Hello", " world", "!"),
        done_reason: str = "stop",
        stop_sequence: str = "",
        context_shifted: int = 0,
        load_delay: float = 0.0,
        chunk_delay: float = 0.0,
        hold: asyncio.Event | None = None,
        load_error: BaseException | None = None,
        crash_after: int | None = None,
        memory_bytes: int = 1 << 20,
        n_ctx_train: int = 8192,
        n_ctx: int | None = None,
        events: list[tuple[str, str]] | None = None,
        embedding_dim: int = FAKE_EMBEDDING_DIM,
        embedding: Callable[[Sequence[int]], Sequence[float]] | None = None,
    ) -> None:
        self.spec = spec
        self.script = script
        self.done_reason = done_reason
        self.stop_sequence = stop_sequence
        self.context_shifted = context_shifted
        self.load_delay = load_delay
        self.chunk_delay = chunk_delay
        self.hold = hold
        self.load_error = load_error
        self.crash_after = crash_after
        self.memory_bytes = memory_bytes
        self.n_ctx_train = n_ctx_train
        self.n_ctx = n_ctx  # the context the worker made, if not the spec's (a model's limit)
        self.events = events if events is not None else []
        self.embedding_dim = embedding_dim
        self.embedding = embedding  # replaces fake_vector (e.g. to return NaN)
        self.pid = next(_pids)
        self.calls: list[tuple[str, Any]] = []
        self.started = False
        self.closed = False
        self.active = 0  # completions in progress
        self.max_active = 0
        self.cancelled = 0  # completions whose consumer stopped before the done chunk
        self.closed_while_busy = False
        self.crash_detail = ""
        self._dead = False
        self._died: asyncio.Event | None = None

    # -- Runner ------------------------------------------------------------------------------

    async def start(self) -> RunnerInfo:
        self.calls.append(("start", self.spec))
        self.events.append(("start", self.spec.model_path))
        if self.load_delay:
            await asyncio.sleep(self.load_delay)
        if self.load_error is not None:
            self._dead = True
            self.events.append(("failed", self.spec.model_path))
            raise self.load_error
        self.started = True
        self.events.append(("ready", self.spec.model_path))
        return RunnerInfo(
            pid=self.pid,
            n_ctx=self.n_ctx or self.spec.num_ctx,
            n_ctx_train=self.n_ctx_train,
            n_parallel=max(self.spec.num_parallel, 1),
            n_vocab=BOS_TOKEN + 1,
            memory_bytes=self.memory_bytes,
            load_duration_ns=int(self.load_delay * 1e9),
        )

    async def completion(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        self.calls.append(("completion", request))
        self._check_alive()
        chunks = self.script(request) if callable(self.script) else self.script
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        finished = False
        try:
            if self.hold is not None:
                await self._until(self.hold.wait())
            sent = 0
            for text in chunks:
                if self.crash_after is not None and sent >= self.crash_after:
                    self.crash("crashed after scripted chunks")
                if self.chunk_delay:
                    await self._until(asyncio.sleep(self.chunk_delay))
                self._check_alive()
                sent += 1
                yield text if isinstance(text, CompletionChunk) else CompletionChunk(text=text)
            if self.crash_after is not None and sent >= self.crash_after:
                self.crash("crashed after scripted chunks")
            self._check_alive()
            finished = True
            yield CompletionChunk(
                done=True,
                done_reason=self.done_reason,
                stop_sequence=self.stop_sequence,
                context_shifted=self.context_shifted,
                prompt_eval_count=len(request.tokens or request.prompt.encode()),
                eval_count=sent,
                tokens=[] if request.return_tokens else None,
            )
        finally:
            self.active -= 1
            if not finished:
                self.cancelled += 1

    async def embed(
        self,
        inputs: Sequence[str],
        truncate: bool = True,
        *,
        query: str | None = None,
        label: str = "input",
    ) -> EmbeddingResult:
        """Byte tokens plus BOS, cut to ``num_ctx`` (or refused, as the worker does). With a
        ``query`` each input is paired: ``fake_pair_tokens``, whose fake vector's first
        value is the pair's score."""
        self.calls.append(("embed", (list(inputs), truncate)))
        if query is not None:
            self.calls.append(("pair", (query, label)))
        self._check_alive()
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.hold is not None:
                await self._until(self.hold.wait())
            if self.chunk_delay:
                await self._until(asyncio.sleep(self.chunk_delay))
            vectors: list[bytes] = []
            counts: list[int] = []
            make = self.embedding or (lambda t: fake_vector(t, self.embedding_dim))
            for text in inputs:
                tokens = fake_pair_tokens(query, text) if query is not None else [
                    BOS_TOKEN, *text.encode()]
                if len(tokens) > self.spec.num_ctx:
                    if not truncate:
                        raise ContextOverflow(
                            "the input length exceeds the context length: the input has "
                            f"{len(tokens)} tokens, the context holds {self.spec.num_ctx}"
                        )
                    tokens = tokens[: self.spec.num_ctx]
                values = list(make(tokens))
                vectors.append(struct.pack(f"<{len(values)}f", *values))
                counts.append(len(tokens))
            self._check_alive()
            return EmbeddingResult(vectors=vectors, token_counts=counts)
        finally:
            self.active -= 1

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        self.calls.append(("tokenize", text))
        self._check_alive()
        return ([BOS_TOKEN] if add_special else []) + list(text.encode())

    async def detokenize(self, tokens: list[int]) -> str:
        self.calls.append(("detokenize", tokens))
        self._check_alive()
        return bytes(t for t in tokens if 0 <= t < BOS_TOKEN).decode(errors="replace")

    async def pieces(self, tokens: list[int]) -> list[bytes]:
        """Each token's byte (BOS as ``<s>``), as the worker's ``pieces`` op."""
        self.calls.append(("pieces", tokens))
        self._check_alive()
        return [b"<s>" if t == BOS_TOKEN else bytes([t]) for t in tokens]

    @property
    def alive(self) -> bool:
        return self.started and not self._dead and not self.closed

    async def close(self) -> None:
        self.calls.append(("close", None))
        if self.closed:
            return
        if self.active:
            self.closed_while_busy = True
        self.closed = True
        self.events.append(("close", self.spec.model_path))
        self._wake()

    # -- test controls -----------------------------------------------------------------------

    def crash(self, detail: str = "fake runner crashed") -> None:
        """Die now, as a worker killed by a signal would: open completions fail."""
        if not self._dead:
            self._dead = True
            self.crash_detail = detail
            self.events.append(("crash", self.spec.model_path))
            self._wake()

    def _wake(self) -> None:
        if self._died is not None:
            self._died.set()

    def _check_alive(self) -> None:
        if self._dead or self.closed:
            raise RunnerCrashed(self.crash_detail or "runner was closed")

    async def _until(self, awaitable: Any) -> None:
        """Await ``awaitable`` unless the runner dies first (then raise RunnerCrashed)."""
        if self._died is None:
            self._died = asyncio.Event()
            if self._dead or self.closed:
                self._died.set()
        step = asyncio.ensure_future(awaitable)
        death = asyncio.ensure_future(self._died.wait())
        try:
            await asyncio.wait({step, death}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in (step, death):
                if not future.done():
                    future.cancel()
            await asyncio.gather(step, death, return_exceptions=True)
        self._check_alive()


class FakeRunnerFactory:
    """``runner_factory`` for a scheduler: a :class:`FakeRunner` per load.

    ``defaults`` are FakeRunner keyword arguments for every model; :meth:`configure` sets
    overrides for one ``model_path``. ``runners`` holds every runner made, in order;
    ``events`` is their shared log of ``(what, model_path)``: start, ready, failed, crash,
    close.
    """

    def __init__(self, **defaults: Any) -> None:
        self.defaults = defaults
        self.overrides: dict[str, dict[str, Any]] = {}
        self.runners: list[FakeRunner] = []
        self.events: list[tuple[str, str]] = []

    def configure(self, model_path: str, **options: Any) -> None:
        self.overrides.setdefault(model_path, {}).update(options)

    def __call__(self, spec: LoadSpec) -> FakeRunner:
        options = {**self.defaults, **self.overrides.get(spec.model_path, {})}
        runner = FakeRunner(spec, events=self.events, **options)
        self.runners.append(runner)
        return runner

    def live(self, model_path: str | None = None) -> list[FakeRunner]:
        """Runners that are loaded and not closed (of one model, if given)."""
        return [
            r
            for r in self.runners
            if r.alive and (model_path is None or r.spec.model_path == model_path)
        ]

    def loads(self, model_path: str | None = None) -> int:
        """How many loads were attempted (of one model, if given)."""
        return sum(1 for r in self.runners if model_path is None or r.spec.model_path == model_path)

    @property
    def closed_while_busy(self) -> bool:
        return any(r.closed_while_busy for r in self.runners)
