"""bench/gguf_synth.py: the stand-in model's synthesized weights are finite, zero-mean and of
the intended scale once dequantized (by gguf-py, as llama.cpp would), for every type it writes,
so the GPU check's model neither overflows nor ends its answers early."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gguf_synth  # noqa: E402


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_0", "Q6_K", "Q8_0"])
def test_synthesized_blocks_dequantize_to_small_zero_mean_weights(kind: str) -> None:
    blocks = gguf_synth._blocks(kind, 4096, np.random.default_rng(1))
    weights = dequantize(blocks, GGMLQuantizationType[kind]).ravel()
    assert np.isfinite(weights).all()
    assert abs(float(weights.mean())) < 0.002
    assert 0.004 < float(weights.std()) < 0.04


def test_special_token_rows_of_the_output_are_zero() -> None:
    spec = {"name": "output.weight", "type": "Q8_0", "rows": 10, "row_elements": 64,
            "bytes": 10 * 2 * 34, "offset": 0}
    data = gguf_synth._tensor(spec, 7, np.random.default_rng(2))
    rows = dequantize(np.frombuffer(data, np.uint8).reshape(-1, 34),
                      GGMLQuantizationType.Q8_0).reshape(10, 64)
    assert rows[:7].any(axis=1).all()  # ordinary rows carry weights
    assert (rows[7:] == 0).all()
