"""Token log-probabilities for the engine: the numbers (numpy, no llama.cpp) and the
bookkeeping that keeps each token's entry with the text that carries it.

llama-server's default (``n_probs`` without ``post_sampling_probs``): a token's
log-probability is the log-softmax of the model's raw logits for its row, before any
sampler, penalty or grammar mask; the alternatives are the most likely tokens of that
same distribution. :func:`log_softmax` makes a new array, so a grammar that later sets
refused logits to -inf in llama.cpp's buffer cannot change what was measured.

:class:`HeldLogprobs` places every token's entry on the span of decoded characters its
bytes produced, ``[start, end)``; a token whose last bytes are an incomplete UTF-8 sequence
reaches one character further (the character it began). What must stay true: an entry is
released with the chunk whose text holds its last character (so text that the stop-string
matcher or the UTF-8 decoder holds back keeps its entries), entries come out in token order,
and at the end of a response every entry is released or dropped exactly once: dropped when
a matched stop string swallowed all of its text.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from pollama.runner.base import Logprob, TokenLogprob

__all__ = ["IMPOSSIBLE", "HeldLogprobs", "log_softmax", "token_entry", "top_tokens"]

Vector = npt.NDArray[np.float32]
IMPOSSIBLE = -9999.0  # the logprob of a token with a -inf logit (OpenAI's and vLLM's value)


def log_softmax(logits: Vector) -> Vector:
    """Log-probabilities of one row of raw logits, as a new float32 array.

    Shifted by the maximum before ``exp`` (no overflow) and summed in float64, so that the
    probabilities of a 50k vocabulary add up to 1 within float32 rounding. A row whose
    logits are all -inf (nothing possible) gives all -inf, never NaN.
    """
    row = np.asarray(logits, dtype=np.float32)
    peak = float(row.max())
    if not np.isfinite(peak):
        return np.full(row.shape, -np.inf, dtype=np.float32)
    out = row - np.float32(peak)
    total = float(np.exp(out).sum(dtype=np.float64))
    out -= np.float32(np.log(total))
    return out


def top_tokens(logprobs: Vector, n: int) -> list[tuple[int, float]]:
    """The ``n`` most likely tokens as ``(id, logprob)``, most likely first; equal values
    in token-id order (greedy sampling takes the first maximum, so at temperature 0 the
    chosen token is the first of the list)."""
    size = logprobs.shape[0]
    n = min(max(n, 0), size)
    if n == 0:
        return []
    candidates = _candidates(logprobs, n)
    values = logprobs[candidates]
    if candidates.shape[0] > n:  # keep the n-th value and above (ties included)
        keep = values >= np.partition(values, values.shape[0] - n)[values.shape[0] - n]
        candidates, values = candidates[keep], values[keep]
    order = np.lexsort((candidates, -values))[:n]
    return [(int(candidates[i]), float(values[i])) for i in order]


_GROUP = 64  # tokens per group in the search of the top tokens


def _candidates(logprobs: Vector, n: int) -> npt.NDArray[np.intp]:
    """Token ids among which the ``n`` most likely are, with every token tied with the
    ``n``-th: the row is cut into groups of :data:`_GROUP` tokens (group *g* holds ids
    ``g``, ``g + G``, ``g + 2G``…, a strided view, so one fast pass finds every group's
    maximum), and the candidates are the groups whose maximum is at least the ``n``-th
    largest group maximum, plus the ids past the last whole group.

    Why it holds: the ``n`` largest group maxima are ``n`` tokens, so the ``n``-th of them
    is at most the ``n``-th largest value, and a token at least that value lies in a group
    whose maximum is at least that too. On a 49k vocabulary 20 alternatives cost about
    45 us this way, where ``np.argpartition`` of the row takes 500.
    """
    size = logprobs.shape[0]
    groups = size // _GROUP
    if groups <= n:
        return np.arange(size)
    maxima = logprobs[: groups * _GROUP].reshape(_GROUP, groups).max(axis=0)
    floor = np.partition(maxima, groups - n)[groups - n]
    chosen = np.flatnonzero(maxima >= floor)
    members = (chosen[None, :] + groups * np.arange(_GROUP)[:, None]).ravel()
    return np.concatenate([members, np.arange(groups * _GROUP, size)])


def token_entry(
    token: int,
    logprobs: Vector,
    n_top: int,
    piece: Callable[[int], bytes],
) -> Logprob:
    """The entry of sampled ``token``: its log-probability and the ``n_top`` alternatives.
    ``piece(id)`` is a token's bytes (``b""`` for an end-of-generation token). A token the
    model rules out entirely (a -inf logit) gets :data:`IMPOSSIBLE`: JSON has no -inf."""

    def one(tid: int, value: float) -> TokenLogprob:
        data = piece(tid)
        value = value if math.isfinite(value) else IMPOSSIBLE
        return TokenLogprob(data.decode("utf-8", "replace"), value, list(data))

    own = one(token, float(logprobs[token]))
    top = [one(tid, value) for tid, value in top_tokens(logprobs, n_top)]
    return Logprob(own.token, own.logprob, own.bytes, top)


class HeldLogprobs:
    """Entries of tokens whose text is not all emitted yet (see the module docstring).

    Positions count characters of the decoded output, before the stop-string matcher; the
    matcher emits a prefix of that same stream, so ``emitted`` is a position in it too.
    """

    def __init__(self) -> None:
        self._held: deque[tuple[int, int, Logprob]] = deque()
        self._emitted = 0

    def add(self, entry: Logprob, start: int, end: int) -> None:
        """Hold ``entry`` for the characters ``[start, end)`` (``end`` never decreases)."""
        self._held.append((start, end, entry))

    def release(self, n_chars: int) -> list[Logprob]:
        """``n_chars`` more characters were emitted: the entries whose text is now all out."""
        self._emitted += n_chars
        out: list[Logprob] = []
        while self._held and self._held[0][1] <= self._emitted:
            out.append(self._held.popleft()[2])
        return out

    def finish(self, n_chars: int) -> list[Logprob]:
        """The response ends after ``n_chars`` more characters (a stop string matched, or
        the last text was flushed): entries with any of their text emitted come out, the
        rest (swallowed by the stop string) are dropped."""
        self._emitted += n_chars
        emitted = self._emitted
        out = [entry for start, end, entry in self._held if start < emitted or end <= emitted]
        self._held.clear()
        return out
