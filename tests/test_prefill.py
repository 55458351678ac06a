"""The short-chunk policy (``runner/prefill.py``): a short prompt rest is padded to a tile
only where both costs were measured and the tile is cheaper."""

from __future__ import annotations

import pytest

from pollama.runner.prefill import TILE, ShortChunks


def test_nothing_is_padded_before_both_costs_are_measured() -> None:
    chunks = ShortChunks()
    assert chunks.rows_back(25, 900) == 0
    chunks.record(25, 900, 0.25)  # 10 ms a row
    assert chunks.rows_back(25, 900) == 0  # no tile measured yet
    chunks.record(512, 0, 0.8)  # a long chunk: 0.1 s scaled to a tile
    assert chunks.rows_back(25, 900) == TILE - 25


def test_a_measured_tile_outweighs_a_scaled_one_and_stops_the_padding() -> None:
    chunks = ShortChunks()
    chunks.record(25, 900, 0.25)
    chunks.record(512, 0, 0.8)
    assert chunks.rows_back(20, 900) == TILE - 20  # 0.2 s against 0.1 s
    chunks.record(TILE, 900 - 44, 0.5)  # the tile really costs 0.5 s here (a large model)
    assert chunks.rows_back(20, 900) == 0
    assert chunks.rows_back(60, 900) == TILE - 60  # 0.6 s of rows against the tile's 0.5


def test_what_pays_shallower_pays_deeper_but_not_shallower() -> None:
    chunks = ShortChunks()
    chunks.record(25, 600, 0.25)
    chunks.record(TILE, 600, 0.1)
    assert chunks.rows_back(25, 3000) == TILE - 25  # deeper: the shallower costs stand
    assert chunks.rows_back(25, 300) == 0  # shallower: nothing measured there


@pytest.mark.parametrize(
    ("left", "cached"),
    [(1, 900), (TILE, 900), (100, 900), (25, 100), (25, 0)],
)
def test_only_a_short_rest_after_enough_cached_tokens_is_padded(left: int, cached: int) -> None:
    chunks = ShortChunks()
    for depth in (64, 600):
        chunks.record(30, depth, 3.0)  # rows as dear as can be
        chunks.record(TILE, depth, 0.01)
    assert chunks.rows_back(left, cached) == 0


def test_single_rows_and_zero_times_are_not_samples() -> None:
    chunks = ShortChunks()
    chunks.record(1, 900, 0.02)  # one row: another kernel path, not a sample
    chunks.record(5, 900, 0.0)  # a step timed at 0 on a coarse clock
    assert chunks.to_json() == {"row": {}, "tile": {}, "scaled": {}}


def test_the_costs_go_through_json_and_back() -> None:
    chunks = ShortChunks()
    chunks.record(25, 900, 0.25)
    chunks.record(TILE, 900, 0.1)
    chunks.record(400, 512, 0.5)
    again = ShortChunks.from_json(chunks.to_json())
    assert again.to_json() == chunks.to_json()
    assert again.rows_back(25, 900) == chunks.rows_back(25, 900) == TILE - 25


@pytest.mark.parametrize(
    "data",
    [None, [], {"row": []}, {"row": {"0": 0.1}}, {"row": {"65": 0.1}}, {"row": {"5": 61}},
     {"row": {"5": float("inf")}}, {"row": {"5": "0.1"}}, {"rows": {}},
     {"row": {str(b): 0.1 for b in range(1, 66)}}],
)
def test_malformed_costs_are_refused(data: object) -> None:
    with pytest.raises(ValueError):
        ShortChunks.from_json(data)
