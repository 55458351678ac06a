"""The short-chunk policy (``runner/prefill.py``): a short prompt rest is padded to a tile
only where its costs were measured and the tile is clearly cheaper."""

from __future__ import annotations

import pytest

from pollama.runner.prefill import TILE, ShortChunks


def _measured(one: float, rows: int, seconds: float, tile: float, depth: int = 900
              ) -> ShortChunks:  # fmt: skip
    chunks = ShortChunks()
    chunks.record(1, depth, one)
    chunks.record(rows, depth, seconds)
    chunks.record(TILE, depth, tile)
    return chunks


def test_nothing_is_padded_before_the_costs_are_measured() -> None:
    chunks = ShortChunks()
    assert chunks.rows_back(25, 900) == 0
    chunks.record(25, 900, 0.28)  # no one-row decode measured yet: not a sample
    chunks.record(512, 0, 0.8)  # a long chunk: 0.1 s scaled to a tile
    assert chunks.rows_back(25, 900) == 0
    chunks.record(1, 900, 0.018)
    assert chunks.rows_back(25, 900) == 0  # what a further row adds is still unknown
    chunks.record(25, 900, 0.28)
    assert chunks.rows_back(25, 900) == TILE - 25


def test_a_row_is_what_it_adds_to_a_one_row_decode() -> None:
    # Flash attention off: two rows cost little more than one, a tile more than 25 rows.
    chunks = _measured(one=0.007, rows=2, seconds=0.0085, tile=0.1)
    assert chunks.rows_back(25, 900) == 0
    assert chunks.rows_back(60, 900) == 0
    # Flash attention on, SmolLM2 on the Xeon after 877 cached tokens.
    chunks = _measured(one=0.018, rows=8, seconds=0.094, tile=0.12)
    assert chunks.rows_back(8, 900) == 0  # 94 ms against 120: not worth it
    assert chunks.rows_back(25, 900) == TILE - 25  # about 280 ms against 120


def test_only_a_clearly_cheaper_tile_is_taken() -> None:
    chunks = _measured(one=0.010, rows=11, seconds=0.110, tile=0.1)  # 10 ms a further row
    assert chunks.rows_back(11, 900) == 0  # 110 ms against 100: within the margin
    assert chunks.rows_back(14, 900) == TILE - 14  # 140 ms against 100


def test_a_measured_tile_outweighs_a_scaled_one() -> None:
    chunks = ShortChunks()
    chunks.record(1, 900, 0.02)
    chunks.record(20, 900, 0.21)
    chunks.record(512, 0, 0.8)
    assert chunks.rows_back(20, 900) == TILE - 20  # 210 ms against 100 scaled
    chunks.record(TILE, 900 - 44, 0.5)  # the tile really costs 0.5 s here
    assert chunks.rows_back(20, 900) == 0


def test_what_pays_shallower_pays_deeper_but_not_shallower() -> None:
    chunks = _measured(one=0.02, rows=25, seconds=0.28, tile=0.1, depth=600)
    assert chunks.rows_back(25, 3000) == TILE - 25  # deeper: the shallower costs stand
    assert chunks.rows_back(25, 300) == 0  # shallower: nothing measured there


@pytest.mark.parametrize(
    ("left", "cached"),
    [(1, 900), (TILE, 900), (100, 900), (25, 100), (25, 0)],
)
def test_only_a_short_rest_after_enough_cached_tokens_is_padded(left: int, cached: int) -> None:
    chunks = ShortChunks()
    for depth in (64, 600):
        chunks.record(1, depth, 0.01)
        chunks.record(30, depth, 3.0)  # rows as dear as can be
        chunks.record(TILE, depth, 0.01)
    assert chunks.rows_back(left, cached) == 0


def test_zero_times_are_not_samples() -> None:
    chunks = ShortChunks()
    chunks.record(5, 900, 0.0)  # a step timed at 0 on a coarse clock
    chunks.record(1, 900, 0.0)
    assert chunks.to_json() == {"one": {}, "extra": {}, "tile": {}, "scaled": {}}


def test_the_costs_go_through_json_and_back() -> None:
    chunks = _measured(one=0.02, rows=25, seconds=0.28, tile=0.1)
    chunks.record(400, 512, 0.5)
    chunks.record(1, 3000, 0.05)
    chunks.record(2, 3000, 0.04)  # a further row measured as adding nothing
    assert chunks.to_json()["extra"]["12"] == 0.0
    again = ShortChunks.from_json(chunks.to_json())
    assert again.to_json() == chunks.to_json()
    assert again.rows_back(25, 900) == chunks.rows_back(25, 900) == TILE - 25


@pytest.mark.parametrize(
    "data",
    [None, [], {"one": []}, {"one": {"0": 0.1}}, {"one": {"65": 0.1}}, {"one": {"5": 61}},
     {"one": {"5": -0.001}}, {"one": {"5": float("nan")}},
     {"one": {"5": float("inf")}}, {"one": {"5": "0.1"}}, {"row": {}},
     {"one": {str(b): 0.1 for b in range(1, 66)}}],
)
def test_malformed_costs_are_refused(data: object) -> None:
    with pytest.raises(ValueError):
        ShortChunks.from_json(data)
