"""Drafting with a draft model (``runner/drafter.py``): against a simulated context, then in a
real worker with SmolLM2 drafting for itself.

``SimContext`` is a llama.cpp context where it matters: a KV cache per sequence whose
positions must continue what it holds (``seq_rm`` cuts it), logits only for the rows of the
last decode, and a "model" that predicts ``token + 1`` surely, except after :data:`UNSURE`,
where every token is as likely. So a drafter that re-evaluated tokens it holds, skipped
some, read stale logits or kept a cut sequence gives wrong drafts or trips an assertion.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from conftest import ALPHABET
from pollama.runner.drafter import P_MIN, DraftModel, DraftRequest
from test_worker import WorkerClient, smol_spec

VOCAB = 64
UNSURE = 40


class SimBatch:
    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, bool]] = []

    @property
    def n_tokens(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        self.rows = []

    def add(self, token: int, pos: int, seq: int, output: bool) -> int:
        self.rows.append((token, pos, seq, output))
        return len(self.rows) - 1


class SimContext:
    def __init__(self, n_batch: int = 8, fail_at: int = -1) -> None:
        self.n_batch = n_batch
        self.cache: dict[int, list[int]] = {}
        self.out: dict[int, np.ndarray] = {}
        self.decodes = 0
        self.evaluated = 0
        self.fail_at = fail_at
        self.now = 0.0  # the drafter's clock: a row decoded costs 1 s

    def decode(self, batch: SimBatch) -> int:
        assert 0 < batch.n_tokens <= self.n_batch
        self.decodes += 1
        if self.decodes == self.fail_at:
            return 1
        self.out = {}
        for row, (token, pos, seq, output) in enumerate(batch.rows):
            held = self.cache.setdefault(seq, [])
            assert pos == len(held), "positions must continue the sequence"
            held.append(token)
            self.evaluated += 1
            self.now += 1.0
            if output:
                logits = np.zeros(VOCAB, dtype=np.float32)
                if token != UNSURE:
                    logits[(token + 1) % VOCAB] = 20.0
                self.out[row] = logits
        return 0

    def logits(self, row: int) -> np.ndarray:
        return self.out[row]  # a KeyError: logits of a row the last decode did not output

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        held = self.cache.setdefault(seq, [])
        del held[p0 if p0 >= 0 else 0 :]
        return True


def drafter(ctx: SimContext, n_ctx: int = 256, n_vocab: int = VOCAB) -> DraftModel:
    return DraftModel(ctx, SimBatch(), 4, n_vocab_target=n_vocab, n_ctx=n_ctx,
                      clock=lambda: ctx.now)


def test_drafts_follow_the_model_and_stop_when_it_is_unsure() -> None:
    ctx = SimContext()
    d = drafter(ctx)
    history = list(range(1, 20))  # 19 tokens: three passes of catching up, then the last
    (draft,) = d.draft([DraftRequest(0, history, 5)], lambda: False)
    assert draft == [20, 21, 22, 23, 24]
    assert ctx.cache[0] == [*history, 20, 21, 22, 23]  # the last drafted token is not decoded
    (short,) = d.draft([DraftRequest(1, [30, 31, 36], 10)], lambda: False)
    assert short == [37, 38, 39, 40]  # after 40 the model is unsure: the draft ends there
    assert P_MIN > 0.5


def test_a_sequence_is_cut_back_to_what_it_shares_and_only_the_rest_is_evaluated() -> None:
    ctx = SimContext()
    d = drafter(ctx)
    d.draft([DraftRequest(0, [1, 2, 3, 4], 4)], lambda: False)  # holds 1..4, 5, 6, 7
    before = ctx.evaluated
    # the target kept 5 and 6, then sampled 9 (not the drafted 7)
    (draft,) = d.draft([DraftRequest(0, [1, 2, 3, 4, 5, 6, 9], 2)], lambda: False)
    assert draft == [10, 11]
    assert ctx.cache[0] == [1, 2, 3, 4, 5, 6, 9, 10]
    assert ctx.evaluated - before == 2  # 9 and 10: nothing it held was evaluated again
    d.draft([DraftRequest(0, [1, 2, 3, 4, 5, 6, 9, 10], 1)], lambda: False)
    assert ctx.cache[0] == [1, 2, 3, 4, 5, 6, 9, 10]  # the last token gives logits again


def test_several_slots_share_each_decode() -> None:
    ctx = SimContext()
    d = drafter(ctx)
    asks = [DraftRequest(0, [1, 2, 3], 3), DraftRequest(2, [10, 11], 2), DraftRequest(3, [5], 0)]
    drafts = d.draft(asks, lambda: False)
    assert drafts == [[4, 5, 6], [12, 13], []]
    assert ctx.decodes == 1 + 1 + 2  # catch up (1, 2 / 10), the last tokens, two drafting steps
    assert 3 not in ctx.cache  # a zero-length ask costs nothing


def test_a_requests_prompt_is_no_price_of_drafting() -> None:
    """A draft's price includes catching up on what the target took meanwhile, but not a
    fresh ask's prompt: priced as one token, a new conversation whose first guess was unsure
    made the draft model look too dear to ever be tried again in that worker."""
    history = [*range(1, 40), UNSURE]  # 39 tokens to catch up on, then an unsure guess
    for fresh, price in ((True, 1.0), (False, 40.0)):  # a row decoded costs 1 s
        ctx = SimContext()
        d = drafter(ctx)
        (draft,) = d.draft([DraftRequest(0, history, 4, fresh=fresh)], lambda: False)
        assert draft == [] and d.step_seconds == price  # nothing drafted: priced as one
    (draft,) = d.draft([DraftRequest(0, [*history, 7], 3)], lambda: False)
    assert draft == [8, 9, 10]  # 3 rows decoded (7, 8, 9), each giving the next
    assert d.step_seconds == pytest.approx(40.0 + 0.3 * (3 / 3 - 40.0))


def test_bounds_vocabulary_window_and_failures() -> None:
    ctx = SimContext()
    (draft,) = drafter(ctx, n_vocab=23).draft([DraftRequest(0, [19], 9)], lambda: False)
    assert draft == [20, 21, 22]  # 23 is not in the target's vocabulary
    ctx = SimContext()
    (draft,) = drafter(ctx, n_ctx=10).draft([DraftRequest(0, list(range(8)), 4)], lambda: False)
    assert draft == [] and not ctx.cache  # the draft would not fit the window
    ctx = SimContext(fail_at=3)  # catching up, the last token, then the first drafting step
    d = drafter(ctx)
    (draft,) = d.draft([DraftRequest(1, [1, 2, 3], 4)], lambda: False)
    assert draft == [4] and d.held[1] == [] and ctx.cache[1] == []  # failed: start over
    calls = iter([False, True])
    (draft,) = drafter(SimContext()).draft([DraftRequest(0, [1], 9)], lambda: next(calls))
    assert draft == [2]  # asked to stop after the first drafting step


# -- a real worker ----------------------------------------------------------------------------

STORY = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n" \
        "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def self_drafting() -> Iterator[WorkerClient]:
    from pollama.default_model import default_gguf_path

    client = WorkerClient(smol_spec(num_parallel=2, draft_path=str(default_gguf_path())))
    yield client
    client.close()


@pytest.mark.slow
def test_a_model_drafting_for_itself_keeps_its_answer(self_drafting: WorkerClient) -> None:
    assert self_drafting.ready["type"] == "ready", self_drafting.ready
    options: dict[str, Any] = {"temperature": 0, "num_predict": 48}
    plain, done_plain = self_drafting.complete(ALPHABET, **options, draft_num_predict=0)
    drafted, done = self_drafting.complete(ALPHABET, **options)
    assert done["type"] == "done" and done_plain["draft_tokens"] == 0
    # A draft as big as the model never pays: after a probe or two (the model's own guesses,
    # all kept) the measured cost stops it, as it would stop a draft that misses.
    assert 1 <= done["draft_accepted"] <= done["draft_tokens"] <= 16, done
    assert drafted == plain
    # beside another stream, sampled: still a whole answer, drafts still kept
    other = self_drafting.start(STORY, temperature=0.8, seed=3, num_predict=48)
    text, done = self_drafting.complete(ALPHABET, **options)
    assert text == plain
    assert self_drafting.finish(other)[1]["type"] == "done"
