"""The embedding batcher (``runner/embedder.py``) against a simulated backend.

``SimBackend`` behaves like llama.cpp's embedding context where it matters: a cache that a
round fills and ``clear`` empties, positions that must continue each sequence's last one,
a pass size and a sequence-id bound that must hold, and a vector that is a function of a
sequence's whole token history. So a plan that lost, reordered, mixed or restarted tokens,
overflowed the cache or reused a seq id within a round gives a wrong vector or an error.
"""

from __future__ import annotations

import hashlib
import random
import struct
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from pollama.errors import ContextOverflow, InvalidRequest
from pollama.runner.base import EmbeddingResult
from pollama.runner.embedder import FILLER, EmbeddingLoop, Naming, fit_tokens, plan, run_plan

PAD = 999


def sim_vector(tokens: Sequence[int]) -> bytes:
    digest = hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).digest()
    return struct.pack("<4f", *(b - 128.0 for b in digest[:4]))


class SimBackend:
    def __init__(
        self,
        *,
        limit: int = 64,
        n_batch: int = 16,
        n_seq_max: int = 4,
        n_ctx: int = 64,
        splittable: bool = True,
        align: int = 4,
        round_tokens: int = 0,
        n_tail: int = 0,
        ranks: bool = False,
    ) -> None:
        self.ranks = ranks
        self.limit, self.n_batch, self.n_seq_max, self.n_ctx = limit, n_batch, n_seq_max, n_ctx
        self.splittable, self.align, self.round_tokens, self.n_tail = (
            splittable, align, round_tokens, n_tail
        )  # fmt: skip
        self.pad_token = PAD
        self.cache: dict[int, list[int]] = {}  # seq -> tokens, in position order
        self.passes = 0
        self.clears = 0
        self.pass_sizes: list[int] = []

    def tokenize(self, text: str) -> list[int]:
        return [1, *text.encode()] if text != "<nothing>" else []

    def tokenize_text(self, text: str) -> list[int]:
        return list(text.encode())

    def pair_frame(self, query: str) -> tuple[list[int], list[int]]:
        return [1, *query.encode(), 2], [2]  # [CLS] query [SEP] document [SEP]

    def clear(self) -> None:
        self.cache.clear()
        self.clears += 1

    def forward(
        self, pieces: Sequence[tuple[int, Sequence[int], int]], finished: Sequence[int]
    ) -> list[bytes]:
        self.passes += 1
        size = sum(len(tokens) for _, tokens, _ in pieces)
        assert 0 < size <= self.n_batch, "pass larger than the batch"
        self.pass_sizes.append(size)
        earlier = set(self.cache)
        for seq, tokens, pos0 in pieces:
            assert 0 <= seq < self.n_seq_max, "seq id out of range"
            if not self.splittable:
                assert seq not in earlier, "a sequence spans passes on a backend that cannot"
            history = self.cache.setdefault(seq, [])
            assert pos0 == len(history), "positions must continue the sequence"
            history.extend(tokens)
        assert sum(len(h) for h in self.cache.values()) <= self.n_ctx, "cache overflow"
        for seq in self.cache:
            if seq == self.n_seq_max - 1 and self.align > 1:
                assert set(self.cache[seq]) <= {PAD}, "the filler seq got real tokens"
        return [sim_vector(self.cache[seq]) for seq in finished]


def check_plan(
    lengths: list[int],
    *,
    n_batch: int,
    n_seq_max: int,
    n_ctx: int,
    splittable: bool,
    align: int,
    round_tokens: int = 0,
) -> None:
    """Invariants of any plan, checked piece by piece."""
    rounds = plan(
        lengths,
        n_batch=n_batch,
        n_seq_max=n_seq_max,
        n_ctx=n_ctx,
        splittable=splittable,
        align=align,
        round_tokens=round_tokens,
    )
    capacity = n_ctx if splittable else min(n_ctx, n_batch)
    seen: list[int] = []
    for passes in rounds:
        stream = 0  # tokens of this round so far (the cache cells used)
        next_pos: dict[int, int] = {}
        members: list[int] = []
        for pieces in passes:
            assert 0 < sum(p.end - p.start for p in pieces) <= n_batch
            for p in pieces:
                assert 0 <= p.seq < n_seq_max
                if p.index == FILLER:
                    assert p.seq == n_seq_max - 1 and not p.final
                else:
                    if p.start == 0:
                        assert stream % align == 0, "an input starts at an unaligned cell"
                        members.append(p.index)
                        if not splittable:
                            assert p.end == lengths[p.index], "a whole input per pass"
                    assert p.final == (p.end == lengths[p.index])
                assert next_pos.get(p.seq, 0) == p.start, "positions must be contiguous"
                next_pos[p.seq] = p.end
                stream += p.end - p.start
        assert stream <= capacity
        if round_tokens and len(members) > 1:
            assert stream <= round_tokens
        for seq, index in enumerate(members):  # an input's seq id is its place in the round
            assert next_pos[seq] == lengths[index], "an input was cut short"
        seen += members
    assert seen == list(range(len(lengths))), "every input once, in order"


def test_plan_whole_inputs_aligned_with_filler() -> None:
    rounds = plan([3, 5, 4], n_batch=16, n_seq_max=4, n_ctx=64, splittable=False, align=4)
    assert len(rounds) == 1 and len(rounds[0]) == 1
    pieces = [(p.index, p.seq, p.start, p.end) for p in rounds[0][0]]
    # 3 tokens, 1 filler, 5 tokens, 3 fillers (positions run on), 4 tokens.
    assert pieces == [(0, 0, 0, 3), (FILLER, 3, 0, 1), (1, 1, 0, 5), (FILLER, 3, 1, 4),
                      (2, 2, 0, 4)]  # fmt: skip


def test_plan_splits_only_when_splittable_and_respects_limits() -> None:
    rounds = plan([40], n_batch=16, n_seq_max=4, n_ctx=64, splittable=True, align=1)
    assert [[(p.start, p.end, p.final) for p in ps] for ps in rounds[0]] == [
        [(0, 16, False)], [(16, 32, False)], [(32, 40, True)]
    ]
    with pytest.raises(ValueError, match="a round holds 1 to 16"):
        plan([17], n_batch=16, n_seq_max=4, n_ctx=64, splittable=False, align=1)
    with pytest.raises(ValueError):
        plan([0], n_batch=16, n_seq_max=4, n_ctx=64, splittable=True, align=1)
    # One seq id is the filler's: three inputs per round at most with four ids.
    rounds = plan([1] * 7, n_batch=64, n_seq_max=4, n_ctx=64, splittable=False, align=2)
    assert [sum(1 for ps in r for p in ps if p.index != FILLER) for r in rounds] == [3, 3, 1]
    # A single id: one input per round, no filler needed.
    rounds = plan([3, 3], n_batch=64, n_seq_max=1, n_ctx=64, splittable=False, align=16)
    assert [[p.index for ps in r for p in ps] for r in rounds] == [[0], [1]]


def test_plan_round_tokens_bound_shared_rounds_only() -> None:
    rounds = plan([100, 100, 300, 20], n_batch=512, n_seq_max=8, n_ctx=1024, splittable=True,
                  align=1, round_tokens=256)  # fmt: skip
    members = [[p.index for ps in r for p in ps if p.start == 0] for r in rounds]
    assert members == [[0, 1], [2], [3]]


def test_plan_invariants_hold_for_random_requests() -> None:
    rng = random.Random(7)
    for _ in range(400):
        splittable = rng.random() < 0.5
        n_batch = rng.randint(1, 40)
        n_ctx = rng.randint(1, 120)
        capacity = n_ctx if splittable else min(n_ctx, n_batch)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 12))]
        check_plan(
            lengths,
            n_batch=n_batch,
            n_seq_max=rng.randint(1, 6),
            n_ctx=n_ctx,
            splittable=splittable,
            align=rng.choice([1, 2, 4, 16]),
            round_tokens=rng.choice([0, 8, 32]),
        )


def test_fit_tokens_truncates_keeping_the_tail_or_refuses() -> None:
    assert fit_tokens([1, 2, 3], 3, n_tail=1, truncate=False) == [1, 2, 3]
    assert fit_tokens([1, 2, 3, 4, 5, 9], 4, n_tail=1, truncate=True) == [1, 2, 3, 9]
    assert fit_tokens([1, 2, 3, 4, 5], 3, n_tail=0, truncate=True) == [1, 2, 3]
    with pytest.raises(ContextOverflow) as err:
        fit_tokens(list(range(300)), 256, n_tail=0, truncate=False, name="input 2")
    assert err.value.message == (
        "the input length exceeds the context length: input 2 has 300 tokens, "
        "the context holds 256"
    )


@pytest.mark.parametrize("splittable", [True, False])
def test_run_plan_vectors_are_independent_of_the_batch(splittable: bool) -> None:
    rng = random.Random(3)
    limit = 64 if splittable else 16
    inputs = [[rng.randint(2, 500) for _ in range(rng.randint(1, limit))] for _ in range(25)]
    backend = SimBackend(splittable=splittable, n_ctx=64, n_batch=16, n_seq_max=5)
    batched = run_plan(backend, inputs)
    assert batched == [sim_vector(t) for t in inputs]
    assert backend.clears > 1 and backend.cache == {}  # cleared per round and at the end
    alone = [run_plan(SimBackend(splittable=splittable), [t])[0] for t in inputs]
    assert alone == batched


def test_run_plan_stops_between_passes_when_cancelled() -> None:
    backend = SimBackend(n_batch=4)
    calls = iter([False, False, True])
    from pollama.runner.embedder import Cancelled

    with pytest.raises(Cancelled):
        run_plan(backend, [[1] * 40], lambda: next(calls))
    assert backend.passes == 2


def _wait(loop: EmbeddingLoop, req_id: object, inputs: list[str], truncate: bool = True,
          **kwargs: Any):
    done = threading.Event()
    box: list[EmbeddingResult | BaseException] = []

    def reply(result: EmbeddingResult | BaseException) -> None:
        box.append(result)
        done.set()

    loop.submit(req_id, inputs, truncate, reply, **kwargs)
    assert done.wait(10), "no reply"
    return box[0]


def test_loop_opens_the_backend_lazily_on_its_own_thread_and_answers() -> None:
    opened: list[str] = []

    def open_backend() -> SimBackend:
        opened.append(threading.current_thread().name)
        return SimBackend(limit=8, n_tail=1)

    loop = EmbeddingLoop(open_backend, background=True)
    assert opened == []
    result = _wait(loop, 1, ["hi", "a much longer input"])
    assert isinstance(result, EmbeddingResult)
    assert opened == ["embedder"]
    tokens = [1, *b"a much", ord("t")]  # cut to 8 tokens, the last (the tail) kept
    assert result.token_counts == [3, 8]
    assert result.vectors[0] == sim_vector([1, *b"hi"])
    assert result.vectors[1] == sim_vector(tokens)
    refused = _wait(loop, 2, ["ok", "a much longer input"], truncate=False)
    assert isinstance(refused, ContextOverflow)
    assert "input 1 has 20 tokens, the context holds 8" in refused.message
    empty = _wait(loop, 3, ["<nothing>"])
    assert isinstance(empty, InvalidRequest) and "the input is empty" in empty.message
    assert opened == ["embedder"]  # opened once
    loop.stop()
    assert loop.join(5)


def test_loop_reports_a_backend_that_cannot_open_to_every_job() -> None:
    def broken() -> SimBackend:
        raise RuntimeError("no memory for the context")

    loop = EmbeddingLoop(broken, background=True)
    for req_id in (1, 2):
        result = _wait(loop, req_id, ["x"])
        assert isinstance(result, RuntimeError) and "no memory" in str(result)
    loop.stop()
    assert loop.join(5)


def test_loop_cancel_drops_a_queued_job_without_reply() -> None:
    entered, gate = threading.Event(), threading.Event()

    class Slow(SimBackend):
        def forward(self, pieces, finished):  # type: ignore[no-untyped-def]
            entered.set()
            gate.wait(10)
            return super().forward(pieces, finished)

    loop = EmbeddingLoop(lambda: Slow(), background=True)
    replies: list[tuple[int, object]] = []
    loop.submit(1, ["first"], True, lambda r: replies.append((1, r)))
    loop.submit(2, ["second"], True, lambda r: replies.append((2, r)))
    assert entered.wait(10)  # job 1 is in its pass
    loop.cancel(2)
    gate.set()
    third = _wait(loop, 3, ["third"])  # answered after job 2 was taken off the queue
    assert isinstance(third, EmbeddingResult)
    assert [n for n, _ in replies] == [1]
    loop.stop()
    assert loop.join(5)
    with pytest.raises(RuntimeError):
        loop.submit(4, ["late"], True, replies.append)


def test_a_cross_encoder_scores_pairs_cutting_the_document_never_the_query() -> None:
    loop = EmbeddingLoop(lambda: SimBackend(limit=12, ranks=True), background=True)
    docs = ["ab", "a long document"]
    result = _wait(loop, 1, docs, query="qq", naming=Naming("document"))
    assert isinstance(result, EmbeddingResult)
    pair0 = [1, *b"qq", 2, *b"ab", 2]
    pair1 = [1, *b"qq", 2, *b"a long ", 2]  # 12 tokens: the document cut, the last [SEP] kept
    assert result.token_counts == [7, 12]
    assert result.vectors == [sim_vector(pair0), sim_vector(pair1)]
    refused = _wait(loop, 2, docs, False, query="qq", naming=Naming("document", offset=256))
    assert isinstance(refused, ContextOverflow)
    assert "document 257 has 20 tokens with the query, the context holds 12" in refused.message
    long_query = _wait(loop, 3, docs, query="q" * 10)
    assert isinstance(long_query, ContextOverflow) and "the query is too long" in long_query.message
    no_pairs = _wait(loop, 4, ["x"])  # a cross-encoder has no embeddings
    assert isinstance(no_pairs, InvalidRequest) and "is a reranker" in no_pairs.message
    loop.stop()
    assert loop.join(5)


def test_only_a_cross_encoder_scores_pairs_and_names_follow_the_request() -> None:
    loop = EmbeddingLoop(lambda: SimBackend(limit=8), background=True)
    refused = _wait(loop, 1, ["x"], query="q")
    assert isinstance(refused, InvalidRequest) and "does not score pairs" in refused.message
    over = _wait(loop, 2, ["ok", "a much longer input"], False, naming=Naming("input", 256))
    assert isinstance(over, ContextOverflow) and "input 257 has" in over.message
    query = _wait(loop, 3, ["a much longer input"], False, naming=Naming("query"))
    assert isinstance(query, ContextOverflow) and "the query has" in query.message
    loop.stop()
    assert loop.join(5)
