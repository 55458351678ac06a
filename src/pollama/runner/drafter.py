"""Drafts from a second, smaller model (Modelfile ``DRAFT``): the other source of speculative
decoding's guesses, beside the prompt's n-grams (``runner/ngram.py``).

The draft model has its own context in the worker, with one sequence per slot of the target's
(same seq ids). For each slot it keeps the tokens its cache holds; to draft after a slot's
history (the target's tokens and its pending one), it cuts its cache back to the common
prefix, evaluates what is new (the first time: the whole prompt), then picks its most likely
token, decodes it, and again, until the draft is long enough or the draft model is unsure
(its top token's probability under :data:`P_MIN`, llama.cpp's ``--draft-p-min``): an unsure
guess is usually wrong, and each guess costs a decode of the draft model. The slots that
draft at one step share each of those decodes.

What must stay true: the drafts are guesses only. The engine verifies them by sampling the
target at every drafted row (``Engine._verify``), so a draft model can only change how fast
an answer comes, never what it is; a drafted token that the target's vocabulary lacks ends
the draft there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from pollama.runner.tokens import common_prefix

__all__ = ["DRAFT_MODEL_MAX", "P_MIN", "DraftModel", "DraftRequest"]

P_MIN = 0.75
"""A draft ends before a token whose probability under the draft model is less than this."""
DRAFT_MODEL_MAX = 32
"""The longest draft from a draft model: past this few drafts survive verification anyway,
and the draft context keeps this many cells per sequence beyond the target's window."""


_EMA = 0.3


class DraftContext(Protocol):
    """What the drafter needs of a llama.cpp context (``runner/llama.py`` ``Context``)."""

    n_batch: int

    def decode(self, batch: DraftBatch) -> int: ...

    def logits(self, row: int) -> npt.NDArray[np.float32]: ...

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool: ...


class DraftBatch(Protocol):
    n_tokens: int

    def clear(self) -> None: ...

    def add(self, token: int, pos: int, seq: int, output: bool) -> int: ...


@dataclass
class DraftRequest:
    """One slot's ask: draft up to ``limit`` tokens after ``history`` (its sequence ``seq``)."""

    seq: int
    history: Sequence[int]
    limit: int
    fresh: bool = False
    """The request's first ask: what it catches up on is the request's prompt (and what the
    target took before this ask), once per request, as the target evaluates the prompt once,
    and kept by the cache: not a price of drafting."""


class DraftModel:
    """The draft model's context and what each of its sequences holds."""

    def __init__(
        self,
        ctx: DraftContext,
        batch: DraftBatch,
        n_seq: int,
        *,
        n_vocab_target: int,
        n_ctx: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.ctx = ctx
        self._clock = clock
        self.batch = batch
        self.n_ctx = n_ctx  # per sequence
        self.n_vocab_target = n_vocab_target
        self.held: list[list[int]] = [[] for _ in range(n_seq)]  # tokens each cache holds
        # What a drafted token costs (a moving average; 0: unknown): the call's decodes over
        # the tokens it drafted, a call that drafted nothing as one. That includes catching
        # up on the tokens the target took meanwhile (n-gram drafts kept: each probe's price),
        # but not on a fresh ask's prompt (a new conversation: all of it), which the target
        # evaluates once too and the cache keeps. Priced as one token, a first guess that
        # was unsure made the draft model look too dear for any later probe, for the
        # worker's whole life.
        self.step_seconds = 0.0
        self._prompt_seconds = 0.0  # of the last call: catching up on fresh asks' prompts

    def forget(self, seq: int) -> None:
        """Drop what a sequence holds (its cache could not be cut: start it over)."""
        self.ctx.seq_rm(seq, -1, -1)
        self.held[seq] = []

    def draft(self, asks: Sequence[DraftRequest], cancelled: Callable[[], bool]) -> list[list[int]]:
        """Each ask's draft (possibly empty), in order. ``cancelled`` is asked between
        decodes: the loop has something more urgent (it returns what is drafted so far)."""
        started, self._prompt_seconds = self._clock(), 0.0
        drafts = self._draft(asks, cancelled)
        longest = max((len(d) for d in drafts), default=0)
        spent = self._clock() - started - self._prompt_seconds
        seconds, old = spent / max(1, longest), self.step_seconds
        self.step_seconds = old + _EMA * (seconds - old) if old else seconds
        return drafts

    def _draft(
        self, asks: Sequence[DraftRequest], cancelled: Callable[[], bool]
    ) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in asks]
        live = [i for i, ask in enumerate(asks) if self._fits(ask)]
        rows = self._catch_up([asks[i] for i in live])
        if rows is None:
            return drafts
        active = dict(zip(live, rows, strict=True))  # ask index -> its logits row
        while active and not cancelled():
            self.batch.clear()
            for i, row in list(active.items()):
                token = self._confident(row)
                ask = asks[i]
                if token is None:
                    del active[i]
                    continue
                drafts[i].append(token)
                if len(drafts[i]) >= ask.limit:
                    del active[i]
                    continue
                held = self.held[ask.seq]
                active[i] = self.batch.add(token, len(held), ask.seq, True)
                held.append(token)
            if not active:
                break
            if self.ctx.decode(self.batch) != 0:
                for i in active:
                    self.forget(asks[i].seq)
                break
        return drafts

    def _fits(self, ask: DraftRequest) -> bool:
        return ask.limit > 0 and 0 < len(ask.history) and (
            len(ask.history) + ask.limit <= self.n_ctx
        )

    def _catch_up(self, asks: Sequence[DraftRequest]) -> list[int] | None:
        """Cut every ask's sequence back to what it shares with its history and evaluate the
        rest: all but each history's last token in passes of at most ``n_batch`` tokens, then
        the last tokens together in one pass, so that every ask's logits come from the same
        decode. Returns those rows (None when a decode failed: the sequences start over)."""
        todo: list[tuple[int, int]] = []  # (ask index, first token to evaluate)
        for i, ask in enumerate(asks):
            held = self.held[ask.seq]
            common = min(common_prefix(held, ask.history), len(ask.history) - 1)
            if common < len(held):
                if not self.ctx.seq_rm(ask.seq, common, -1):
                    self.forget(ask.seq)
                    common = 0
                del held[common:]
            todo.append((i, common))
        started = self._clock()
        while any(done < len(asks[i].history) - 1 for i, done in todo):
            self.batch.clear()
            room, later = self.ctx.n_batch, []
            for i, done in todo:
                ask = asks[i]
                end = min(len(ask.history) - 1, done + room)
                for pos in range(done, end):
                    self.batch.add(ask.history[pos], pos, ask.seq, False)
                self.held[ask.seq].extend(ask.history[done:end])
                room -= end - done
                later.append((i, end))
            if not self._decoded(asks):
                return None
            todo = later
        if any(ask.fresh for ask in asks):
            self._prompt_seconds = self._clock() - started
        self.batch.clear()
        rows = []
        for ask in asks:
            last = len(ask.history) - 1
            rows.append(self.batch.add(ask.history[last], last, ask.seq, True))
            self.held[ask.seq].append(ask.history[last])
        return rows if self._decoded(asks) else None

    def _decoded(self, asks: Sequence[DraftRequest]) -> bool:
        """Decode the batch; on a failure every ask's sequence starts over."""
        if self.batch.n_tokens == 0 or self.ctx.decode(self.batch) == 0:
            return True
        for ask in asks:
            self.forget(ask.seq)
        return False

    def _confident(self, row: int) -> int | None:
        """The draft model's most likely token at ``row``, or None when its probability is
        under :data:`P_MIN` or the target's vocabulary lacks it."""
        logits = self.ctx.logits(row)
        token = int(np.argmax(logits))
        top = float(logits[token])
        mass = float(np.exp(logits - top, dtype=np.float32).sum())
        if 1.0 / mass < P_MIN or token >= self.n_vocab_target:
            return None
        return token
