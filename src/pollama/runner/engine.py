"""The continuous-batching decode loop of one loaded model (pure Python over ``llama.py``).

``num_parallel`` slots share one llama.cpp context, slot *i* being KV sequence *i*. Each loop
step builds one batch: first the pending token of every generating slot, then chunks of the
prompts still being evaluated, sharing the rest of the ``n_batch`` budget fairly (llama.cpp's
``update_slots`` order), so a new request starts while the others keep streaming. One
``llama_decode``, then every row that asked for logits is sampled with its own chain.

A request with a ``format`` also carries a grammar constraint (``runner/grammar.py``, one
llguidance matcher per request, compiled in :meth:`Engine.submit` so that a schema it cannot
handle fails before any token). Its next-token mask is ready before the logits are. The
token is drawn as usual and checked against the mask; only when the grammar refuses it do
the refused tokens' logits (a writable view of llama.cpp's buffer, which the sampler chain
reads) go to -inf and the chain draws again, as llama.cpp's ``common_sampler_sample`` and
Ollama's sampler do. Greedy decoding gets the same token as masking first would, at a
fraction of the cost. A chain with penalties remembers every draw, so it is masked first.
Near the end of its budget the request's JSON is closed by the constraint, not the model.

What must stay true:

* Only the loop thread (:meth:`Engine.run`) touches the context, the batch and the samplers.
  Other threads call :meth:`Engine.submit`, :meth:`Engine.cancel` and :meth:`Engine.stop`,
  which only queue commands, and the vocabulary functions, which are read-only.
* ``slot.tokens`` is exactly what that slot's KV sequence holds, position *i* = token *i*.
  After a request the KV stays (prompt + generated tokens but the last one, which was never
  decoded) so that the next request with the same prefix evaluates only the rest.
* Every submitted request gets exactly one final event: a ``CompletionChunk`` with
  ``done=True`` or a :class:`RequestFailed`. Text events never contain a stop string or
  anything after it, nor a partial UTF-8 character. A final event ended by a stop string
  names it (``stop_sequence``).
* A request that asks for logprobs gets one entry per generated token, measured on the raw
  logits before anything (a grammar's mask included) touches them, and carried by the
  event that carries the token's last character (``runner/logprobs.py``); entries of
  tokens that a matched stop string swallowed whole are dropped with it. A request that
  does not ask costs nothing.
* A slot that fills its context ends its request with ``length``; nothing ever overflows.
* A constrained request only ever samples tokens its grammar allows and feeds only those to
  its matcher; it ends with ``stop`` when the grammar is complete (an end token, or nothing
  else can follow), ``length`` when a limit ended it, closed by the constraint or not.
"""

from __future__ import annotations

import codecs
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pollama.errors import InvalidRequest, brief
from pollama.runner.base import (
    MAX_TOP_LOGPROBS,
    CompletionChunk,
    CompletionRequest,
    Logprob,
    SamplingOptions,
)
from pollama.runner.logprobs import HeldLogprobs, Vector, log_softmax, token_entry

if TYPE_CHECKING:  # llama_cpp is imported only where the engine really runs (the worker)
    from pollama.runner.grammar import Constraint, Grammars
    from pollama.runner.llama import Context, Model, SamplerChain
    from pollama.runner.tuning import ThreadTuner

__all__ = [
    "Engine",
    "Event",
    "RequestFailed",
    "StopMatcher",
    "Utf8Decoder",
    "build_sampler",
    "common_prefix",
    "fair_share",
]


@dataclass(frozen=True)
class RequestFailed:
    """The final event of a request that could not run: ``kind`` is ``invalid`` (the caller's
    fault, e.g. a prompt longer than the context) or ``internal``."""

    kind: str
    message: str


_SLOT_SIMILARITY = 0.1  # llama-server's --slot-prompt-similarity default

Event = CompletionChunk | RequestFailed
# Receives a request's events in order; returning False means the consumer is gone, which
# cancels the request (no more events are sent except its final one).
Emit = Callable[[Event], bool]


class Utf8Decoder:
    """Bytes of token pieces in, complete characters out; an incomplete UTF-8 sequence at the
    end is held until the next piece (a character is often split over byte tokens)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        return str(self._decoder.decode(data))

    @property
    def holding(self) -> bool:
        """Whether the bytes pushed so far end inside a character (held back)."""
        return bool(self._decoder.getstate()[0])

    def flush(self) -> str:
        """What is left, invalid bytes replaced (at the end of a request)."""
        return str(self._decoder.decode(b"", final=True))


class StopMatcher:
    """Finds stop strings in streamed text that may split them anywhere.

    ``push`` returns the text that is safe to emit and whether a stop string was found. Text
    that could still be the start of a stop string is held back; once found, the stop string
    and everything after it are dropped, and ``matched`` is that stop string (the one that
    starts first; of two starting at the same place, the first listed).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.matched = ""
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        pending = self._held + text
        first = -1
        for stop in self.stops:
            at = pending.find(stop)
            if at >= 0 and (first < 0 or at < first):
                first, self.matched = at, stop
        if first >= 0:
            self._held = ""
            return pending[:first], True
        hold = 0
        for stop in self.stops:
            hold = max(hold, _prefix_at_end(pending, stop, hold))
        self._held = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """The held text, when the request ends without a stop string."""
        held, self._held = self._held, ""
        return held


def _prefix_at_end(text: str, stop: str, longer_than: int) -> int:
    """The length of the longest end of ``text`` that begins ``stop`` (shorter than all of
    it), if longer than ``longer_than``; else 0. Only the places where ``stop``'s first
    character occurs are tried, earliest (longest) first, so a token costs a few C-level
    comparisons per stop string rather than one slice per possible length."""
    first = stop[:1]
    start = max(len(text) - len(stop) + 1, 0)
    at = text.find(first, start)
    while 0 <= at < len(text) - longer_than:
        if stop.startswith(text[at:]):
            return len(text) - at
        at = text.find(first, at + 1)
    return 0


def fair_share(budget: int, wants: Sequence[int]) -> list[int]:
    """Split ``budget`` tokens among prompts that want ``wants`` more: equal shares, and
    what a short prompt does not use goes to the others (water filling)."""
    alloc = [0] * len(wants)
    open_ = [i for i, w in enumerate(wants) if w > 0]
    left = budget
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for i in list(open_):
            take = min(share, wants[i] - alloc[i], left)
            alloc[i] += take
            left -= take
            if alloc[i] == wants[i]:
                open_.remove(i)
            if left == 0:
                break
    return alloc


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    return int(diff.argmax()) if diff.any() else n


def build_sampler(opts: SamplingOptions, n_vocab: int, n_ctx: int) -> tuple[SamplerChain, int]:
    """A sampler chain for ``opts``; returns it and how many recent tokens it must see.

    Order as llama.cpp's default (penalties, top_k, typical, top_p, min_p, temperature, dist),
    greedy when temperature <= 0. Penalties cost a pass over the whole vocabulary, so when
    they can only lower scores (repeat >= 1, frequency and presence >= 0) a wider top-k runs
    first: at most ``last_n`` tokens are penalized, so ``top_k(k + last_n)`` keeps every
    token that can be in the top k afterwards and the result is the same, several times faster.
    """
    from pollama.runner.llama import DEFAULT_SEED, SamplerChain

    chain = SamplerChain()
    # llama.cpp allocates the penalty window up front: never wider than the context, which
    # is all the history a sequence can have (2**31 - 1 once cost 8.5 GB for 3 tokens).
    last_n = n_ctx if opts.repeat_last_n < 0 else min(opts.repeat_last_n, n_ctx)
    penalize = last_n > 0 and (
        opts.repeat_penalty != 1.0 or opts.frequency_penalty != 0.0 or opts.presence_penalty != 0.0
    )
    greedy = opts.temperature <= 0
    top_k = 1 if greedy else opts.top_k
    if penalize:
        lowers_only = (
            opts.repeat_penalty >= 1.0
            and opts.frequency_penalty >= 0.0
            and opts.presence_penalty >= 0.0
        )
        if lowers_only and 0 < top_k and top_k + last_n < n_vocab:
            chain.add_top_k(top_k + last_n)
        chain.add_penalties(
            n_vocab, last_n, opts.repeat_penalty, opts.frequency_penalty, opts.presence_penalty
        )
    if greedy:
        chain.add_greedy()
        return chain, last_n if penalize else 0
    if 0 < top_k < n_vocab:
        chain.add_top_k(top_k)
    if 0 < opts.typical_p < 1:
        chain.add_typical(opts.typical_p)
    if 0 < opts.top_p < 1:
        chain.add_top_p(opts.top_p)
    if opts.min_p > 0:
        chain.add_min_p(opts.min_p)
    chain.add_temp(opts.temperature)
    chain.add_dist(DEFAULT_SEED if opts.seed < 0 else opts.seed)
    return chain, last_n if penalize else 0


@dataclass
class _Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)
    last_used: int = 0
    job: _Job | None = None


@dataclass
class _Job:
    req_id: int
    emit: Emit
    prompt: list[int]
    options: SamplingOptions
    return_tokens: bool
    slot: _Slot | None = None
    sampler: SamplerChain | None = None
    fast_greedy: bool = False
    penalized: bool = False  # the chain has penalties, which remember every drawn token
    grammar: Constraint | None = None  # structured output (``format``)
    next: int = 0  # first prompt token not yet in the KV cache
    cached: int = 0
    pending: int = -1  # sampled token not yet decoded (-1: still evaluating the prompt)
    generated: list[int] = field(default_factory=list)
    utf8: Utf8Decoder = field(default_factory=Utf8Decoder)
    stops: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    held: HeldLogprobs | None = None  # logprobs asked: entries waiting for their text
    top_logprobs: int = 0  # alternatives per entry
    decoded: int = 0  # characters decoded so far (before the stop matcher)
    row: int = -1  # output row in the batch being decoded
    chunk: int = 0  # prompt tokens in the batch being decoded
    t_prefill: int = 0
    t_first: int = 0
    cancelled: bool = False


class Engine:
    """Runs completions on one context; see the module docstring for the invariants."""

    def __init__(
        self,
        model: Model,
        ctx: Context,
        *,
        n_ctx: int,
        n_batch: int,
        n_parallel: int,
        tuner: ThreadTuner | None = None,
    ) -> None:
        from pollama.runner.llama import Batch

        self.model = model
        self.ctx = ctx
        self.tuner = tuner
        self.n_ctx = n_ctx  # per slot
        self.n_batch = max(n_batch, n_parallel)
        self.batch = Batch(self.n_batch)
        self.slots = [_Slot(seq) for seq in range(n_parallel)]
        self._waiting: deque[_Job] = deque()
        self._commands: deque[tuple[str, object]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._prefill_cap = self.n_batch
        self._clock = itertools.count(1)
        self._grammars: Grammars | None = None  # built on the first constrained request
        self._grammars_lock = threading.Lock()

    # -- called from any thread --------------------------------------------------------

    def submit(self, req_id: int, request: CompletionRequest, emit: Emit) -> None:
        """Queue a completion; a request that cannot run fails at once through ``emit``."""
        try:
            if request.tokens is not None:
                prompt = [int(t) for t in request.tokens]
                bad = [t for t in prompt if not 0 <= t < self.model.n_vocab]
                if bad:
                    emit(RequestFailed("invalid", f"invalid token id {bad[0]} in the prompt"))
                    return
            else:
                prompt = self.model.tokenize(request.prompt, request.add_special, True)
        except Exception as exc:  # reported to the caller, never raised in its thread
            emit(RequestFailed("internal", f"tokenization failed: {exc}"))
            return
        if not prompt:
            emit(RequestFailed("invalid", "the prompt is empty"))
            return
        if len(prompt) > self.n_ctx:
            emit(
                RequestFailed(
                    "invalid",
                    f"the prompt is {len(prompt)} tokens, more than the context of "
                    f"{self.n_ctx} tokens per sequence",
                )
            )
            return
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            emit(RequestFailed("invalid", f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"))
            return
        job = _Job(req_id, emit, prompt, request.options, request.return_tokens)
        job.stops = StopMatcher(request.options.stop)
        if request.logprobs:
            job.held, job.top_logprobs = HeldLogprobs(), request.top_logprobs
        if request.format is not None:
            try:
                job.grammar = self.grammars().compile(request.format)
            except InvalidRequest as exc:
                emit(RequestFailed("invalid", str(exc)))
                return
            except Exception as exc:  # reported to the caller, never raised in its thread
                emit(RequestFailed("internal", f"structured output failed: {exc}"))
                return
        if not self._command("submit", job):
            emit(RequestFailed("internal", "the model runner is shutting down"))

    def cancel(self, req_id: int) -> None:
        self._command("cancel", req_id)

    def grammars(self) -> Grammars:
        """The model's grammar compiler, built on first use (about 0.3 s for a 49k
        vocabulary), so that a model never asked for structured output does not pay for it."""
        with self._grammars_lock:
            if self._grammars is None:
                from pollama.runner.grammar import Grammars
                from pollama.runner.llama import guidance_tokenizer

                self._grammars = Grammars(guidance_tokenizer(self.model))
            return self._grammars

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def _command(self, kind: str, value: object) -> bool:
        with self._wake:
            if self._stopping:
                return False
            self._commands.append((kind, value))
            self._wake.notify()
            return True

    # -- the loop thread ---------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop`; requests still open then end as cancelled.

        The loop sleeps only when there is nothing it could do: no command, no request in a
        slot and none waiting. A waiting request counts even when every slot is taken,
        because a slot frees itself inside :meth:`_step` (a cancelled or finished request)
        without any command arriving; sleeping then would strand the waiting request and
        every later one behind it.
        """
        while True:
            with self._wake:
                while not self._commands and not self._stopping and not self._has_work():
                    self._wake.wait()
                if self._stopping:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for kind, value in commands:
                if kind == "submit":
                    assert isinstance(value, _Job)
                    self._waiting.append(value)
                else:
                    self._cancel(value)
            try:
                self._admit()
                if self._busy():
                    self._step()
            except Exception as exc:  # a bug must cost the requests in flight, not the worker
                self._fail_all(f"{type(exc).__name__}: {exc}")
        with self._wake:  # no command can be queued after this
            for kind, value in self._commands:
                if kind == "submit" and isinstance(value, _Job):
                    self._waiting.append(value)
            self._commands.clear()
        for job in self._waiting:
            self._finish(job, "")
        self._waiting.clear()
        for slot in self.slots:
            if slot.job is not None:
                self._finish(slot.job, "")

    def _has_work(self) -> bool:
        """A request in a slot, or one waiting for a slot (which :meth:`_admit` may give)."""
        return bool(self._waiting) or self._busy()

    def _busy(self) -> bool:
        return any(slot.job is not None for slot in self.slots)

    def _cancel(self, req_id: object) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.req_id == req_id:
                slot.job.cancelled = True
        for job in list(self._waiting):
            if job.req_id == req_id:
                self._waiting.remove(job)
                self._finish(job, "")

    def _admit(self) -> None:
        """Give waiting requests free slots: the one with the longest cached prefix of the
        prompt, ties to the least recently used. As in llama-server, a prefix shorter than a
        tenth of the prompt (a chat template's first tokens) does not count, so that a new
        conversation takes an empty or the oldest slot rather than another one's cache."""
        while self._waiting:
            free = [slot for slot in self.slots if slot.job is None]
            if not free:
                return
            job = self._waiting.popleft()
            floor = len(job.prompt) * _SLOT_SIMILARITY
            scored = []
            for slot in free:
                shared = common_prefix(slot.tokens, job.prompt)
                scored.append((shared if shared > floor else 0, -slot.last_used, shared, slot))
            _, _, shared, slot = max(scored, key=lambda entry: entry[:2])
            reuse = min(shared, len(job.prompt) - 1)
            if reuse < len(slot.tokens):
                if not self.ctx.seq_rm(slot.seq, reuse, -1):
                    self.ctx.seq_rm(slot.seq, -1, -1)  # cannot cut this cache: start over
                    reuse = 0
                del slot.tokens[reuse:]
            job.slot, job.next, job.cached = slot, reuse, reuse
            slot.job = job
            opts = job.options
            job.sampler, history = build_sampler(opts, self.model.n_vocab, self.n_ctx)
            for token in job.prompt[max(0, len(job.prompt) - history) :] if history else ():
                job.sampler.accept(token)
            job.fast_greedy = opts.temperature <= 0 and history == 0
            job.penalized = history > 0

    def _step(self) -> None:
        """One loop step: build the batch, one ``llama_decode``, then sample every row that
        asked for logits."""
        decoding, prefilling = self._add_pending_tokens()
        chunked = self._add_prompt_chunks(prefilling, len(decoding))
        if self.batch.n_tokens == 0:
            return
        tuner = self.tuner
        if tuner is not None:
            if chunked:
                tuner.interrupt()
            else:
                tuner.threads_for_step(len(decoding))
        start = time.perf_counter_ns()
        rc = self.ctx.decode(self.batch)
        now = time.perf_counter_ns()
        if rc != 0:
            self._decode_failed(rc, decoding + chunked)
            return
        if tuner is not None and not chunked:
            tuner.record(len(decoding), (now - start) / 1e9)
        self._prefill_cap = min(self.n_batch, self._prefill_cap * 2)
        self._record_decoded(decoding, chunked, now)
        for job in decoding + chunked:
            if job.row >= 0 and job.slot is not None:
                self._sample(job)

    def _add_pending_tokens(self) -> tuple[list[_Job], list[_Job]]:
        """Clear the batch and add every generating slot's pending token (a cancelled
        request, or one whose slot filled its context, ends here). Returns the jobs decoding
        a token and the jobs still evaluating their prompt."""
        batch = self.batch
        batch.clear()
        decoding: list[_Job] = []
        prefilling: list[_Job] = []
        for slot in self.slots:
            job = slot.job
            if job is None:
                continue
            if job.cancelled:
                self._finish(job, "")
            elif job.pending >= 0:
                if len(slot.tokens) >= self.n_ctx:
                    self._finish(job, "length")
                    continue
                job.row = batch.add(job.pending, len(slot.tokens), slot.seq, True)
                decoding.append(job)
            else:
                prefilling.append(job)
        return decoding, prefilling

    def _add_prompt_chunks(self, prefilling: list[_Job], decoding: int) -> list[_Job]:
        """Add chunks of the prompts being evaluated, sharing what the ``decoding`` pending
        tokens left of the batch fairly (and at most the prefill cap); returns the jobs that
        got a chunk. Only a prompt's last chunk asks for logits."""
        budget = min(self.n_batch - decoding, self._prefill_cap)
        shares = fair_share(budget, [len(j.prompt) - j.next for j in prefilling])
        now = time.perf_counter_ns()
        chunked: list[_Job] = []
        for job, n in zip(prefilling, shares, strict=True):
            if n == 0:
                continue
            assert job.slot is not None
            last = job.next + n == len(job.prompt)
            row = self.batch.add_run(
                job.prompt[job.next : job.next + n], job.next, job.slot.seq, last
            )
            job.row = row if last else -1
            job.chunk = n
            job.t_prefill = job.t_prefill or now
            chunked.append(job)
        return chunked

    def _record_decoded(self, decoding: list[_Job], chunked: list[_Job], now: int) -> None:
        """After a decode: each slot's tokens are what its KV sequence now holds. A prompt
        evaluated whole starts its first token's clock; with ``num_predict`` 0 it ends there
        (``length``) and is not sampled."""
        for job in decoding:
            assert job.slot is not None
            job.slot.tokens.append(job.pending)
        for job in chunked:
            assert job.slot is not None
            job.slot.tokens.extend(job.prompt[job.next : job.next + job.chunk])
            job.next += job.chunk
            if job.next == len(job.prompt):
                job.t_first = now
                if job.options.num_predict == 0:
                    self._finish(job, "length")
                    job.row = -1

    def _sample(self, job: _Job) -> None:
        # Measured first: a grammar may set refused logits to -inf in place while sampling.
        measured = log_softmax(self.ctx.logits(job.row)) if job.held is not None else None
        grammar = job.grammar
        if grammar is not None:
            token = self._sample_constrained(job, grammar)
            if token < 0:
                # Only allowed tokens are ever fed, so a matcher that stops on its own is
                # the schema's doing (llguidance's lexer limits: a pattern like a{1000000}).
                problem = brief(grammar.error) or "the grammar allows no next token"
                failure = f"the JSON schema in format is too complex to follow: {problem}"
                self._finish(job, "", failure=failure, kind="invalid")
                return
        elif job.fast_greedy:
            token = int(self.ctx.logits(job.row).argmax())
        else:
            assert job.sampler is not None
            token = job.sampler.sample(self.ctx, job.row)
        job.generated.append(token)
        eog = self.model.is_eog(token)
        decoded = "" if eog else job.utf8.push(self.model.token_to_piece(token))
        if measured is not None:
            self._hold_entry(job, token, measured, len(decoded))
        if eog:
            self._finish(job, "length" if grammar is not None and grammar.closing else "stop")
            return
        text, stopped = job.stops.push(decoded)
        entries = self._released(job, len(text), final=stopped)
        if (text or entries) and not job.emit(CompletionChunk(text=text, logprobs=entries)):
            job.cancelled = True
            self._finish(job, "")
            return
        if stopped:
            self._finish(job, "stop", flush=False)
        elif grammar is not None and grammar.done:
            self._finish(job, "length" if grammar.closing else "stop")
        elif 0 < job.options.num_predict <= len(job.generated):
            self._finish(job, "length")
        else:
            job.pending = token

    def _hold_entry(self, job: _Job, token: int, measured: Vector, n_decoded: int) -> None:
        """Hold the entry of ``token``, which decoded to ``n_decoded`` more characters, on
        its span of the output (one further if it ends inside a character)."""
        assert job.held is not None
        entry = token_entry(token, measured, job.top_logprobs, self._entry_piece)
        start = job.decoded
        job.decoded += n_decoded
        job.held.add(entry, start, job.decoded + (1 if job.utf8.holding else 0))

    def _entry_piece(self, token: int) -> bytes:
        """A token's text in logprobs: an end-of-generation token has none (never shown)."""
        return b"" if self.model.is_eog(token) else self.model.token_to_piece(token)

    @staticmethod
    def _released(job: _Job, n_chars: int, *, final: bool) -> list[Logprob] | None:
        """The entries that go with ``n_chars`` more emitted characters (None: not asked)."""
        if job.held is None:
            return None
        entries = job.held.finish(n_chars) if final else job.held.release(n_chars)
        return entries or None

    def _sample_constrained(self, job: _Job, grammar: Constraint) -> int:
        """The next token under the job's grammar, already fed to it; -1 if the grammar
        allows nothing (a matcher in error). See the module docstring for the order."""
        assert job.slot is not None and job.sampler is not None
        left = self.n_ctx - len(job.slot.tokens) + 1  # samples left, this one included
        if job.options.num_predict > 0:
            left = min(left, job.options.num_predict - len(job.generated))
        token = -1
        if grammar.must_close(left):
            token = grammar.closing_token(self.ctx.logits(job.row))
            if token >= 0:
                job.sampler.accept(token)  # keep a penalty's history right
        elif job.fast_greedy:
            logits = self.ctx.logits(job.row)
            token = int(logits.argmax())
            if not grammar.allows(token):
                token = grammar.best_allowed(logits)
        else:
            if not job.penalized:  # no sampler in the chain remembers a refused draw
                token = job.sampler.sample(self.ctx, job.row)
            if not grammar.allows(token):
                logits = self.ctx.logits(job.row)
                if grammar.mask(logits):
                    token = job.sampler.sample(self.ctx, job.row)
                    if not grammar.allows(token):  # only a sampler misbehaving on -inf
                        token = grammar.best_allowed(logits)
        if token < 0 or not grammar.accept(token):
            return -1
        return token

    def _decode_failed(self, rc: int, jobs: list[_Job]) -> None:
        """``rc`` 1 (no room in the KV cache) with prompt chunks in the batch: retry with
        smaller chunks. Otherwise the requests in the batch fail and their caches are
        dropped, since a failed decode may leave part of the batch in them."""
        if rc == 1 and self._prefill_cap > 1 and any(j.pending < 0 for j in jobs):
            self._prefill_cap = max(1, self._prefill_cap // 2)
            return
        for job in jobs:
            slot = job.slot
            assert slot is not None
            self.ctx.seq_rm(slot.seq, -1, -1)
            slot.tokens.clear()
            self._finish(job, "", failure=f"llama_decode failed with status {rc}")

    def _fail_all(self, message: str) -> None:
        for slot in self.slots:
            if slot.job is not None:
                self.ctx.seq_rm(slot.seq, -1, -1)
                slot.tokens.clear()
                self._finish(slot.job, "", failure=message)

    def _finish(
        self,
        job: _Job,
        reason: str,
        *,
        flush: bool = True,
        failure: str = "",
        kind: str = "internal",
    ) -> None:
        slot = job.slot
        if slot is not None and slot.job is job:
            slot.job = None
            slot.last_used = next(self._clock)
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        job.grammar = None
        if failure:
            job.emit(RequestFailed(kind, failure))
            return
        if flush and reason and not job.cancelled:
            tail = job.stops.push(job.utf8.flush())[0] + job.stops.flush()
            entries = self._released(job, len(tail), final=True)
            if tail or entries:
                job.emit(CompletionChunk(text=tail, logprobs=entries))
        now = time.perf_counter_ns()
        generated = job.generated
        tokens = None
        if job.return_tokens:
            tail_ok = generated and not self.model.is_eog(generated[-1])
            tokens = job.prompt + (generated if tail_ok else generated[:-1])
        job.emit(
            CompletionChunk(
                done=True,
                done_reason=reason,
                prompt_eval_count=len(job.prompt),
                prompt_cached=job.cached,
                prompt_eval_duration_ns=(job.t_first - job.t_prefill) if job.t_first else 0,
                eval_count=len(generated),
                eval_duration_ns=(now - job.t_first) if job.t_first and generated else 0,
                tokens=tokens,
                stop_sequence=job.stops.matched if reason == "stop" else "",
            )
        )
