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

A generating slot whose window is full shifts its context (Ollama's ``shift``, llama.cpp
server's context shift): it keeps its first ``num_keep`` entries (one more for the BOS token
of a model that adds one), drops half of the rest (``seq_rm``) and moves what follows back
by as many positions (``seq_add``; llama.cpp re-rotates those keys at the next decode), then
goes on. Only a text-only request on a cache that can move cells shifts (not an M-RoPE
model, a recurrent or hybrid one, nor a slot that holds image or audio rows: their entries
are not one position each); any other, or one that asked for ``shift: false``, ends with
``length`` there. Generation is bounded either way: ``num_predict``, a negative or huge
one bounded to ten windows as Ollama bounds it (:func:`generation_budget`).

Speculative decoding from the prompt (``draft_num_predict`` > 0, the default): a generating
slot may put a draft after its pending token, the tokens that followed the latest earlier
occurrence of its last few tokens in the prompt and output, or the copy it is following with
the edits learned from it (``runner/ngram.py``), every row with logits. After the decode
the pending token's row is sampled as always; while the token drawn is the one drafted
next, that drafted token is kept (it already sits in the KV) and its own row is sampled,
with the same chain, grammar, logprobs, stop strings and budget as a token decoded alone.
At the first difference the drawn token becomes the pending one and the cells of the rows
not kept are cut (``seq_rm``). Drawing the target's own token at each
row and keeping the draft while they agree is the rejection rule for a draft that is one
token for sure (accept with probability p(d), else a token from p without d), so sampled
output keeps its distribution (a seeded chain even makes the same draws) and greedy output
is the same, as far as llama.cpp computes a row of a batch as it computes it alone: its CPU
kernels do not quite (a few tenths of a logit apart for Qwen2.5-Coder, and for SmolLM2
once the context is long), so where two tokens are nearly tied either may come, exactly as
when several streams decode together. A request drafts only where it pays: its recent
acceptance rate against the measured cost of more rows in this batch (``ngram.best_length``),
with an exponential back-off of its probes. A request with media, or on a cache that cannot
cut a range (M-RoPE, recurrent, hybrid: ``can_shift``), never drafts; a draft never reaches
past the window, the request's budget or the batch.

What must stay true:

* Only the loop thread (:meth:`Engine.run`) touches the context, the batch and the samplers.
  Other threads call :meth:`Engine.submit`, :meth:`Engine.cancel` and :meth:`Engine.stop`,
  which only queue commands, and the vocabulary functions, which are read-only.
* ``slot.tokens`` is exactly what that slot's KV sequence holds, in order (token ids, and a
  medium's key once per embedding row). After a request the KV stays (prompt + generated
  tokens but the last one, which was never decoded) so that the next request with the same
  prefix evaluates only the rest. The one exception lasts from a decode to the end of its
  sampling: a draft's cells are in the KV, and its tokens join ``slot.tokens`` one by one as
  they are kept; the rest are cut before the step ends (:meth:`Engine._verify`).
* Every cell a later request may reuse holds what evaluating ``slot.tokens`` afresh would:
  the cells after a shift's kept prefix were computed while the dropped tokens were still
  in the window, so a request that shifted leaves its slot cut back to that prefix
  (:meth:`Engine._cut_shifted`), and the next request's output is the same as on a cold
  cache.
* Entry *i* of ``slot.tokens`` sits at KV position *i* minus ``slot.lag`` of the media spans
  the slot holds wholly before it (:meth:`_Slot.position`). An image in an M-RoPE model
  (Qwen2-VL and later) has more rows than positions: its rows share 2-D positions from its
  first one (``MediaSpan.n_pos`` of them), and what follows continues after those. For every
  other model ``lag`` stays 0 and positions are the indexes. Everything handed to llama.cpp
  (batch rows, media rows, the cut of a reused cache) is a position, never an index; the
  context's capacity (``n_ctx``) counts entries, since each one fills a KV cell.
* Every submitted request gets exactly one final event: a ``CompletionChunk`` with
  ``done=True`` or a :class:`RequestFailed`. Text events never contain a stop string or
  anything after it, nor a partial UTF-8 character. A final event ended by a stop string
  names it (``stop_sequence``).
* A request that asks for logprobs gets one entry per generated token, measured on the raw
  logits before anything (a grammar's mask included) touches them, and carried by the
  event that carries the token's last character (``runner/logprobs.py``); entries of
  tokens that a matched stop string swallowed whole are dropped with it. A request that
  does not ask costs nothing.
* A slot that fills its context shifts it or ends its request with ``length``; nothing
  ever overflows. The final chunk says how many tokens shifts dropped (``context_shifted``).
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
from concurrent.futures import ThreadPoolExecutor
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
from pollama.runner.drafter import DRAFT_MODEL_MAX, DraftModel, DraftRequest
from pollama.runner.logprobs import HeldLogprobs, Vector, log_softmax, token_entry
from pollama.runner.ngram import (
    INDEX_LIMIT,
    MODEL_KEY,
    WEIGHED_ROWS,
    WEIGHED_RUN,
    Acceptance,
    NgramIndex,
    StepCosts,
)
from pollama.runner.prefill import TILE, ShortChunks
from pollama.runner.tokens import common_prefix

if TYPE_CHECKING:  # llama_cpp is imported only where the engine really runs (the worker)
    from pollama.runner.grammar import Constraint, Grammars
    from pollama.runner.llama import Context, Model, SamplerChain
    from pollama.runner.media import MediaSpan, Projector
    from pollama.runner.tuning import ThreadTuner

__all__ = [
    "Engine",
    "Event",
    "RequestFailed",
    "StopMatcher",
    "Utf8Decoder",
    "build_sampler",
    "fair_share",
    "generation_budget",
]


@dataclass(frozen=True)
class RequestFailed:
    """The final event of a request that could not run: ``kind`` is ``invalid`` (the caller's
    fault, e.g. a prompt longer than the context) or ``internal``."""

    kind: str
    message: str


_SLOT_SIMILARITY = 0.1  # llama-server's --slot-prompt-similarity default
# Image (or audio) rows decoded per step while other sequences generate: a medium's 256+
# rows in one decode would stall their streams for as long as a 256-token prompt does.
_MEDIA_ROWS = 32
# A negative (infinite) or bigger num_predict generates at most this many windows' worth of
# tokens (Ollama's ``10 * num_ctx``): with context shift a window no longer ends a request.
_PREDICT_WINDOWS = 10

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


def _media_boundary(media: Sequence[MediaSpan], reuse: int) -> int:
    """``reuse`` moved back to the start of a media span it falls inside: a medium's rows
    are decoded together, so a cache is only ever kept up to a medium's edge."""
    for span in media:
        if span.start < reuse < span.end:
            return span.start
    return reuse


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


def generation_budget(num_predict: int, n_ctx: int) -> int:
    """The most tokens a request may generate: ``num_predict``, a negative or huge one
    bounded to ten windows as Ollama bounds it, so that a request that shifts its context
    still ends (0 stays 0: only the prompt is evaluated)."""
    bound = _PREDICT_WINDOWS * n_ctx
    return bound if num_predict < 0 or num_predict > bound else num_predict


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
    """One KV sequence: what it holds (``tokens``) and where (see the module docstring).

    ``held`` lists, for each wholly decoded media span with fewer positions than rows, its
    end index and that difference; ``lag`` is their sum, so the next entry's position is
    ``len(tokens) - lag`` (an ordinary model never adds to either)."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    last_used: int = 0
    job: _Job | None = None
    held: list[tuple[int, int]] = field(default_factory=list)
    lag: int = 0

    def position(self, index: int) -> int:
        """The KV position of entry ``index`` (never inside a media span)."""
        return index - sum(lag for end, lag in self.held if end <= index)

    def truncate(self, index: int) -> None:
        """Keep the first ``index`` entries (the caller cut the KV at their position)."""
        del self.tokens[index:]
        self.held = [(end, lag) for end, lag in self.held if end <= index]
        self.lag = sum(lag for _, lag in self.held)

    def hold_span(self, span: MediaSpan) -> None:
        """The span's rows are all decoded: what follows sits ``n_pos`` after its start."""
        if span.n_pos != span.n_tokens:
            self.held.append((span.end, span.n_tokens - span.n_pos))
            self.lag += span.n_tokens - span.n_pos

    def reset(self) -> None:
        """The KV sequence was emptied."""
        self.tokens.clear()
        self.held.clear()
        self.lag = 0


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
    media: list[MediaSpan] = field(default_factory=list)  # image/audio spans, in order
    budget: int = 0  # tokens it may generate (:func:`generation_budget`)
    shift: bool = False  # may shift its context when the window is full
    keep: int = 0  # entries a shift keeps at the start of the window
    shifted: int = 0  # tokens shifts dropped so far
    # Speculative decoding (``runner/ngram.py``): None when the request never drafts.
    drafting: Acceptance | None = None
    draft_max: int = 0  # draft_num_predict: the most tokens one draft holds
    index: NgramIndex | None = None  # the prompt and output, built at the first draft
    indexed: int = 0  # generated tokens already in the index
    draft: list[int] = field(default_factory=list)  # drafted tokens in the batch being decoded
    draft_row: int = -1  # the batch row of the first of them
    draft_key: int = 0  # the run of the copy they came from (MODEL_KEY: the draft model)
    asked_draft_model: bool = False  # its first ask catches up on its prompt (drafter.py)
    # a copy found but not drafted: (its first token, its run), checked against the next draw
    shadow: tuple[int, int] | None = None

    def next_span(self) -> MediaSpan | None:
        """The first media span not yet wholly in the KV cache (None: only text is left)."""
        for span in self.media:
            if span.end > self.next:
                return span
        return None

    def media_reached(self) -> MediaSpan | None:
        """The span whose rows come next in the prompt (None: text comes next)."""
        span = self.next_span()
        return span if span is not None and span.start <= self.next else None

    def text_left(self) -> int:
        """Prompt tokens that can go into a batch now: up to the next media span."""
        span = self.next_span()
        return max(0, (span.start if span is not None else len(self.prompt)) - self.next)

    def blocked(self) -> bool:
        """Waiting for the media thread to encode the span its prompt has reached."""
        span = self.media_reached()
        return (
            self.pending < 0
            and span is not None
            and span.embeddings is None
            and not span.error
        )


class _ModelSpelling:
    """The model's tokenizer as the n-gram index's :class:`~pollama.runner.ngram.Spelling`:
    a learned rename of ``" total"`` is then also drafted where the prompt spells the word
    ``"total"`` (a dict key), which is another token."""

    def __init__(self, model: Model) -> None:
        self._model = model

    def text(self, tokens: Sequence[int]) -> str:
        return b"".join(self._model.token_to_piece(t) for t in tokens).decode("utf-8", "replace")

    def tokens(self, text: str) -> list[int]:
        return self._model.tokenize(text, add_special=False, parse_special=False)


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
        projector: Projector | None = None,
        n_threads: int = 1,
        log: Callable[[str], None] = lambda _message: None,
        drafter: DraftModel | None = None,
    ) -> None:
        from pollama.runner.llama import Batch

        self.model = model
        self.drafter = drafter  # a draft model (Modelfile DRAFT), beside the prompt's n-grams
        self.ctx = ctx
        self.tuner = tuner
        self.projector = projector
        # Media (a projector's work) run on one thread of their own: preparing a request's
        # images, encoding them, freeing their chunks, in that order, while this loop decodes.
        self._media_pool = (
            ThreadPoolExecutor(1, thread_name_prefix="media") if projector is not None else None
        )
        self._preparing: dict[object, Emit] = {}  # requests whose media are being prepared
        self._dropped: set[object] = set()  # of those, the ones cancelled meanwhile
        # While the media thread encodes, the decode steps run on fewer threads (one on two
        # cores), so that the two never fight over cores: ggml's threads meet at a barrier
        # after every graph node, and a partner that is not running stalls them all.
        self.n_threads = n_threads
        self._log = log
        self._encoding = threading.Event()
        self._yielding = False
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
        self.can_shift = ctx.can_shift()
        # Decode time by rows, per number of generating slots (``runner/ngram.py``).
        self._costs: dict[int, StepCosts] = {}
        # Short prompt chunks against full tiles, by depth (``runner/prefill.py``): the
        # prompt cache keeps it for the next worker and sets it back before :meth:`run`.
        self.short_chunks = ShortChunks()
        self._spelling = _ModelSpelling(model)  # a learned edit's other spellings

    # -- called from any thread --------------------------------------------------------

    def submit(self, req_id: int, request: CompletionRequest, emit: Emit) -> None:
        """Queue a completion; a request that cannot run fails at once through ``emit``.
        One with media goes through the media thread first (:meth:`_prepare`)."""
        if request.media:
            self._submit_media(req_id, request, emit)
            return
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
        job = self._make_job(req_id, request, emit, prompt)
        if job is not None and not self._command("submit", job):
            emit(RequestFailed("internal", "the model runner is shutting down"))

    def _make_job(
        self,
        req_id: int,
        request: CompletionRequest,
        emit: Emit,
        prompt: list[int],
        media: list[MediaSpan] | None = None,
    ) -> _Job | None:
        """The request's job, or None once ``emit`` said why it cannot run."""
        failure = self._check_prompt(prompt, media or [])
        if not failure and not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            failure = f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"
        if failure:
            emit(RequestFailed("invalid", failure))
            return None
        job = _Job(req_id, emit, prompt, request.options, request.return_tokens)
        job.media = media or []
        job.budget = generation_budget(request.options.num_predict, self.n_ctx)
        job.shift = request.shift and self.can_shift and not job.media
        job.keep = self._keep(request.options.num_keep, len(prompt))
        job.stops = StopMatcher(request.options.stop)
        job.draft_max = request.options.draft_num_predict
        if job.draft_max > 0 and self.can_shift and not job.media:
            job.drafting = Acceptance()
        if request.logprobs:
            job.held, job.top_logprobs = HeldLogprobs(), request.top_logprobs
        if request.format is not None:
            try:
                job.grammar = self.grammars().compile(request.format)
            except InvalidRequest as exc:
                emit(RequestFailed("invalid", str(exc)))
                return None
            except Exception as exc:  # reported to the caller, never raised in its thread
                emit(RequestFailed("internal", f"structured output failed: {exc}"))
                return None
        return job

    def _keep(self, num_keep: int, n_prompt: int) -> int:
        """The entries a context shift keeps: ``num_keep`` (-1: the whole prompt), one more
        for a BOS token (as Ollama counts), and at least one fewer than the window, so that
        every shift drops something."""
        keep = n_prompt if num_keep < 0 else num_keep + int(self.model.add_bos)
        return max(0, min(keep, self.n_ctx - 1))

    def _check_prompt(self, prompt: list[int], media: list[MediaSpan]) -> str:
        """Why the prompt cannot run ("" when it can): empty, or longer than a sequence."""
        if not prompt:
            return "the prompt is empty"
        if len(prompt) <= self.n_ctx:
            return ""
        in_media = sum(span.n_tokens for span in media)
        detail = f" ({in_media} of them for {len(media)} image(s) or audio clip(s))"
        return (
            f"the prompt is {len(prompt)} tokens{detail if media else ''}, more than the "
            f"context of {self.n_ctx} tokens per sequence"
        )

    def _submit_media(self, req_id: int, request: CompletionRequest, emit: Emit) -> None:
        if self.projector is None or self._media_pool is None:
            emit(RequestFailed("invalid", "this model has no projector: it cannot take images"))
            return
        with self._wake:
            if self._stopping:
                emit(RequestFailed("internal", "the model runner is shutting down"))
                return
            self._preparing[req_id] = emit
        self._media_pool.submit(self._prepare, req_id, request, emit)

    def _prepare(self, req_id: int, request: CompletionRequest, emit: Emit) -> None:
        """On the media thread: decode and tokenize the request's media and text, then
        queue the job (or, having failed it, tell the loop it is gone)."""
        assert self.projector is not None
        job = None
        try:
            prompt, spans = self.projector.tokenize(
                request.prompt, request.media, request.add_special
            )
        except InvalidRequest as exc:
            emit(RequestFailed("invalid", str(exc)))
        except Exception as exc:  # reported to the caller, never raised in its thread
            emit(RequestFailed("internal", f"preparing the media failed: {exc}"))
        else:
            job = self._make_job(req_id, request, emit, prompt, spans)
            if job is None:
                self._release(spans)
        self._command("prepared", (req_id, job))

    def _encode(self, job: _Job, span: MediaSpan) -> None:
        """On the media thread: the span's embeddings (skipped once the job is over)."""
        assert self.projector is not None
        if job.cancelled or job.slot is None:
            return
        self._encoding.set()
        start = time.perf_counter()
        try:
            span.embeddings = self.projector.encode(span)
        except Exception as exc:  # the job fails on the loop thread
            span.error = str(exc) or type(exc).__name__
        finally:
            self._encoding.clear()
        elapsed = (time.perf_counter() - start) * 1000
        self._log(f"{span.kind} encoded ({span.n_tokens} rows) in {elapsed:.0f} ms")
        self._command("encoded", job.req_id)

    def _release(self, spans: Sequence[MediaSpan]) -> None:
        """Free media spans on the media thread, after any encode of them still running."""
        projector, pool = self.projector, self._media_pool
        if not spans or projector is None or pool is None:
            return
        try:
            pool.submit(lambda: [projector.release(span) for span in spans])
        except RuntimeError:  # the pool is shut down: the process is ending
            pass

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

        The loop sleeps only when there is nothing it could do (:meth:`_has_work`): no
        command, no request in a slot that can move, and no waiting request with a free slot.
        A slot frees itself inside :meth:`_step` (a cancelled or finished request) without
        any command arriving, so any request in a slot that can move keeps the loop awake:
        sleeping then would strand the waiting request and every later one behind it. Only
        requests waiting for their media to be encoded cannot move; the media thread's
        ``encoded`` command wakes the loop.
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
                self._apply(kind, value)
            try:
                self._admit()
                if self._busy():
                    self._step()
            except Exception as exc:  # a bug must cost the requests in flight, not the worker
                self._fail_all(f"{type(exc).__name__}: {exc}")
        with self._wake:  # no command can be queued after this
            for kind, value in self._commands:
                if kind in ("submit", "prepared"):
                    self._apply(kind, value)
            self._commands.clear()
            preparing, self._preparing = list(self._preparing.values()), {}
        if self._media_pool is not None:
            self._media_pool.shutdown(wait=False, cancel_futures=True)
        for emit in preparing:
            emit(CompletionChunk(done=True))
        for job in self._waiting:
            self._finish(job, "")
        self._waiting.clear()
        for slot in self.slots:
            if slot.job is not None:
                self._finish(slot.job, "")

    def _apply(self, kind: str, value: object) -> None:
        """One queued command: a job to wait for a slot, a job whose media are prepared
        (``(req_id, job or None)``), a cancel, or ``encoded`` (only a wake-up)."""
        if kind == "submit":
            assert isinstance(value, _Job)
            self._waiting.append(value)
        elif kind == "prepared":
            req_id, job = value  # type: ignore[misc]
            with self._wake:
                self._preparing.pop(req_id, None)
            if job is None:
                self._dropped.discard(req_id)
            elif req_id in self._dropped:
                self._dropped.discard(req_id)
                self._finish(job, "")
            else:
                self._waiting.append(job)
        elif kind == "cancel":
            self._cancel(value)

    def _has_work(self) -> bool:
        """A request in a slot that can move (not one only waiting for its media to be
        encoded: the ``encoded`` command wakes the loop), or one waiting for a slot that a
        step may free or that is free. A cancelled request can always move."""
        for slot in self.slots:
            job = slot.job
            if job is not None and (job.cancelled or not job.blocked()):
                return True
        return bool(self._waiting) and any(slot.job is None for slot in self.slots)

    def _busy(self) -> bool:
        return any(slot.job is not None for slot in self.slots)

    def _cancel(self, req_id: object) -> None:
        with self._wake:
            if req_id in self._preparing:
                self._dropped.add(req_id)
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
            reuse = cached = _media_boundary(job.media, min(shared, len(job.prompt) - 1))
            if not job.media:  # a short rest after a long cached prefix: evaluate some cached
                # tokens again where a full tile costs less than the rest (runner/prefill.py)
                left, depth = len(job.prompt) - reuse, slot.position(reuse)
                reuse -= self.short_chunks.rows_back(left, depth)
            if reuse < len(slot.tokens):
                if not self.ctx.seq_rm(slot.seq, slot.position(reuse), -1):
                    self.ctx.seq_rm(slot.seq, -1, -1)  # cannot cut this cache: start over
                    reuse = 0
                slot.truncate(reuse)
            # ``cached``: what the cache held, the tokens evaluated again for a tile included
            job.slot, job.next, job.cached = slot, reuse, cached if reuse else 0
            slot.job = job
            opts = job.options
            job.sampler, history = build_sampler(opts, self.model.n_vocab, self.n_ctx)
            for token in job.prompt[max(0, len(job.prompt) - history) :] if history else ():
                if token >= 0:  # media rows are no token
                    job.sampler.accept(token)
            job.fast_greedy = opts.temperature <= 0 and history == 0
            job.penalized = history > 0
            self._queue_encodes(job)

    def _queue_encodes(self, job: _Job) -> None:
        """Encode, in order, the job's media that its slot's cache does not already hold."""
        pool = self._media_pool
        if pool is None:
            return
        for span in job.media:
            if span.start >= job.next and not span.queued:
                span.queued = True
                pool.submit(self._encode, job, span)

    def _step(self) -> None:
        """One loop step: build the batch, one ``llama_decode``, then sample every row that
        asked for logits. A prompt that reached an encoded medium has its rows decoded
        first, in a decode of their own (:meth:`_decode_media`)."""
        if self._media_pool is not None:
            self._decode_media()
        decoding, prefilling = self._add_pending_tokens()
        if decoding:
            self._add_drafts(decoding)
        chunked = self._add_prompt_chunks(prefilling, self.batch.n_tokens)
        rows = self.batch.n_tokens
        if rows == 0:
            return
        sharing = self._media_pool is not None and self._share_cores()  # only with media
        tuner = None if sharing else self.tuner
        if tuner is not None:
            if chunked:
                tuner.interrupt()
            else:
                tuner.threads_for_step(rows)
        # Short chunks are weighed on all the threads: a probe's or a busy machine's fewer
        # threads would make one row look dear, and the costs outlive this worker.
        all_threads = tuner is None or tuner.running == tuner.n_max
        start = time.perf_counter_ns()
        rc = self.ctx.decode(self.batch)
        now = time.perf_counter_ns()
        if rc != 0:
            self._decode_failed(rc, decoding + chunked)
            return
        if not chunked and not sharing:  # decode-only steps: what drafting weighs
            if tuner is not None:
                tuner.record(rows, (now - start) / 1e9)
            self._step_costs(len(decoding)).record(rows, (now - start) / 1e9)
        # One sequence's rows alone: a prompt chunk, or one row decoded (not a draft, whose
        # rows all ask for logits where a prompt chunk's last alone does).
        alone = len(decoding) + len(chunked) == 1 and bool(chunked or rows == 1)
        if alone and not sharing and all_threads:
            self.short_chunks.record(rows, self._depth(decoding or chunked), (now - start) / 1e9)
        self._prefill_cap = min(self.n_batch, self._prefill_cap * 2)
        self._record_decoded(decoding, chunked, now)
        for job in decoding + chunked:
            if job.row >= 0 and job.slot is not None:
                if job.draft:
                    self._verify(job)
                else:
                    self._sample_and_observe(job)

    @staticmethod
    def _depth(jobs: list[_Job]) -> int:
        """The KV position the one job's rows of this step start at."""
        (job,) = jobs
        slot = job.slot
        assert slot is not None
        return (len(slot.tokens) if job.pending >= 0 else job.next) - slot.lag

    def _share_cores(self) -> bool:
        """Whether this step yields cores to an encode running on the media thread (then
        it is not measured by the thread tuner); sets the decode threads accordingly."""
        encoding = self._encoding.is_set()
        if encoding != self._yielding:
            self._yielding = encoding
            if self.tuner is not None:
                self.tuner.interrupt()
            n = self.tuner.current if self.tuner is not None else self.n_threads
            n = max(1, self.n_threads // 2) if encoding else n
            self.ctx.set_threads(n, n)
        return encoding

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
                if len(slot.tokens) >= self.n_ctx and not self._shift(job):
                    self._finish(job, "length")
                    continue
                job.row = batch.add(job.pending, len(slot.tokens) - slot.lag, slot.seq, True)
                decoding.append(job)
            else:
                prefilling.append(job)
        return decoding, prefilling

    def _shift(self, job: _Job) -> bool:
        """Make room in the job's full window (the module docstring): keep ``job.keep``
        entries, drop half of the rest, move the others back. False when the job may not
        shift, or when the cache refused the cut (the slot is then emptied, since what it
        holds is unknown)."""
        slot = job.slot
        assert slot is not None
        if not job.shift or slot.held:  # positions are indexes only without media
            return False
        n_past, keep = len(slot.tokens), job.keep
        discard = max(1, (n_past - keep) // 2)
        if not self.ctx.seq_rm(slot.seq, keep, keep + discard):
            self.ctx.seq_rm(slot.seq, -1, -1)
            slot.reset()
            return False
        self.ctx.seq_add(slot.seq, keep + discard, n_past, -discard)
        del slot.tokens[keep : keep + discard]
        job.shifted += discard
        self._log(f"context shift in sequence {slot.seq}: kept {keep}, dropped {discard}")
        return True

    def _cut_shifted(self, job: _Job, slot: _Slot) -> None:
        """After a request that shifted: keep only the slot's kept prefix, the cells that
        hold what a fresh evaluation would (the module docstring)."""
        if len(slot.tokens) > job.keep:
            if self.ctx.seq_rm(slot.seq, job.keep, -1):
                slot.truncate(job.keep)
            else:
                self.ctx.seq_rm(slot.seq, -1, -1)
                slot.reset()

    def _step_costs(self, streams: int) -> StepCosts:
        """The decode costs of steps with ``streams`` generating slots, whose reference is
        the step that drafts nothing: one row each."""
        costs = self._costs.get(streams)
        if costs is None:
            costs = self._costs[streams] = StepCosts(reference=streams)
        return costs

    def _add_drafts(self, decoding: list[_Job]) -> None:
        """After the pending tokens, the draft of every generating job that drafts, has one
        and finds it pays in this batch (``runner/ngram.py``), its rows one after another,
        each with logits. A draft ends before the window's end, the job's budget (each row
        yields at most one token) and the batch's end."""
        costs = self._step_costs(len(decoding))
        streams = len(decoding)  # every draft slows them all (ngram.best_length)
        batch = self.batch
        wants: list[tuple[_Job, int]] = []  # jobs the draft model drafts for, and how much
        wanted = 0  # their rows, not in the batch yet
        for job in decoding:
            job.draft, job.shadow = [], None
            slot, drafting = job.slot, job.drafting
            if drafting is None or slot is None or slot.held:
                continue
            room = min(
                job.draft_max,
                job.budget - len(job.generated) - 1,
                self.n_ctx - len(slot.tokens) - 1,  # the pending token is not in them yet
                self.n_batch - batch.n_tokens,
            )
            rows = batch.n_tokens + wanted
            if self._beyond_pay(job, room, streams, rows, costs):
                continue  # its index catches up with the output at its next lookup
            candidate, key = self._lookup(job, room) if room > 0 else ([], 0)
            if job.options.draft_always or not candidate:  # forced, or none (0)
                k = len(candidate)
            else:
                k = drafting.length(key, len(candidate), streams, rows, costs)
            if k > 0:
                self._add_draft(job, candidate[:k], key)
                continue
            if candidate:
                job.shadow = (candidate[0], key)
            if self.drafter is not None and room > 0:
                limit = min(room, DRAFT_MODEL_MAX)
                per_token = self.drafter.step_seconds
                if job.options.draft_always:  # forced: as far as the draft model is sure
                    k = limit
                else:
                    k = drafting.length(MODEL_KEY, limit, streams, rows, costs, per_token)
                if k > 0:
                    wants.append((job, k))
                    wanted += k
        if wants:
            self._add_model_drafts(wants)

    def _beyond_pay(
        self, job: _Job, room: int, streams: int, rows: int, costs: StepCosts
    ) -> bool:
        """Whether no draft of the job's could pay in this step even with every token kept
        (``StepCosts.longest_that_may_pay``: at many streams on a CPU), and no draft model
        or forced drafting asks more. Then the job does not look up a copy, nor learn its
        odds from one not drafted, which would cost a weighing pass on the row for a choice
        this step could not make: measured with SmolLM2 at 8 streams on 2 cores, lookups
        and weighing took 0.3-0.5 ms of a 32-44 ms step. The index takes the output at its
        next lookup (a copy it follows is followed token by token there)."""
        if room <= 0 or self.drafter is not None or job.options.draft_always:
            return False
        return costs.longest_that_may_pay(room, streams, rows) == 0

    def _add_draft(self, job: _Job, draft: list[int], key: int) -> None:
        """Put ``draft`` in the batch after the job's pending token, every row with logits,
        up to its first end-of-generation token (that token included): nothing after it
        can be kept, since the request ends there, and a copy of the prompt runs on into
        the chat template's next turn (``<|im_end|>``, then the turn's header), so the last
        draft of an answer that copies its prompt would otherwise verify a full draft for
        one token. Only the chosen draft is checked, never a lookup that is not drafted."""
        slot = job.slot
        assert slot is not None
        job.draft, job.draft_key = [], key
        job.draft_row = self.batch.n_tokens
        pos = len(slot.tokens) + 1 - slot.lag
        for token in draft:
            self.batch.add(token, pos + len(job.draft), slot.seq, True)
            job.draft.append(token)
            if self.model.is_eog(token):
                break

    def _add_model_drafts(self, wants: list[tuple[_Job, int]]) -> None:
        """Drafts from the draft model for ``wants`` (one shared decode per drafted token),
        each cut to what the batch still holds."""
        assert self.drafter is not None
        asks = []
        for job, k in wants:
            slot = job.slot
            assert slot is not None
            history = [*slot.tokens, job.pending]
            asks.append(DraftRequest(slot.seq, history, k, fresh=not job.asked_draft_model))
            job.asked_draft_model = True
        drafts = self.drafter.draft(asks, lambda: self._stopping)
        for (job, _k), draft in zip(wants, drafts, strict=True):
            draft = draft[: self.n_batch - self.batch.n_tokens]
            if draft:
                self._add_draft(job, draft, MODEL_KEY)
            elif job.drafting is not None:  # the draft model was unsure: its work was lost
                job.drafting.record(MODEL_KEY, 1, 0)

    def _lookup(self, job: _Job, limit: int) -> tuple[list[int], int]:
        """Up to ``limit`` tokens drafted from the job's prompt and output so far, and the
        run of the copy they continue; the index is built at the first look, then follows
        the output."""
        if job.index is None:
            job.index = NgramIndex(
                job.prompt[-INDEX_LIMIT:] + job.generated, spelling=self._spelling
            )
        else:
            job.index.extend(job.generated[job.indexed :])
        job.indexed = len(job.generated)
        return job.index.draft(limit)

    def _sample_and_observe(self, job: _Job) -> None:
        """Sample the job's row; where a copy was found but not drafted, tell the job's
        odds how likely its first token was to be drawn, and whether it was
        (``Acceptance.observe``)."""
        n, shadow = len(job.generated), job.shadow
        if shadow is None or job.drafting is None:
            self._sample(job)
            return
        token, key = shadow
        weighed = key >= WEIGHED_RUN
        weight = self._sample(job, token if weighed else -1)
        if len(job.generated) > n:
            hit = job.generated[n] == token
            job.drafting.observe(key, hit, weight if weighed else None)

    def _verify(self, job: _Job) -> None:
        """Sample the pending token's row, then each drafted row while the token drawn is
        the one drafted there: that token is kept (its cell already holds it) and its row
        gives the next one. Then the cells of the drafted rows not kept are cut, so that
        the slot's tokens are again what its sequence holds."""
        slot, draft, drafting = job.slot, job.draft, job.drafting
        assert slot is not None and drafting is not None
        job.draft = []
        kept = 0
        drafting.drafted += len(draft)  # counted first: a sample may end the request
        weights = [self._sample(job, draft[0])]  # each tested token's chance of being kept
        weighed = min(len(draft), WEIGHED_ROWS)
        while slot.job is job and kept < len(draft) and job.pending == draft[kept]:
            slot.tokens.append(draft[kept])
            job.row = job.draft_row + kept
            kept += 1
            drafting.accepted += 1
            if kept < weighed:
                weights.append(self._sample(job, draft[kept]))
            else:
                self._sample(job)
        drafting.record(job.draft_key, len(draft), kept, weights)
        if kept == len(draft) and slot.job is job:
            return
        if not self.ctx.seq_rm(slot.seq, len(slot.tokens) - slot.lag, -1):
            self.ctx.seq_rm(slot.seq, -1, -1)  # what it holds is unknown: start over
            slot.reset()
            if slot.job is job:
                self._finish(job, "", failure="the KV cache refused to drop a draft")

    def _add_prompt_chunks(self, prefilling: list[_Job], decoding: int) -> list[_Job]:
        """Add chunks of the prompts being evaluated, sharing what the ``decoding`` rows
        (pending tokens and drafts) left of the batch fairly (and at most the prefill cap);
        returns the jobs that got a chunk. Only a prompt's last chunk asks for logits. A
        chunk that would leave fewer than a tile's rows for the next one leaves a tile
        (540 tokens: 476 and 64, not 512 and 28): the same rows, but llama.cpp's CPU
        flash-attention kernel takes 28 rows one by one, each reading the whole cache."""
        budget = min(self.n_batch - decoding, self._prefill_cap)
        wants = [j.text_left() for j in prefilling]
        now = time.perf_counter_ns()
        chunked: list[_Job] = []
        for job, want, n in zip(prefilling, wants, fair_share(budget, wants), strict=True):
            rest = want - n
            if 0 < rest < TILE < n:  # leave the next chunk a whole tile (runner/prefill.py)
                n -= TILE - rest
            if n == 0:
                continue
            slot = job.slot
            assert slot is not None
            last = job.next + n == len(job.prompt)
            # the slot holds the prompt up to job.next, so its position is job.next - lag
            row = self.batch.add_run(
                job.prompt[job.next : job.next + n], job.next - slot.lag, slot.seq, last
            )
            job.row = row if last else -1
            job.chunk = n
            job.t_prefill = job.t_prefill or now
            chunked.append(job)
        return chunked

    def _decode_media(self) -> None:
        """Decode rows of every encoded medium that a prompt has reached, in a decode of
        their own (a batch holds tokens or embeddings, not both). While other sequences
        generate, at most :data:`_MEDIA_ROWS` rows per step, so their tokens keep coming;
        otherwise up to ``n_batch``. A non-causal medium goes whole. A medium that ends its
        prompt gives the logits of its last row, sampled at once."""
        streaming = any(slot.job is not None and slot.job.pending >= 0 for slot in self.slots)
        for slot in self.slots:
            job = slot.job
            span = job.media_reached() if job is not None and job.pending < 0 else None
            if job is None or span is None or job.cancelled:
                continue
            if span.error:
                self._finish(job, "", failure=f"the {span.kind} could not be encoded: {span.error}")
            elif span.embeddings is not None:
                limit = _MEDIA_ROWS if streaming else self.n_batch
                self._decode_rows(job, span, span.n_tokens if span.non_causal else limit)

    def _decode_rows(self, job: _Job, span: MediaSpan, limit: int) -> None:
        """Decode the span's next ``limit`` rows at their positions; the slot then holds
        them (a medium cut off by a cancel is never reused: ``_media_boundary``). The span's
        first position is its start's (the slot's ``lag`` counts only whole spans before)."""
        slot, rows, projector = job.slot, span.embeddings, self.projector
        assert slot is not None and rows is not None and projector is not None
        if self.tuner is not None:
            self.tuner.interrupt()
        job.t_prefill = job.t_prefill or time.perf_counter_ns()
        at = job.next - span.start
        chunk = rows[at : at + limit]
        last = span.end == len(job.prompt) and at + len(chunk) == span.n_tokens
        positions = projector.positions(span, span.start - slot.lag)
        if isinstance(positions, int):
            positions += at
        else:
            positions = np.ascontiguousarray(positions[:, at : at + len(chunk)])
        rc = self.ctx.decode_embeddings(
            chunk, positions, slot.seq, output_last=last, non_causal=span.non_causal
        )
        if rc != 0:  # the rows decoded so far are dropped with the rest
            self.ctx.seq_rm(slot.seq, -1, -1)
            slot.reset()
            failure = f"llama_decode failed with status {rc} on the {span.kind}"
            self._finish(job, "", failure=failure)
            return
        slot.tokens.extend([span.key] * len(chunk))
        job.next += len(chunk)
        if job.next < span.end:
            return
        slot.hold_span(span)
        span.embeddings = None
        if last:
            job.t_first = time.perf_counter_ns()
            if job.options.num_predict == 0:
                self._finish(job, "length")
            else:
                job.row = len(chunk) - 1
                self._sample(job)
                job.row = -1

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

    def _sample(self, job: _Job, expected: int = -1) -> float:
        """Draw the job's next token from its row and pass it on (or end the request).
        Returns the chance that the token drawn was ``expected`` (a drafted token, or a
        copy's): the sampler chain's probability of it where the request samples, else 1
        or 0 as it was drawn or not (greedy, a grammar); 0 where none is expected."""
        # Measured first: a grammar may set refused logits to -inf in place while sampling.
        measured = log_softmax(self.ctx.logits(job.row)) if job.held is not None else None
        grammar = job.grammar
        weight = -1.0  # not weighed: as drawn
        if grammar is not None:
            token = self._sample_constrained(job, grammar)
            if token < 0:
                # Only allowed tokens are ever fed, so a matcher that stops on its own is
                # the schema's doing (llguidance's lexer limits: a pattern like a{1000000}).
                problem = brief(grammar.error) or "the grammar allows no next token"
                failure = f"the JSON schema in format is too complex to follow: {problem}"
                self._finish(job, "", failure=failure, kind="invalid")
                return 0.0
        elif job.fast_greedy:
            token = int(self.ctx.logits(job.row).argmax())
        elif expected >= 0:
            assert job.sampler is not None
            token, weight = job.sampler.sample_weighing(self.ctx, job.row, expected)
        else:
            assert job.sampler is not None
            token = job.sampler.sample(self.ctx, job.row)
        if weight < 0:
            weight = 1.0 if token == expected else 0.0
        self._pass_on(job, token, measured)
        return weight

    def _pass_on(self, job: _Job, token: int, measured: Vector | None) -> None:
        """The token drawn: into the output (its text, logprobs, stops), or the end."""
        grammar = job.grammar
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
        elif len(job.generated) >= job.budget:
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
        left = job.budget - len(job.generated)  # samples left, this one included
        if not job.shift:  # the window ends it first
            left = min(left, self.n_ctx - len(job.slot.tokens) + 1)
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
            slot.reset()
            self._finish(job, "", failure=f"llama_decode failed with status {rc}")

    def _fail_all(self, message: str) -> None:
        for slot in self.slots:
            if slot.job is not None:
                self.ctx.seq_rm(slot.seq, -1, -1)
                slot.reset()
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
            if job.shifted:
                self._cut_shifted(job, slot)
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        job.grammar = None
        if job.media:
            self._release(job.media)
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
            prompt = [t for t in job.prompt if t >= 0] if job.media else job.prompt
            tokens = prompt + (generated if tail_ok else generated[:-1])
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
                context_shifted=job.shifted,
                draft_tokens=job.drafting.drafted if job.drafting is not None else 0,
                draft_accepted=job.drafting.accepted if job.drafting is not None else 0,
            )
        )

    # -- the prompt cache on disk (runner/kvstate.py) -----------------------------------
    # Called only while the loop is not running (before :meth:`run`, or after it returned),
    # on the thread that runs it: they read and set what the slots hold.

    def resting_slots(self) -> list[tuple[int, list[int]]]:
        """``(seq, tokens)`` of every idle slot a file can hold, most recently used first:
        text only (no medium's rows), on a cache whose entries are one position each
        (:attr:`can_shift`: not M-RoPE, recurrent or hybrid), so that the tokens alone say
        where every cell sits."""
        if not self.can_shift:
            return []
        idle = [
            slot
            for slot in self.slots
            if slot.job is None and slot.tokens and not slot.held and min(slot.tokens) >= 0
        ]
        idle.sort(key=lambda slot: slot.last_used, reverse=True)
        return [(slot.seq, list(slot.tokens)) for slot in idle]

    def empty_slots(self) -> list[int]:
        """The sequences that hold nothing (where a saved sequence may be read back)."""
        return [slot.seq for slot in self.slots if slot.job is None and not slot.tokens]

    def adopt_slot(self, seq: int, tokens: list[int]) -> None:
        """The empty sequence ``seq`` now holds ``tokens`` at positions 0.. (a saved
        sequence read back); it is the most recently used slot."""
        slot = self.slots[seq]
        assert slot.job is None and not slot.tokens
        slot.tokens.extend(tokens)
        slot.last_used = next(self._clock)
