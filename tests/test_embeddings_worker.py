"""Embeddings in the worker process, over the real protocol, with real llama.cpp contexts.

Tiny random-weight models with each pooling type stand in for embedding models; the real
SmolLM2 is the generation model that is also asked for embeddings (slow tests). The central
check is batch independence: an input's vector alone equals its vector packed with inputs
of other lengths, which llama.cpp only gives when every input starts at an aligned cache
cell and flash attention is off (``runner/llama.py`` ``EmbeddingContext``).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ggufgen import write_tiny_model
from pollama.runner.base import LoadSpec
from test_worker import WorkerClient, smol_spec

TEXTS = [
    "hello",
    "the cat and the dog",
    "a " * 37 + "story",
    "why is the sky blue? tell me a long story about it " * 3,
    "yes",
]


def vectors(reply: dict[str, Any]) -> list[np.ndarray]:
    assert reply["type"] == "result", reply
    return [np.frombuffer(base64.b64decode(v), dtype="<f4") for v in reply["vectors"]]


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def assert_batch_independent(client: WorkerClient, texts: list[str], tol: float) -> None:
    batched = vectors(client.call({"op": "embed", "inputs": texts}))
    for text, in_batch in zip(texts, batched, strict=True):
        (alone,) = vectors(client.call({"op": "embed", "inputs": [text]}))
        assert np.abs(unit(alone) - unit(in_batch)).max() <= tol, text
    # Another order and company give the same vectors again.
    shuffled = vectors(client.call({"op": "embed", "inputs": texts[::-1]}))
    for a, b in zip(batched, shuffled[::-1], strict=True):
        assert np.abs(unit(a) - unit(b)).max() <= tol


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embed")
    return {
        name: write_tiny_model(root / f"{name}.gguf", pooling_type=pooling, context_length=256)
        for name, pooling in (("mean", 1), ("cls", 2), ("last", 3), ("rank", 4))
    }


@pytest.fixture(scope="module")
def mean(models: dict[str, Path]) -> Iterator[WorkerClient]:
    client = WorkerClient(LoadSpec(model_path=str(models["mean"]), num_ctx=256, embedding=True))
    yield client
    client.close()


def test_embedding_model_ready_and_vectors(mean: WorkerClient) -> None:
    info = mean.ready["info"]
    assert mean.ready["type"] == "ready"
    assert (info["n_ctx"], info["n_parallel"]) == (256, 1)
    reply = mean.call({"op": "embed", "inputs": ["hello world", "the cat"]})
    first, second = vectors(reply)
    assert first.shape == second.shape == (64,) and np.isfinite(first).all()
    assert not np.allclose(unit(first), unit(second))
    tokens = mean.call({"op": "tokenize", "text": "hello world"})["tokens"]
    assert reply["token_counts"][0] == len(tokens)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_vectors_do_not_depend_on_the_batch(models: dict[str, Path], pooling: str) -> None:
    client = WorkerClient(LoadSpec(model_path=str(models[pooling]), num_ctx=256, embedding=True))
    try:
        assert_batch_independent(client, TEXTS, tol=1e-6)
    finally:
        client.close()


def test_truncation_and_refusals(mean: WorkerClient) -> None:
    long = "hello world " * 200
    error = mean.call({"op": "embed", "inputs": ["ok", long], "truncate": False})
    assert (error["type"], error["kind"]) == ("error", "invalid")
    n = len(mean.call({"op": "tokenize", "text": long})["tokens"])
    assert error["message"] == (
        f"the input length exceeds the context length: input 1 has {n} tokens, "
        "the context holds 256"
    )
    reply = mean.call({"op": "embed", "inputs": [long], "truncate": True})
    assert reply["token_counts"] == [256] and len(vectors(reply)) == 1
    empty = mean.call({"op": "embed", "inputs": [""]})
    assert empty["type"] == "result"  # this vocabulary adds BOS: one token
    _, done = mean.complete("hello", num_predict=3)
    assert done["type"] == "error" and "does not support generate" in done["message"]
    bad = mean.call({"op": "embed", "inputs": [1, 2]})
    assert bad["type"] == "error" and bad["kind"] == "invalid"


def test_a_reranking_model_scores_pairs_and_has_no_embeddings(models: dict[str, Path]) -> None:
    client = WorkerClient(LoadSpec(model_path=str(models["rank"]), num_ctx=256, embedding=True))
    assert client.ready["type"] == "ready"
    reply = client.call({"op": "embed", "inputs": ["x"]})
    assert reply["type"] == "error" and "is a reranker" in reply["message"]
    reply = client.call({"op": "embed", "inputs": ["a", "bb"], "query": "q",
                         "label": "document"})  # fmt: skip
    assert reply["type"] == "result" and len(reply["token_counts"]) == 2
    assert reply["token_counts"][1] > reply["token_counts"][0]
    for score in vectors(reply):
        assert score.shape == (1,) and np.isfinite(score).all()  # one classifier output
    reply = client.call({"op": "embed", "inputs": ["a"], "query": 3})
    assert reply["type"] == "error" and "query must be a string" in reply["message"]
    assert client.close() == 0


# -- a generation model asked for embeddings (the real model) -------------------------------------


@pytest.fixture(scope="module")
def smol_embed() -> Iterator[WorkerClient]:
    client = WorkerClient(smol_spec(num_parallel=2, num_ctx=512))
    yield client
    client.close()


@pytest.mark.slow
def test_smol_embeds_while_it_generates(smol_embed: WorkerClient) -> None:
    prompt = "<|im_start|>user\nWrite a poem.<|im_end|>\n<|im_start|>assistant\n"
    gen = smol_embed.start(prompt, temperature=0, num_predict=40)
    assert smol_embed.next(gen)["type"] == "chunk"  # generating
    reply = smol_embed.call({"op": "embed", "inputs": ["hello world", "the sky is blue"]})
    a, b = vectors(reply)
    assert a.shape == (576,) and np.isfinite(a).all() and np.isfinite(b).all()
    text, done = smol_embed.finish(gen)
    assert done["type"] == "done" and done["eval_count"] > 1
    # Last-token pooling: "hello world" and "hello world!" differ only in their last token.
    (c,) = vectors(smol_embed.call({"op": "embed", "inputs": ["hello world!"]}))
    assert np.abs(unit(a) - unit(c)).max() > 1e-3


@pytest.mark.slow
def test_smol_vectors_do_not_depend_on_the_batch(smol_embed: WorkerClient) -> None:
    # A quantized model amplifies any change in rounding: without aligned cells these differ
    # by up to 1e-2 per component; aligned, they are bit-identical.
    assert_batch_independent(smol_embed, TEXTS, tol=1e-4)
    long = "word " * 700  # more than num_ctx: cut to 512
    reply = smol_embed.call({"op": "embed", "inputs": [long]})
    assert reply["token_counts"] == [512]


@pytest.mark.slow
def test_smol_an_input_split_across_passes_gets_the_same_vector() -> None:
    """Batches of 64 tokens: a 300-token input spans five passes (its last one sees the rest
    through the cache) and must equal the vector from one pass of 512."""
    text = "The history of the sky and its blue colour, told slowly. " * 25
    small = WorkerClient(smol_spec(num_ctx=512, num_batch=64))
    try:
        count = len(small.call({"op": "tokenize", "text": text})["tokens"])
        assert 256 < count <= 512
        split = vectors(small.call({"op": "embed", "inputs": ["hi", text]}))
    finally:
        small.close()
    big = WorkerClient(smol_spec(num_ctx=512, num_batch=512))
    try:
        whole = vectors(big.call({"op": "embed", "inputs": ["hi", text]}))
    finally:
        big.close()
    for a, b in zip(split, whole, strict=True):
        assert np.abs(unit(a) - unit(b)).max() <= 1e-4


# -- SubprocessRunner.embed (the server's side) ----------------------------------------------------


def test_embed_groups_bound_each_op() -> None:
    from pollama.runner import process

    texts = ["x" * 10] * 600
    groups = process._embed_groups(texts)
    assert [len(g) for g in groups] == [256, 256, 88]
    big = ["y" * (600 << 10), "z", "w" * (600 << 10)]  # 1 MiB of characters per op
    assert [len(g) for g in process._embed_groups(big)] == [2, 1]
    assert process._embed_groups([]) == []


def test_subprocess_runner_embeds_in_groups_and_maps_errors(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from pollama.errors import InvalidRequest
    from pollama.runner import process

    monkeypatch.setattr(process, "_EMBED_OP_INPUTS", 2)  # five inputs: three ops

    async def body() -> None:
        runner = process.SubprocessRunner(
            LoadSpec(model_path=str(models["mean"]), num_ctx=256, embedding=True)
        )
        await runner.start()
        try:
            result = await runner.embed(TEXTS)
            assert len(result.vectors) == len(result.token_counts) == len(TEXTS)
            alone = await runner.embed([TEXTS[3]])
            a, b = (np.frombuffer(v, dtype="<f4") for v in (result.vectors[3], alone.vectors[0]))
            assert np.abs(unit(a) - unit(b)).max() <= 1e-6
            with pytest.raises(InvalidRequest, match="exceeds the context length"):
                await runner.embed(["a " * 300], truncate=False)
            task = asyncio.ensure_future(runner.embed(["b " * 250] * 40))
            await asyncio.sleep(0.05)
            task.cancel()  # sends cancel; the worker goes on serving
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await runner.embed(["still here"])).token_counts[0] > 0
        finally:
            await runner.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_lora_adapters_apply_to_embeddings(tmp_path: Path) -> None:
    from test_worker import write_lora

    model = write_tiny_model(tmp_path / "gen.gguf", context_length=256)
    lora = write_lora(tmp_path / "lora.gguf")
    found = []
    for adapters in ((), (str(lora),)):
        client = WorkerClient(LoadSpec(str(model), num_ctx=64, adapters=adapters))
        try:
            found.append(vectors(client.call({"op": "embed", "inputs": ["hello world"]}))[0])
        finally:
            assert client.close() == 0
    assert np.abs(unit(found[0]) - unit(found[1])).max() > 1e-3
