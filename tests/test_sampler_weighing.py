"""``SamplerChain.sample_weighing`` on the real engine: the same draws as llama.cpp's own
``llama_sampler_sample``, and the probability the chain gave a token (what drafting learns
its odds from, ``runner/ngram.py``), checked against the chain's filters worked out here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from ngram_replay import default_chain
from pollama.default_model import default_gguf_path
from pollama.runner.base import SamplingOptions

ROWS = 24  # rows with logits: the prompt's last ones


@pytest.fixture(scope="module")
def rows() -> Iterator[tuple[Any, Any, list[int]]]:
    """A context whose batch holds ``ROWS`` rows of logits (a story's prompt's last rows),
    and those rows' indices in the batch (importing ``llama`` loads llama.cpp: hence here)."""
    from pollama.runner import llama

    llama.backend_init()
    model = llama.Model(str(default_gguf_path()))
    ctx = llama.Context(model, llama.ContextParams(n_ctx=512, n_batch=512, n_ubatch=512))
    tokens = model.tokenize("Once upon a time, in a lighthouse by the sea, there lived an old "
                            "keeper who counted the ships that passed and the gulls that")
    assert len(tokens) > ROWS
    batch = llama.Batch(512)
    for pos, token in enumerate(tokens):
        batch.add(token, pos, 0, pos >= len(tokens) - ROWS)
    assert ctx.decode(batch) == 0
    yield model, ctx, list(range(len(tokens) - ROWS, len(tokens)))  # batch rows, as the engine
    ctx.close()
    model.close()


def _chain(opts: SamplingOptions, n_vocab: int) -> Any:
    from pollama.runner.engine import build_sampler

    chain, _history = build_sampler(opts, n_vocab, 512)
    return chain


CHAINS = {
    "defaults": SamplingOptions(temperature=0.8, seed=7),
    "hot, no top_k": SamplingOptions(temperature=1.5, top_k=0, top_p=1.0, seed=3),
    "penalties, min_p": SamplingOptions(temperature=0.7, repeat_penalty=1.3, presence_penalty=0.5,
                                        min_p=0.05, seed=11),
    "typical": SamplingOptions(temperature=1.0, typical_p=0.8, top_k=100, seed=5),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_it_draws_what_llama_sampler_sample_draws(rows: Any, name: str) -> None:
    """Two chains of the same seed, one sampling with llama.cpp's call and one weighing,
    over the same rows several times (penalties see what each accepted): the same tokens."""
    model, ctx, indices = rows
    plain, weighing = _chain(CHAINS[name], model.n_vocab), _chain(CHAINS[name], model.n_vocab)
    try:
        drawn, weighed = [], []
        for _ in range(4):
            for row in indices:
                drawn.append(plain.sample(ctx, row))
                token, weight = weighing.sample_weighing(ctx, row, drawn[-1])
                weighed.append(token)
                assert 0.0 < weight <= 1.0  # the token it drew had a chance
        assert weighed == drawn
        assert len(set(drawn)) > 5  # not one token over and over: the draws are random
    finally:
        plain.close()
        weighing.close()


def _defaults_probability(logits: np.ndarray, token: int) -> float:
    """The default chain's (top_k 40, top_p 0.9, temperature 0.8) probability of ``token``,
    worked out with numpy (the arithmetic ``bench/spec_ceiling.py`` records traces with)."""
    return default_chain(logits, 0.8).get(token, 0.0)


def test_the_weight_is_the_chains_probability_of_the_token(rows: Any) -> None:
    """For each row, the weight of the row's likeliest tokens and of an unlikely one is the
    chain's probability of it (0 outside the nucleus); the weights of a row's tokens sum to
    1 over those the chain keeps."""
    model, ctx, indices = rows
    chain = _chain(SamplingOptions(temperature=0.8, seed=1), model.n_vocab)
    try:
        confident = 0
        for row in indices:
            logits = ctx.logits(row).astype(np.float64)
            order = np.argsort(-logits, kind="stable")
            asked = [int(t) for t in order[:5]] + [int(order[-1])]
            weights = []
            for token in asked:
                _drawn, weight = chain.sample_weighing(ctx, row, token)
                weights.append(weight)
                assert weight == pytest.approx(_defaults_probability(logits, token), abs=1e-4)
            assert weights[-1] == 0.0
            confident += weights[0] == pytest.approx(1.0)
            nucleus = {t for t in order[:40] if _defaults_probability(logits, int(t)) > 0}
            total = sum(chain.sample_weighing(ctx, row, int(t))[1] for t in nucleus)
            assert total == pytest.approx(1.0, abs=1e-4)
        assert 0 < confident < len(indices)  # some rows the nucleus is one token, some not
    finally:
        chain.close()
