"""A short prompt rest padded to a tile, end to end (``runner/prefill.py``).

A real server with one sequence and the real SmolLM2 model, flash attention at its default.
A conversation of about 600 tokens answers its first turn and is unloaded, which keeps the
slot and what the worker measured (the ``.costs`` file beside the sequence's). Whether
padding pays depends on the machine, so the test writes the costs itself: rows dear and
tiles cheap, then the reverse. With the first, the restored next turn evaluates a whole tile
(64 rows, cached tokens taken back); with the second, only its new tokens: the costs each
worker kept at its unload say which it decoded. Both must read
the conversation alike: the first answer token's top probabilities agree to rounding
(the texts are not compared: other rows in a decode round the kernels' last bits
differently and may flip a near tie, ``tests/test_e2e_context_shift.py``). The worker's own
measurements are then kept for the next one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import create_default_model, stop_server
from pollama.runner.prefill import TILE
from test_e2e_kv_persist import FIRST, Home

pytestmark = pytest.mark.slow

PAD = {"one": {"1": 0.001}, "extra": {"1": 60.0}, "tile": {"1": 0.001}}  # rows dear: pad
KEEP = {"one": {"1": 0.001}, "extra": {"1": 0.001}, "tile": {"1": 60.0}}  # a tile dear: not


class Conversation(Home):
    """The module's server: ``test_e2e_kv_persist``'s, flash attention at its default."""

    def costs(self) -> Path:
        (path,) = self.cache.glob("*.costs")
        return path


@pytest.fixture(scope="module")
def talk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Conversation]:
    home = tmp_path_factory.mktemp("prefill-home")
    running = Conversation(home)
    try:
        create_default_model(running.server, home)
        yield running
    finally:
        stop_server(running.server)


def _restored_turn(talk: Conversation, first: dict[str, Any], slot: tuple[Path, bytes],
                   costs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The next turn on a fresh worker that restores the first turn's ``slot`` (its file,
    put back: a turn's unload saves a longer one) and reads ``costs``; and the costs that
    worker kept at its unload."""
    for path in talk.cache.glob("*.kv"):
        path.unlink()
    slot[0].write_bytes(slot[1])
    talk.costs().write_text(json.dumps(costs))
    question = {"role": "user", "content": "And who did the fox meet?"}
    answer = talk.chat([*FIRST, first["message"], question], top_logprobs=5)
    talk.unload()
    return answer, json.loads(talk.costs().read_text())


def _first_top(answer: dict[str, Any]) -> dict[str, float]:
    return {entry["token"]: entry["logprob"] for entry in answer["logprobs"][0]["top_logprobs"]}


def test_a_short_rest_is_padded_to_a_tile_where_the_costs_say_so(talk: Conversation) -> None:
    first = talk.chat(FIRST)
    talk.unload()
    (saved,) = talk.cache.glob("*.kv")
    slot = (saved, saved.read_bytes())
    padded, padded_costs = _restored_turn(talk, first, slot, PAD)
    plain, plain_costs = _restored_turn(talk, first, slot, KEEP)

    total = plain["prompt_eval_count"]
    assert padded["prompt_eval_count"] == total > first["prompt_eval_count"]
    # Both report what the cache held; only the padded turn decoded a tile after it.
    assert padded["prompt_cached_count"] == plain["prompt_cached_count"] > TILE
    left = total - plain["prompt_cached_count"]
    assert 2 <= left < TILE  # a short rest after the restored history
    depth = str((total - TILE).bit_length())  # the tile's depth bucket (runner/prefill.py)
    assert depth in padded_costs["tile"] and depth not in plain_costs["tile"]
    assert depth in plain_costs["extra"]  # the plain turn's rest, measured as rows
    assert 0 < plain_costs["extra"][depth] < 10 and 0 < padded_costs["tile"][depth] < 10
    assert padded["message"]["content"] and plain["message"]["content"]
    padded_top, plain_top = _first_top(padded), _first_top(plain)
    assert max(padded_top, key=padded_top.__getitem__) == max(plain_top, key=plain_top.__getitem__)
    for token in set(padded_top) & set(plain_top):  # probabilities, alike to rounding
        assert abs(math.exp(padded_top[token]) - math.exp(plain_top[token])) < 0.02, token

