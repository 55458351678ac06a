"""Drafting from the request's own tokens (prompt lookup), and deciding when a draft pays.

When the output repeats spans of the prompt (a rewrite, an edit of code, a form filled from a
document), the tokens that followed the last occurrence of the output's latest few tokens are
a good guess of what comes next. The engine (``runner/engine.py``) puts such a draft in the
batch after the slot's pending token, with logits on every row, and keeps the drafted tokens
that the request's own sampling would have drawn (llama-server's ``--spec-type
ngram-simple``). This module holds the pure parts, with no llama.cpp in them:

* :class:`NgramIndex`, the lookup: where each n-gram of the request's tokens (prompt, then
  output) was last followed by something, for the longest key that matches;
* :class:`StepCosts`, what a decode costs by its number of rows, measured on the loop's own
  decode-only steps (a row count never measured is guessed optimistically, then tried);
* :class:`Acceptance`, per request: how often drafted tokens were accepted lately, and the
  draft length that makes the most tokens per second of decoding (:func:`best_length`),
  with a back-off of its probes when drafting does not pay.

On a CPU a batch of k rows costs far more than one row (small models are compute-bound), so
the decision weighs the expected extra tokens against the measured extra time, for the whole
batch: with several streams decoding, a draft slows every one of them, so it must pay more.

What must stay true: a draft only ever guesses; whether a drafted token is kept is decided by
sampling the model at its row, so nothing here can change what a request outputs, only how
fast it comes.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "MODEL_KEY",
    "Acceptance",
    "NgramIndex",
    "StepCosts",
    "best_length",
    "cheapest_probe",
    "expected_tokens",
]

KEY_SIZES = (8, 4, 3, 2)
"""The n-gram lengths looked up, longest first: a long key that matches is a much safer guess
than the last occurrence of two common tokens."""
INDEX_LIMIT = 16384
"""The most prompt tokens indexed (its end): indexing costs about a microsecond per token and
key size on the loop thread, once per request."""


class NgramIndex:
    """A token history and, for every n-gram in it (:data:`KEY_SIZES`), the index of the
    token that followed its latest occurrence. The history's own last n-gram is entered
    only when a token follows it, so a lookup never finds the tail itself."""

    def __init__(self, tokens: Sequence[int] = (), sizes: Sequence[int] = KEY_SIZES) -> None:
        self.tokens: list[int] = []
        self._sizes = tuple(sorted(sizes, reverse=True))
        self._next: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        history, follows = self.tokens, self._next
        for token in tokens:
            j = len(history)
            for n in self._sizes:
                if j >= n:
                    follows[tuple(history[j - n : j])] = j
            history.append(token)

    def draft(self, limit: int) -> tuple[list[int], int]:
        """Up to ``limit`` tokens that followed the latest earlier occurrence of the longest
        matching tail, and that tail's length; ``([], 0)`` when none matches."""
        history = self.tokens
        if limit <= 0:
            return [], 0
        for n in self._sizes:
            if len(history) > n:
                at = self._next.get(tuple(history[-n:]))
                if at is not None:
                    return history[at : at + limit], n
        return [], 0


def expected_tokens(rate: float, k: int) -> float:
    """Tokens one verification of a ``k``-token draft yields on average, when each drafted
    token is accepted with probability ``rate`` given the ones before it: the sampled token
    after the accepted run always comes, so 1 + rate + ... + rate**k."""
    total, term = 1.0, 1.0
    for _ in range(k):
        term *= rate
        total += term
    return total


_PAYS = 1.03
"""A draft must promise at least this much more throughput than no draft: measurements are
noisy, and a draft that only breaks even costs the rows it adds to every stream."""


def best_length(
    rate: float, limit: int, tokens: float, rows: int, costs: StepCosts, per_token: float = 0.0
) -> int:
    """The draft length in 0..``limit`` that makes the most tokens per second of the step:
    the batch already holds ``rows`` rows expected to yield ``tokens`` tokens (every
    pending token yields one), and a draft of k adds k rows and ``expected_tokens - 1``;
    making it costs ``per_token`` seconds a token (a draft model's decode; 0 for n-grams)."""
    base = costs.time(rows)
    best_k, best = 0, _PAYS * tokens / base
    total, term = tokens, 1.0
    for k in range(1, limit + 1):
        term *= rate
        total += term
        value = total / (costs.time(rows + k) + k * per_token)
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
"""A row count never measured is guessed to cost what the nearest smaller one measured
costs, and this fraction of a one-row decode per row more: optimistic on purpose, so that
a draft that would pay if rows were that cheap is tried once, and from then on the measured
time decides."""
_EMA = 0.2


class StepCosts:
    """Decode time by number of rows, measured on decode-only steps (no prompt chunk, no
    medium): a moving average per row count, since the cost is far from a line (llama.cpp's
    CPU kernels take rows four at a time, so 5 rows can cost more than 8); a row count not
    yet measured is guessed from the nearest smaller one measured (:data:`_PRIOR_ROW_COST`).
    Only ratios matter to :func:`best_length`."""

    def __init__(self) -> None:
        self._ema: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        if rows < 1 or seconds <= 0:
            return
        ema = self._ema.get(rows)
        self._ema[rows] = seconds if ema is None else ema + _EMA * (seconds - ema)

    def time(self, rows: int) -> float:
        """A step's expected time with ``rows`` rows, never 0 (a step timed at 0 on a coarse
        clock must not divide by zero in :func:`best_length`)."""
        return max(self._guess(rows), 1e-9)

    def _guess(self, rows: int) -> float:
        known = self._ema.get(rows)
        if known is not None:
            return known
        if not self._ema:
            return 1.0 + _PRIOR_ROW_COST * (rows - 1)
        base = min(self._ema)
        one = self._ema[base] / (1.0 + _PRIOR_ROW_COST * (base - 1))  # a row's guessed cost
        if rows < base:
            return self._ema[base] - _PRIOR_ROW_COST * one * (base - rows)
        below = max(n for n in self._ema if n < rows)  # the nearest measured count under it
        return self._ema[below] + _PRIOR_ROW_COST * one * (rows - below)


MODEL_KEY = 0
"""The key of drafts from a draft model (``runner/drafter.py``), beside the n-gram lengths."""
_PRIORS = {MODEL_KEY: (2.0, 1.0), 2: (1.0, 1.0), 3: (2.0, 1.0), 4: (3.0, 1.0), 8: (14.0, 1.0)}
"""Each key length's starting (hits, misses): a longer matching key is a safer guess. An
8-token match starts at 0.93, enough for a full draft at once: in a copy of the prompt its
continuation runs for many tokens (``bench/spec_bench.py``'s edit task), and one draft that
fails brings the rate down to short drafts at the next verification."""
_DECAY = 0.8  # weight of the past at each verification: the rate follows the text
_PROBE_KEY = 3  # two common tokens in a row match all the time in chat: no probe on those
_MAX_GAP = 256


class Acceptance:
    """One request's drafting record: for each key length, the recent rate at which a
    drafted token was accepted after the ones before it (decayed counts from a prior that
    trusts longer keys more), and the totals the final chunk reports.

    When the best length is 0 the request still probes now and then on a match of three
    tokens or more (:func:`cheapest_probe`: usually one token), since a rate only moves with
    drafts; each probe that does not bring drafting back doubles the gap to the next
    (exponential back-off), so an ordinary chat pays a handful of rows over a whole answer."""

    def __init__(self) -> None:
        self._counts = {key: list(prior) for key, prior in _PRIORS.items()}
        self.drafted = 0
        self.accepted = 0
        # the probes' back-off, one for n-gram drafts and one for the draft model's, so that
        # one source's probing does not starve the other's
        self._gap = {False: 1, True: 1}
        self._idle = {False: 0, True: 0}

    def rate(self, key: int) -> float:
        hits, misses = self._counts[key]
        return hits / (hits + misses)

    def length(
        self,
        key: int,
        limit: int,
        tokens: float,
        rows: int,
        costs: StepCosts,
        per_token: float = 0.0,
    ) -> int:
        """How many of ``limit`` tokens drafted from a ``key``-token match (or by the draft
        model, :data:`MODEL_KEY`, at ``per_token`` seconds each) to verify now (0: none)."""
        k = best_length(self.rate(key), limit, tokens, rows, costs, per_token)
        source = key == MODEL_KEY
        if k > 0:
            self._gap[source], self._idle[source] = 1, 0
            return k
        if key < _PROBE_KEY and not source:
            return 0
        self._idle[source] += 1
        if self._idle[source] < self._gap[source]:
            return 0
        self._idle[source], self._gap[source] = 0, min(_MAX_GAP, self._gap[source] * 2)
        return cheapest_probe(limit, rows, costs)

    def record(self, key: int, drafted: int, accepted: int) -> None:
        """A verification of ``drafted`` tokens from a ``key``-token match kept the first
        ``accepted`` of them (the totals :attr:`drafted` and :attr:`accepted` are the
        engine's to count, as it goes: the request may end in the middle, and its final
        chunk must say so far)."""
        counts = self._counts[key]
        counts[0] = _DECAY * counts[0] + accepted
        counts[1] = _DECAY * counts[1] + (1 if accepted < drafted else 0)
