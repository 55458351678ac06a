"""How the engine cuts prompts into chunks for llama.cpp's CPU flash-attention kernel
(``runner/prefill.py``), checked against the fake context of ``test_engine_positions.py``:
a long prompt's last chunk is never a short one after a full chunk, and a short rest after a
deep cache is padded to a tile with cached tokens, at their own positions, exactly where the
measured costs say a tile is cheaper."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pollama.runner.base import CompletionRequest
from pollama.runner.engine import Engine
from pollama.runner.prefill import TILE
from test_engine_positions import (
    GREEDY,
    _Batch,
    _Context,
    _held,
    _kv,
    _run,
    engine_fixture,  # noqa: F401  (the ``engine`` fixture)
)

DEAR_ROWS = {"one": {"1": 0.01}, "extra": {"1": 1.0}, "tile": {"1": 0.01}}  # tiles are cheaper


class _Recording(_Context):
    """The fake context, recording each decode's rows and first position."""

    def __init__(self) -> None:
        super().__init__(capacity=4096)
        self.decoded: list[tuple[int, int]] = []

    def decode(self, batch: _Batch) -> int:
        self.decoded.append((batch.n_tokens, int(batch.pos[0])))
        return super().decode(batch)


@pytest.fixture
def make(engine: Callable[..., Engine]) -> Callable[..., Engine]:
    """``make(costs)``: ``test_engine_positions``' engine, its loop running, on a recording
    context with room for long prompts, starting from ``costs`` (``ShortChunks.to_json``)."""
    return lambda costs=None: engine(context=_Recording(), n_ctx=4096, n_batch=512,
                                     costs=costs)  # fmt: skip


def _prompt(n: int) -> list[int]:
    return [3 + (i * 7) % 50 for i in range(n)]


def _chunks(eng: Engine) -> list[tuple[int, int]]:
    """The decodes of more than one row: (rows, first position)."""
    return [d for d in eng.ctx.decoded if d[0] > 1]  # type: ignore[attr-defined]


def _sound(eng: Engine) -> None:
    """The KV holds exactly the slot's tokens, each at its index."""
    assert [p for p, _ in _kv(eng)] == list(range(len(_kv(eng))))
    assert [w for _, w in _kv(eng)] == _held(eng)


@pytest.mark.parametrize(("n", "chunks"), [
    (540, [(476, 0), (64, 476)]),  # not 512 and 28
    (512 + 64, [(512, 0), (64, 512)]),
    (1050, [(512, 0), (474, 512), (64, 986)]),
    (500, [(500, 0)]),
])  # fmt: skip
def test_a_long_prompts_last_chunk_is_at_least_a_tile(make: Any, n: int, chunks: Any) -> None:
    eng = make()
    final = _run(eng, CompletionRequest(tokens=_prompt(n), options=GREEDY))
    assert final.prompt_eval_count == n
    assert _chunks(eng) == chunks
    _sound(eng)


def test_a_short_rest_after_a_deep_cache_is_padded_where_a_tile_is_cheaper(
    make: Any,
) -> None:
    eng = make(DEAR_ROWS)
    prompt = _prompt(300)
    _run(eng, CompletionRequest(tokens=prompt, options=GREEDY))
    held = len(eng.slots[0].tokens)
    follow = [*eng.slots[0].tokens, 40, 41, 42, 43, 44]
    final = _run(eng, CompletionRequest(tokens=follow, options=GREEDY))
    assert final.prompt_cached == held  # what the cache held, the tokens taken back included
    assert _chunks(eng)[-1] == (TILE, len(follow) - TILE)  # a tile ending at the new tokens
    _sound(eng)


@pytest.mark.parametrize(
    "costs", [None, {"one": {"1": 0.01}, "extra": {"1": 0.01}, "tile": {"1": 1.0}}]
)
def test_without_costs_or_with_cheap_rows_only_the_new_tokens_are_decoded(
    make: Any, costs: Any
) -> None:
    eng = make(costs)
    _run(eng, CompletionRequest(tokens=_prompt(300), options=GREEDY))
    held = len(eng.slots[0].tokens)
    follow = [*eng.slots[0].tokens, 40, 41, 42, 43, 44]
    final = _run(eng, CompletionRequest(tokens=follow, options=GREEDY))
    assert final.prompt_cached == held
    assert _chunks(eng)[-1] == (len(follow) - held, held)
    _sound(eng)


def test_a_shallow_cache_is_never_padded(make: Any) -> None:
    eng = make(DEAR_ROWS)
    _run(eng, CompletionRequest(tokens=_prompt(100), options=GREEDY))
    held = len(eng.slots[0].tokens)
    _run(eng, CompletionRequest(tokens=[*eng.slots[0].tokens, 40, 41, 42], options=GREEDY))
    assert _chunks(eng)[-1] == (3, held)


class _Tuner:
    """A thread tuner whose every step runs on ``running`` of two threads."""

    n_max = 2

    def __init__(self, running: int) -> None:
        self.running = self.current = running

    def threads_for_step(self, rows: int) -> None:
        pass

    def interrupt(self) -> None:
        pass

    def record(self, rows: int, seconds: float) -> None:
        pass


@pytest.mark.parametrize(("running", "measured"), [(2, True), (1, False)])
def test_short_chunks_are_measured_on_all_threads_only(
    make: Any, running: int, measured: bool
) -> None:
    """A probe's or a busy machine's one thread makes a row look dear, and the costs
    outlive the worker: those steps are not samples."""
    eng = make()
    eng.tuner = _Tuner(running)  # before any request: the loop reads it at every step
    _run(eng, CompletionRequest(tokens=_prompt(300), options=GREEDY))
    tables = eng.short_chunks.to_json()
    assert any(tables.values()) is measured, tables
