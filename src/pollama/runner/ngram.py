"""Drafting from the request's own tokens (prompt lookup), and deciding when a draft pays.

When the output repeats spans of the prompt (a rewrite, an edit of code, a form filled from a
document), the tokens that followed the last occurrence of the output's latest few tokens are
a good guess of what comes next. The engine (``runner/engine.py``) puts such a draft in the
batch after the slot's pending token, with logits on every row, and keeps the drafted tokens
that the request's own sampling would have drawn (llama-server's ``--spec-type
ngram-simple``). This module holds the pure parts, with no llama.cpp in them:

* :class:`NgramIndex`, the lookup: where each n-gram of the request's tokens (prompt, then
  output) was last followed by something, for the longest key that matches; the copy it
  finds is followed while the output agrees with it, and the edits the output makes to it
  (a renamed variable) are learned and drafted at their next occurrences;
* :class:`StepCosts`, what a decode costs by its number of rows, measured on the loop's own
  decode-only steps (a row count never measured is guessed optimistically, then tried);
* :class:`Acceptance`, per request: how often drafted tokens were accepted lately, by how
  long their copy had agreed, and the draft length that makes the most tokens per second
  of decoding (:func:`best_length`); the odds also learn from the copies not drafted,
  checked against the token each step draws.

On a CPU a batch of k rows costs far more than one row (small models are compute-bound), so
the decision weighs the expected extra tokens against the measured extra time, for every
stream in the batch: with several streams decoding, a draft slows every one of them, so it
must pay its own stream as much as it costs them all (:func:`best_length`).

What must stay true: a draft only ever guesses; whether a drafted token is kept is decided by
sampling the model at its row, so nothing here can change what a request outputs, only how
fast it comes.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from pollama.runner.shapes import MovingMeans, on_the_line

__all__ = [
    "SUBS_MAX",
    "Spelling",
    "MODEL_KEY",
    "Acceptance",
    "NgramIndex",
    "StepCosts",
    "best_length",
    "cheapest_probe",
    "expected_tokens",
    "word_variants",
]

KEY_SIZES = (8, 4, 3, 2)
"""The n-gram lengths looked up, longest first: a long key that matches is a much safer guess
than the last occurrence of two common tokens."""
INDEX_LIMIT = 16384
"""The most prompt tokens indexed (its end): indexing costs about a microsecond per token and
key size on the loop thread, once per request."""
RUN_CAP = 64
"""A copy's run (the tokens it has agreed for) is counted up to this: past it, the odds that
the next token agrees no longer change much."""
SUB_MAX = 16
"""The longest span, in tokens, that a learned substitution replaces or puts in its place."""
SUBS_MAX = 64
"""The most substitutions one request remembers, other spellings included (the oldest goes
first)."""
_RELIABLE = 4  # a run of this many agreeing tokens is a copy, whose break teaches a substitution
_RESYNC = 3  # tokens that must agree again after a changed span, to learn what it became


_WORD = re.compile(r"\w+")
_SPELLING_PREFIXES = ("", " ", ".", "'", '"', "(", "[", "`")
"""What may come before a word inside one token: a rename learned where the word followed a
space (``" total"``) also applies where it follows a quote (``{"total": ...}``), which the
tokenizer spells with other tokens."""


def word_variants(old: str, new: str) -> list[tuple[str, str]]:
    """Other spellings of an edit of one word: ``old`` and ``new`` with what comes before
    the word in both (spaces, punctuation) replaced by each of :data:`_SPELLING_PREFIXES`;
    none when the edit is not of one word into one word."""
    lead = 0
    while lead < min(len(old), len(new)) and old[lead] == new[lead] and not (
        old[lead].isalnum() or old[lead] == "_"
    ):
        lead += 1
    word, renamed = old[lead:], new[lead:]
    if not (_WORD.fullmatch(word) and _WORD.fullmatch(renamed)) or word == renamed:
        return []
    return [(p + word, p + renamed) for p in _SPELLING_PREFIXES if p != old[:lead]]


class _Span(NamedTuple):
    """Where a drafted token came from when a substitution made it: what it replaced, and
    the history index of that."""

    old: tuple[int, ...]
    source: int


class Spelling(Protocol):
    """The tokenizer, for the other spellings of a learned edit (:func:`word_variants`)."""

    def text(self, tokens: Sequence[int]) -> str: ...

    def tokens(self, text: str) -> list[int]: ...


class NgramIndex:
    """A token history (the prompt, then the output), and a copy of it being followed.

    **Lookup.** For every n-gram in the history (:data:`KEY_SIZES`) it keeps the index of
    the token that followed its latest occurrence; the history's own last n-gram is entered
    only when a token follows it, so a lookup never finds the tail itself. The *run* of a
    match is how many tokens before the tail agree with the tokens before the occurrence:
    a match with a long run is a copy in progress, one of two tokens is a coincidence.

    **Following a copy.** The draft is the copy's continuation: the tokens after the
    matched occurrence, with every learned substitution applied. While the output keeps
    agreeing with it the copy is followed, even where its last tokens (a substituted name)
    never occur in the history; a fresh lookup replaces it when its match is at least as
    long (a line the output skipped, a block it repeats from elsewhere).

    **Substitutions.** An edit of a document (rename a variable, change a word) breaks the
    copy at every place the change applies. When a copy with a run of :data:`_RELIABLE`
    tokens breaks, the index finds the smallest span after the break, of at most
    :data:`SUB_MAX` tokens on each side, after which the output agrees with the copy again
    for :data:`_RESYNC` tokens, and learns it: the source's span becomes the output's. Later
    drafts apply it, so the next occurrence is drafted as changed. With a ``spelling`` (the
    tokenizer), an edit of one word is also learned in the word's other spellings
    (:func:`word_variants`: after a quote, a dot, nothing), which are other tokens. A
    substitution that a draft then sees broken is forgotten (the output kept the original
    there); where the output does not take such a guessed spelling, the copy goes on with
    the original, unbroken (a model may rename a variable and keep a dict key).

    What must stay true: the draft is only ever a guess (the engine keeps what sampling
    would have drawn), and a lookup's work is bounded by the draft's length, not by the
    history or the number of substitutions (at most :data:`SUBS_MAX`, found by their first
    token).
    """

    def __init__(
        self,
        tokens: Sequence[int] = (),
        sizes: Sequence[int] = KEY_SIZES,
        spelling: Spelling | None = None,
    ) -> None:
        self.tokens: list[int] = []
        self._spelling = spelling
        self._sizes = tuple(sorted(sizes, reverse=True))
        self._next: dict[tuple[int, ...], int] = {}
        # learned substitutions, in the order learned, and by the first token they replace
        self.learned: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._guessed: set[tuple[int, ...]] = set()  # spellings not yet seen in the output
        self._subs: dict[int, dict[tuple[int, ...], tuple[int, ...]]] = {}
        # the copy followed: its expected tokens, where each came from (a history index, or
        # the substitution it belongs to), and the history index after them (-1: none)
        self._expect: list[int] = []
        self._origin: list[int | _Span] = []
        self._source = -1
        self._run = 0
        # a break: its history index, the source index the copy expected, the copy's run
        self._broken: tuple[int, int, int] | None = None
        self._index(tokens)

    def _index(self, tokens: Sequence[int]) -> None:
        history, follows = self.tokens, self._next
        for token in tokens:
            j = len(history)
            for n in self._sizes:
                if j >= n:
                    follows[tuple(history[j - n : j])] = j
            history.append(token)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append output tokens, following the copy while they agree with it."""
        for token in tokens:
            if self._source >= 0:
                if not self._expect:
                    self._expect, self._origin, self._source = self._copy(self._source, 1)
                if self._expect and self._expect[0] != token:
                    self._unguess()  # a guessed spelling not taken: expect the original
                if self._expect and self._expect[0] == token:
                    origin = self._origin[0]
                    del self._expect[0], self._origin[0]
                    self._run += 1
                    if isinstance(origin, _Span) and not (
                        self._origin and self._origin[0] is origin
                    ):
                        self._guessed.discard(origin.old)  # the output spelled it so
                else:
                    self._break()
            self._index((token,))

    def _unguess(self) -> None:
        """The output did not take a guessed spelling (:meth:`_respell`) where the copy
        expected it, at its first token: forget the guess and expect the original there."""
        origin = self._origin[0] if self._origin else None
        if not (isinstance(origin, _Span) and origin.old in self._guessed):
            return
        whole = len(self.learned[origin.old])
        if sum(1 for o in self._origin[:whole] if o is origin) < whole:
            return  # the guess was half taken: the copy is broken
        self._forget(origin.old)
        self._expect, self._origin, self._source = self._copy(origin.source, 1)

    def _break(self) -> None:
        """The output left the copy at the next history index."""
        origin = self._origin[0] if self._origin else None
        if isinstance(origin, _Span):
            self._forget(origin.old)  # the output kept the original here
        elif origin is not None and self._run >= _RELIABLE:
            self._broken = (len(self.tokens), origin, self._run)
        self._expect, self._origin, self._source, self._run = [], [], -1, 0

    def draft(self, limit: int) -> tuple[list[int], int]:
        """Up to ``limit`` tokens the output is expected to continue with, and the run of
        the copy they come from (capped at :data:`RUN_CAP`); ``([], 0)`` when nothing
        matches."""
        if limit <= 0:
            return [], 0
        if self._broken is not None:
            self._learn()
        at, run = self._lookup()
        following = self._source >= 0 and (self._expect or self._source < len(self.tokens))
        if not following or (at >= 0 and run >= min(self._run, RUN_CAP)):
            if at < 0:
                self._expect, self._origin, self._source, self._run = [], [], -1, 0
                return [], 0
            self._expect, self._origin, self._source = self._copy(at, limit)
            self._run = run
        elif len(self._expect) < limit:
            more, origin, self._source = self._copy(self._source, limit - len(self._expect))
            self._expect += more
            self._origin += origin
        return self._expect[:limit], min(self._run, RUN_CAP)

    def _lookup(self) -> tuple[int, int]:
        """The history index after the latest occurrence of the longest matching tail, and
        the match's run; ``(-1, 0)`` when none matches."""
        history = self.tokens
        for n in self._sizes:
            if len(history) > n:
                at = self._next.get(tuple(history[-n:]))
                if at is not None:
                    run = n
                    while run < RUN_CAP and at > run and history[-run - 1] == history[at - run - 1]:
                        run += 1
                    return at, run
        return -1, 0

    def _copy(
        self, source: int, limit: int
    ) -> tuple[list[int], list[int | _Span], int]:
        """Up to ``limit`` tokens of the history from ``source`` on, substitutions applied
        (a substitution is copied whole, so it may pass ``limit``), where each came from, and
        the history index after them."""
        history, subs = self.tokens, self._subs
        out: list[int] = []
        origin: list[int | _Span] = []
        end = len(history)
        while len(out) < limit and source < end:
            for old, new in subs.get(history[source], {}).items():
                if tuple(history[source : source + len(old)]) == old:
                    out += new
                    origin += [_Span(old, source)] * len(new)
                    source += len(old)
                    break
            else:
                out.append(history[source])
                origin.append(source)
                source += 1
        return out, origin, source

    def _learn(self) -> None:
        """After a copy broke: learn the smallest change after which the output agrees with
        the copy again, once the output holds it; give up when it cannot be that small.
        About twenty short copies and lookups per call, whatever the history holds."""
        assert self._broken is not None
        at, source, run = self._broken
        history = self.tokens
        have = len(history) - at
        if have > SUB_MAX + _RESYNC:
            self._broken = None  # this look is the last
        if have <= _RESYNC:
            return
        # what the copy says after skipping n of its tokens, n = 1..SUB_MAX (the least wins)
        after = {tuple(self._copy(source + n, _RESYNC)[0]): n for n in range(SUB_MAX, 0, -1)}
        best: tuple[int, int] | None = None  # (old_len, new_len) of the smallest change
        for new_len in range(1, min(SUB_MAX, have - _RESYNC) + 1):
            old_len = after.get(tuple(history[at + new_len : at + new_len + _RESYNC]))
            if old_len is not None and (best is None or old_len + new_len < sum(best)):
                best = (old_len, new_len)
        if best is None:
            return
        self._broken = None
        old_len, new_len = best
        old, new = tuple(history[source : source + old_len]), tuple(history[at : at + new_len])
        if old == new:
            return
        self._remember(old, new)
        if self._spelling is not None:
            self._respell(old, new)
        # the copy goes on, and the edit is explained: its run did not end at the break
        since = history[at + new_len :]
        copied, _origin, after = self._copy(source + old_len, len(since))
        if copied == since:
            self._expect, self._origin, self._source = [], [], after
            self._run = run + new_len + len(since)

    def _respell(self, old: tuple[int, ...], new: tuple[int, ...]) -> None:
        """Learn the other spellings of a one-word edit, as the tokenizer spells them."""
        assert self._spelling is not None
        text = self._spelling.text
        for old_text, new_text in word_variants(text(old), text(new)):
            other = tuple(self._spelling.tokens(old_text))
            renamed = tuple(self._spelling.tokens(new_text))
            if (
                other
                and len(other) <= SUB_MAX
                and len(renamed) <= SUB_MAX
                and other != renamed
                and other not in self.learned
            ):
                self._remember(other, renamed)
                self._guessed.add(other)

    def _remember(self, old: tuple[int, ...], new: tuple[int, ...]) -> None:
        self._forget(old)
        self.learned[old] = new
        self._subs.setdefault(old[0], {})[old] = new
        while len(self.learned) > SUBS_MAX:
            self._forget(next(iter(self.learned)))
        if self._source >= 0 and self._origin and isinstance(self._origin[0], int):
            # what the copy expects next, now with the substitution
            self._expect, self._origin, self._source = self._copy(self._origin[0], 1)

    def _forget(self, old: tuple[int, ...]) -> None:
        self._guessed.discard(old)
        if self.learned.pop(old, None) is not None:
            by_first = self._subs[old[0]]
            del by_first[old]
            if not by_first:
                del self._subs[old[0]]


def expected_tokens(rates: Sequence[float]) -> float:
    """Tokens one verification of a draft yields on average, when its i-th token is accepted
    with probability ``rates[i]`` given the ones before it: the sampled token after the
    accepted run always comes, so 1 + r0 + r0*r1 + ..."""
    total, term = 1.0, 1.0
    for rate in rates:
        term *= rate
        total += term
    return total


_PAYS = 1.03
"""A draft must promise at least this much more (the product of the streams' rates, below)
than no draft: measurements are noisy, and a draft that only breaks even costs the rows it
adds to every stream."""


def best_length(
    rates: Sequence[float], streams: int, rows: int, costs: StepCosts, per_token: float = 0.0
) -> int:
    """The draft length in 0..``len(rates)`` for one of the ``streams`` streams that share
    this step (the batch already holds ``rows`` rows) that best serves them all, its i-th
    token accepted with probability ``rates[i]`` given the ones before; making it costs
    ``per_token`` seconds a token (a draft model's decode; 0 for n-grams).

    "Best for all" is the product of the streams' rates (proportional fairness): a draft of
    k multiplies its own stream's tokens this step by ``expected_tokens`` and every stream's
    step time by ``time(rows + k) / time(rows)``. Alone this is the most tokens per second.
    With many streams on a CPU, where each row costs nearly as much as the step's share of
    it, a draft buys one stream a few tokens with every other stream's time, and the sum of
    tokens per second hides that: measured with SmolLM2 at 16 streams on 2 cores, drafts of
    8 rows (135 ms steps against 100) kept by streams whose greedy output had begun to loop
    made the whole batch finish 11 % later, those streams having finished early and left a
    tail of 13 rows that cost as much as 16. Where rows are nearly free (a GPU, a small
    batch) a draft still pays for all."""
    if not rates:
        return 0
    weight = max(1, streams)
    best_k, best = 0, math.log(_PAYS)
    tokens, term = 1.0, 1.0  # expected_tokens(rates[:k]), kept as k grows
    logs, least = costs.log_slowdowns(rows, len(rates))
    ceiling = math.log(expected_tokens(rates))  # what the whole draft yields, the most
    base = costs.time(rows)
    for k, rate in enumerate(rates, 1):
        # A draft model's decodes only add to a length's time, so ``least`` bounds it too.
        if ceiling - weight * least[k - 1] <= best:
            break  # no length from k on can do better: the common case at many streams
        term *= rate
        tokens += term
        slower = logs[k - 1]
        if per_token:
            slower = math.log((costs.time(rows + k) + k * per_token) / base)
        value = math.log(tokens) - weight * slower
        if value > best:
            best_k, best = k, value
    return best_k


def cheapest_probe(limit: int, rows: int, costs: StepCosts) -> int:
    """The draft length in 1..``limit`` whose rows add the least time (the longest of those
    within 2 % of it): on a CPU whose kernels take rows four at a time, three drafted tokens
    may cost no more than one."""
    best_k, best = 1, costs.time(rows + 1)
    for k in range(2, limit + 1):
        cost = costs.time(rows + k)
        if cost <= best * 1.02:
            best_k, best = k, min(best, cost)
    return best_k


_PRIOR_ROW_COST = 0.25
"""A row count above every one measured is guessed to cost what the largest measured costs,
and this fraction of a one-row decode per row more: optimistic on purpose, so that a
draft that would pay if rows were that cheap is tried once, and from then on the measured
time decides."""
_EMA = 0.2
_SETTLED = 5
"""The reference's samples before the other shapes are kept relative to it: its plain mean
(:class:`MovingMeans` averages the first ``1 / _EMA`` samples alike) then stands for the
machine's speed; one sample (a fast or a slow moment) would fix every ratio for good."""


class StepCosts:
    """Decode time by number of rows, measured on decode-only steps (no prompt chunk, no
    medium) of one stream count: an average per row count, since the cost is far from a
    line (llama.cpp's CPU kernels take rows sixteen at a time, so 15 rows can cost more than
    16).

    A shape is kept relative to the *reference*, the step that drafts nothing (one row per
    stream), which nearly every step measures again: its time is what it cost against the
    reference when it was measured, times what the reference costs now. Kept in seconds, a
    shape measured while the machine was slow (another process busy) stayed dear for the
    rest of the worker's life, and since no draft of it then paid, it was never measured
    again: drafting stayed short after the machine was idle. Relative to the reference the
    machine's speed cancels. Until the reference has :data:`_SETTLED` samples every shape
    is kept in seconds; then each is divided by the reference's mean once (not by its first
    sample: a fast 4-row step after an 8-row one priced 8 rows at twice their cost, and no
    draft at that stream count paid again).

    A row count's first samples are averaged plainly and only later moved by a moving
    average (:data:`_EMA`): long drafts are rare, so a long shape is measured a few times
    in a model's life, and one slow first sample (another process busy at that moment)
    weighed fully for ever would keep the drafts short. A count never measured is drawn on
    the line between the nearest counts measured below and above it: guessed from the one
    below alone (:data:`_PRIOR_ROW_COST`), a shape between two measured ones looked cheaper
    than both, and a request drafted a string of never-measured lengths one after another.
    Only ratios matter to :func:`best_length` (and a draft model's seconds a token, against
    the reference's)."""

    def __init__(self, reference: int = 1) -> None:
        self._means = MovingMeans(_EMA)
        self._ema = self._means.means  # by row count: seconds, then the reference's units
        self._rows: list[int] = []  # the measured counts, sorted
        self._reference = reference
        self._unit = 1.0  # the reference's seconds once settled (until then all in seconds)
        self._settled = False
        # log_slowdowns by base rows, longest_that_may_pay by (rows, streams, limit): valid
        # until a guess changes (not when the unit does)
        self._slowdowns: dict[int, tuple[list[float], list[float]]] = {}
        self._may_pay: dict[tuple[int, int, int], int] = {}

    def record(self, rows: int, seconds: float) -> None:
        if rows < 1 or seconds <= 0:
            return
        if self._settled:
            if rows == self._reference:  # its mean stays 1; the unit moves as a mean past
                self._unit += _EMA * (seconds - self._unit)  # its first samples does
                return
            seconds /= self._unit
        self._slowdowns.clear()
        self._may_pay.clear()
        if self._means.add(rows, seconds):
            bisect.insort(self._rows, rows)
        if rows == self._reference and self._means.samples(rows) == _SETTLED:
            self._unit = self._ema[rows]
            self._means.scale(1.0 / self._unit)
            self._settled = True

    def log_slowdowns(self, rows: int, n: int) -> tuple[list[float], list[float]]:
        """``log(time(rows + k) / time(rows))`` for k = 1 to at least ``n``, and for each k
        the least of them from k on: :func:`best_length`'s weights, the same for every
        stream of a step and, since the reference's speed cancels in them, kept until a
        shape's guess changes (a reference's step does not change one once it settled).
        Worked out anew for every stream at every step where a copy was found, they took
        90-130 us a stream (at 8 streams 2 % of a 40 ms step on 2 EPYC cores)."""
        cached = self._slowdowns.get(rows)
        if cached is None or len(cached[0]) < n:
            base = self.time(rows)  # the unit cancels (but where time() is held at 1 ns)
            logs = [math.log(self.time(rows + k) / base) for k in range(1, n + 1)]
            least = logs[:]
            for i in range(n - 2, -1, -1):
                least[i] = min(least[i], least[i + 1])
            cached = self._slowdowns[rows] = (logs, least)
        return cached

    def longest_that_may_pay(self, limit: int, streams: int, rows: int) -> int:
        """The longest draft of at most ``limit`` tokens that :func:`best_length` could ever
        choose beside ``streams`` streams in a batch of ``rows`` rows, whatever its odds
        (0: none): even every token kept, a draft of k yields at most ``1 + k`` tokens, and
        a draft model's decodes only add to its time. The odds past it need not be worked
        out (:meth:`Acceptance.length`); at many streams on a CPU it is 0."""
        key = (rows, streams, limit)
        longest = self._may_pay.get(key)
        if longest is None:
            logs, _least = self.log_slowdowns(rows, limit) if limit > 0 else ([], [])
            weight, pays = max(1, streams), math.log(_PAYS)
            longest = next((k for k in range(limit, 0, -1)
                            if math.log(1 + k) - weight * logs[k - 1] > pays), 0)  # fmt: skip
            self._may_pay[key] = longest
        return longest

    def time(self, rows: int) -> float:
        """A step's expected time with ``rows`` rows, never 0 (a step timed at 0 on a coarse
        clock must not divide by zero in :func:`best_length`)."""
        return max(self._unit * self._guess(rows), 1e-9)

    def _guess(self, rows: int) -> float:
        known = self._ema.get(rows)
        if known is not None:
            return known
        measured = self._rows
        if not measured:
            return 1.0 + _PRIOR_ROW_COST * (rows - 1)
        between = on_the_line(rows, measured, self._ema)
        if between is not None:
            return between
        base = measured[0]
        one = self._ema[base] / (1.0 + _PRIOR_ROW_COST * (base - 1))  # a row's guessed cost
        if rows < base:
            return self._ema[base] - _PRIOR_ROW_COST * one * (base - rows)
        top = measured[-1]
        return self._ema[top] + _PRIOR_ROW_COST * one * (rows - top)


WEIGHED_RUN = 4
"""A copy not drafted, whose first token a sampled request checks against the token drawn
(:meth:`Acceptance.observe`), is weighed by its chance from this run on; a shorter one
counts as drawn or not. Weighing takes a sampler pass of the engine's own (SmolLM2 on 2
EPYC cores: about 230 us a row in the worker right after a decode, 40-80 us in a
microbenchmark; a story checks a copy at about 40 % of its steps, half of them at runs of
2 and 3), and the odds of the short runs, whose priors are low, seldom let a draft pay:
replayed, the stories keep what weighing every copy gives."""

WEIGHED_ROWS = 8
"""A draft's tokens tested past this many count as drawn or not, unweighed: deep in a copy
that holds, its chances are about 1, and a long draft of code (17 to 63 tokens on a 0.5B
model) weighed whole spent a sampler pass a row, up to a tenth of its step's time."""

MODEL_KEY = 0
"""The key of drafts from a draft model (``runner/drafter.py``); an n-gram draft's key is
the run of its copy (:meth:`NgramIndex.draft`), at least 2."""
_MODEL_PRIOR = (2.0, 1.0)  # a draft model's starting (hits, misses)
_MODEL_DECAY = 0.8  # weight of its past at each verification: the rate follows the text
_RUN_EDGES = (0, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_RUN_PRIORS = (0.5, 0.67, 0.75, 0.88, 0.9, 0.93, 0.95, 0.97, 0.98, 0.985, 0.99)
"""A drafted token's starting odds of being accepted, by the run of the copy at it (the
``_RUN_EDGES`` bucket): a copy that has agreed for long goes on agreeing. From greedy answers
of Qwen2.5-Coder 0.5B and 1.5B to ``bench/spec_bench.py``'s edit and rewrite prompts, the
next token followed the copy 62 % of the time after a run of 2, 90 % after 8 to 11, 97 %
after 16 to 31 and 99.6 % after 64. Runs of 3 to 5 start lower than those answers say, where
the key-length priors started them: in a chat they are mostly two or three common tokens met
again, and a chat must not pay for drafts."""
_PRIOR_WEIGHT = 4.0  # the priors count as this many tokens
_RUN_DECAY = 0.995  # weight of the past at each drafted token tested: the odds follow the text
_BUCKET = [max(i for i, edge in enumerate(_RUN_EDGES) if run >= edge) for run in range(RUN_CAP + 1)]
_MAX_GAP = 256
_NEGLIGIBLE = 0.01  # a draft this unlikely to reach a token gains nothing by holding it
_FIT_PRIOR = 2.0  # the request's fit starts as this many tokens kept of as many foreseen
_FIT_RUNS = 16  # a copy with a shorter run counts whole; a longer one by its kept tokens
_FIT_DECAY = 0.97  # weight of the past fit for each token foreseen since


class Acceptance:
    """One request's drafting record: the recent odds that a drafted token is accepted, by
    the run of the copy it came from (decayed counts per drafted token tested, from priors
    that trust a longer run more; ``_RUN_PRIORS``), the draft model's recent rate, and the
    totals the final chunk reports.

    The n-gram odds learn at every step, drafted or not: where the best length is 0, the
    engine still looks the copy up, and checks its first token against the token the step
    then samples (:meth:`observe`), which is the event a draft of that token would have been
    kept on. So a chat whose copies do not hold teaches its odds for free, and no draft is
    ever sent only to learn.

    What a tested token teaches is its *weight*: the chance it had of being kept, which
    the engine reads off the row that tested it (the sampler chain's probability of the
    token; for a greedy request 1 or 0, as it was kept or not). A sampled answer keeps a
    drafted token only as often as sampling draws it, and a story sampled at 0.8 that
    repeats a passage of its own draws the copy at 0.2-1.0 a token: counted as kept, such
    a passage took the odds of the runs it met to those of code (0.8-0.96), and most
    drafts after it broke at their first token (replayed with SmolLM2's costs on 2 EPYC
    cores, rows a quarter dearer: 0.97 of the speed without drafts; weighed, 0.995;
    ``test_ngram_replay.py``).

    A run's prior (from code, ``_RUN_PRIORS``) is scaled by the request's *fit*: the tokens
    its copies kept lately, against what their priors foresaw (at most 1). A story that
    meets a phrase of its own again and then goes its own way keeps far fewer than code
    would, so the runs it has not tested yet (the long ones, whose priors are near 1) are
    trusted less too, and a failed long draft is seldom followed by another; a run it has
    tested follows its own tokens. A copy of a run of ``_FIT_RUNS``
    or more counts only by its tokens kept, each against its own odds (observed or drafted):
    its break does not count, since an edit of code breaks one once and the copy goes on,
    but its tokens kept say that the text copies. After an early miss (a 17-token draft that
    missed at its first token, where a spelling was corrected, takes the fit to a sixth) the
    long copy that follows is what brings the trust back; counting only short copies, the
    rest of such a copy was never drafted.

    The draft model's drafts cost its decodes to make, so they have no such check: when its
    best length is 0 the request still probes now and then (:func:`cheapest_probe`), and
    each probe that does not bring drafting back doubles the gap to the next (exponential
    back-off). A probe waits while it could not pay even if kept: its rows and the draft
    model's cost a token (which includes catching up on the tokens n-gram drafts brought)
    at least the two steps it would make one of. On a CPU where the draft model's catch-up
    costs more than a step, such probes cost a rewrite drafted from its prompt 5-12 %."""

    def __init__(self) -> None:
        # per run bucket: the tokens seen kept and refused, and the weight left to its prior
        self._runs = [[0.0, 0.0, _PRIOR_WEIGHT] for _ in _RUN_PRIORS]
        self._fit = [_FIT_PRIOR, _FIT_PRIOR]  # tokens kept, and foreseen by the runs' priors
        self._model = list(_MODEL_PRIOR)
        self.drafted = 0
        self.accepted = 0
        self._gap, self._idle = 1, 0  # the draft model's probes' back-off

    def rates(self, key: int, limit: int) -> list[float]:
        """The odds of each of ``limit`` drafted tokens, given the ones before it; for a copy
        they stop where the draft is less likely than :data:`_NEGLIGIBLE` to reach the next
        token (no draft pays past it, and the loop looks up every step of every stream)."""
        if key == MODEL_KEY:
            hits, misses = self._model
            return [hits / (hits + misses)] * limit
        kept, foreseen = self._fit
        fit = min(1.0, kept / foreseen)
        odds: list[float] = []
        reach = 1.0
        for i in range(limit):
            bucket = _BUCKET[min(key + i, RUN_CAP)]
            hits, misses, weight = self._runs[bucket]
            odds.append((hits + fit * _RUN_PRIORS[bucket] * weight) / (hits + misses + weight))
            reach *= odds[-1]
            if reach < _NEGLIGIBLE:
                break
        return odds

    def length(
        self,
        key: int,
        limit: int,
        streams: int,
        rows: int,
        costs: StepCosts,
        per_token: float = 0.0,
    ) -> int:
        """How many of ``limit`` tokens drafted from a copy with run ``key`` (or by the draft
        model, :data:`MODEL_KEY`, at ``per_token`` seconds each) to verify now (0: none);
        a draft model's probe only where its draft, if kept, would pay."""
        longest = costs.longest_that_may_pay(limit, streams, rows)
        k = best_length(self.rates(key, longest), streams, rows, costs, per_token) if longest else 0
        if key != MODEL_KEY:
            return k
        if k > 0:
            self._gap, self._idle = 1, 0
            return k
        self._idle += 1
        if self._idle < self._gap:
            return 0
        probe = cheapest_probe(limit, rows, costs)
        if costs.time(rows + probe) + probe * per_token >= 2 * costs.time(rows):
            return 0  # kept, it would not pay: it waits (its place in the back-off kept)
        self._idle, self._gap = 0, min(_MAX_GAP, self._gap * 2)
        return probe

    def observe(self, key: int, hit: bool, weight: float | None = None) -> None:
        """The first token of a copy with run ``key`` that was not drafted was (``hit``) or
        was not the token the request drew next, with ``weight`` the chance it had (None:
        as drawn): what a one-token draft would have taught, learned without its row."""
        self.record(key, 1, 1 if hit else 0, None if weight is None else [weight])

    @staticmethod
    def _priors(key: int, n: int) -> list[float]:
        """The prior odds of ``n`` tokens drafted from a copy with run ``key``."""
        return [_RUN_PRIORS[_BUCKET[min(key + i, RUN_CAP)]] for i in range(n)]

    def _fit_to(self, kept: float, foreseen: float) -> None:
        """Fold ``kept`` tokens, where the priors foresaw ``foreseen``, into the fit (the
        past weighs less with every token foreseen)."""
        keep = _FIT_DECAY**foreseen
        self._fit = [keep * self._fit[0] + kept, keep * self._fit[1] + foreseen]

    def record(
        self, key: int, drafted: int, accepted: int, weights: Sequence[float] | None = None
    ) -> None:
        """A verification of ``drafted`` tokens drafted with ``key`` kept the first
        ``accepted`` of them; ``weights`` are the chances the first tokens it tested (those
        kept and the one refused) had of being kept; any tested past them count as drawn
        (1 for each kept, 0 for the refused; all of them where None). Each counts as that
        much kept and the rest refused. (The totals :attr:`drafted`
        and :attr:`accepted` are the engine's to count, as it goes: the request may end in
        the middle, and its final chunk must say so far.)"""
        tested = accepted + (1 if accepted < drafted else 0)
        drawn = [1.0] * accepted + [0.0] * (tested - accepted)
        weights = [*(weights or ())][:tested]
        weights += drawn[len(weights) :]
        if key == MODEL_KEY:
            counts = self._model
            counts[0] = _MODEL_DECAY * counts[0] + sum(weights)
            counts[1] = _MODEL_DECAY * counts[1] + sum(1.0 - w for w in weights)
            return
        if key < _FIT_RUNS:  # what it may have kept, against what the priors foresaw
            kept = expected_tokens(weights) - 1
            self._fit_to(kept, expected_tokens(self._priors(key, drafted)) - 1)
        elif accepted:  # its tokens kept, each against its own odds; its break is an edit
            self._fit_to(sum(weights[:accepted]), sum(self._priors(key, accepted)))
        decay = _RUN_DECAY**tested
        for counts in self._runs:
            counts[0] *= decay
            counts[1] *= decay
            counts[2] *= decay
        for i, weight in enumerate(weights):
            counts = self._runs[_BUCKET[min(key + i, RUN_CAP)]]
            counts[0] += weight
            counts[1] += 1.0 - weight
