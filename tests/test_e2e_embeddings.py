"""Embeddings end to end: real servers, real workers, the official ``ollama`` and ``openai``
clients and the CLI.

SmolLM2 (a generation model, last-token pooling) runs in the shared ``model_server``; a
tiny random-weight model with a pooling type, created in a server of its own, is the
embedding-only model.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import ollama
import openai
import pytest

from conftest import MODEL, RunningServer
from ggufgen import write_tiny_model

pytestmark = pytest.mark.slow


def norm(vector: list[float]) -> float:
    return math.sqrt(math.fsum(x * x for x in vector))


def max_diff(a: list[float], b: list[float]) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture
def client(model_server: RunningServer) -> Iterator[ollama.Client]:
    c = ollama.Client(host=model_server.url)
    yield c
    c.close()


@pytest.fixture
def oai(model_server: RunningServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{model_server.url}/v1", api_key="unused")
    yield c
    c.close()


# -- a generation model (SmolLM2) ------------------------------------------------------------------


def test_ollama_client_embed_string_and_list(client: ollama.Client) -> None:
    one = client.embed(model=MODEL, input="The sky is blue.")
    assert len(one.embeddings) == 1 and len(one.embeddings[0]) == 576
    assert abs(norm(one.embeddings[0]) - 1) < 1e-5
    assert one.prompt_eval_count and one.prompt_eval_count > 3
    assert one.total_duration and one.load_duration is not None
    many = client.embed(model=MODEL, input=["The sky is blue.", "Cats sleep a lot."])
    assert len(many.embeddings) == 2
    assert max_diff(many.embeddings[0], one.embeddings[0]) < 1e-4
    assert max_diff(many.embeddings[0], many.embeddings[1]) > 1e-3


def test_a_vector_does_not_depend_on_its_batch(client: ollama.Client) -> None:
    a = "What is the capital of France?"
    others = ["Tell me a long story about a dragon who guards a library. " * 4, "hi",
              "Numbers: " + " ".join(str(i) for i in range(40))]  # fmt: skip
    alone = client.embed(model=MODEL, input=a).embeddings[0]
    batch = client.embed(model=MODEL, input=[others[0], a, others[1], others[2]]).embeddings
    assert max_diff(alone, batch[1]) < 1e-4
    assert max_diff(alone, client.embed(model=MODEL, input=[*others, a]).embeddings[3]) < 1e-4


def test_legacy_embeddings(client: ollama.Client) -> None:
    legacy = client.embeddings(model=MODEL, prompt="The sky is blue.").embedding
    current = client.embed(model=MODEL, input="The sky is blue.").embeddings[0]
    assert len(legacy) == 576 and max_diff(legacy, current) < 1e-6


def test_errors(client: ollama.Client, model_server: RunningServer) -> None:
    cases = [
        ({"model": MODEL, "input": []}, 400, "invalid input: the input list is empty"),
        ({"model": MODEL, "input": ["ok", 7]}, 400, "invalid input type"),
        ({"model": MODEL, "input": "x", "dimensions": -2}, 400, "dimensions must be"),
        ({"model": MODEL, "input": "x", "dimensions": 5000}, 400,
         "dimensions 5000 is more than the model's 576"),
        ({"model": "no-such-model", "input": "x"}, 404, "model 'no-such-model' not found"),
    ]  # fmt: skip
    for body, status, message in cases:
        r = httpx.post(f"{model_server.url}/api/embed", json=body, timeout=60)
        assert r.status_code == status and r.json()["error"].startswith(message), r.text
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=MODEL, input=[])
    assert err.value.status_code == 400


def test_truncate_false_names_both_counts(client: ollama.Client) -> None:
    long = "word " * 4200  # more than the 4096-token context
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=MODEL, input=long, truncate=False)
    assert err.value.status_code == 400
    assert err.value.error.startswith("the input length exceeds the context length: the input has ")
    assert err.value.error.endswith("tokens, the context holds 4096")


def test_generation_and_embeddings_share_one_runner(
    client: ollama.Client, model_server: RunningServer
) -> None:
    client.generate(model=MODEL, prompt="Hi", options={"num_predict": 2})
    client.embed(model=MODEL, input="Hi")
    ps = httpx.get(f"{model_server.url}/api/ps").json()["models"]
    assert [m["name"] for m in ps].count(MODEL) == 1


def test_openai_sdk_float_base64_and_dimensions(
    oai: openai.OpenAI, model_server: RunningServer
) -> None:
    texts = ["The sky is blue.", "Cats sleep a lot."]
    floats = oai.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1] and floats.model == MODEL
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    default = oai.embeddings.create(model=MODEL, input=texts)  # base64 on the wire
    for a, b in zip(floats.data, default.data, strict=True):
        assert abs(norm(a.embedding) - 1) < 1e-5 and max_diff(a.embedding, b.embedding) < 1e-6
    raw = httpx.post(f"{model_server.url}/v1/embeddings", timeout=60, json={
        "model": MODEL, "input": texts[0], "encoding_format": "base64"}).json()  # fmt: skip
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (576,) and max_diff(decoded.tolist(), floats.data[0].embedding) < 1e-6
    short = oai.embeddings.create(model=MODEL, input=texts[0], dimensions=64)
    prefix = np.asarray(floats.data[0].embedding[:64])
    assert len(short.data[0].embedding) == 64
    assert max_diff(short.data[0].embedding, (prefix / np.linalg.norm(prefix)).tolist()) < 1e-5
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model=MODEL, input=[])
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="no-such-model", input="x")


# -- an embedding-only model -----------------------------------------------------------------------


@pytest.fixture
def embed_server(server: RunningServer, tmp_path: Path) -> RunningServer:
    gguf = write_tiny_model(tmp_path / "embedder.gguf", pooling_type=1, context_length=256)
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {gguf}\n")
    server.cli("create", "embedder", "-f", str(modelfile), check=True)
    return server


def test_embedding_model_end_to_end(embed_server: RunningServer) -> None:
    with ollama.Client(host=embed_server.url) as c:
        check_embedding_model(c, embed_server)


def check_embedding_model(c: ollama.Client, embed_server: RunningServer) -> None:
    show = c.show("embedder")
    assert show.capabilities == ["embedding"]
    out = embed_server.cli("show", "embedder", check=True).stdout
    assert "Capabilities" in out and "embedding" in out
    r = c.embed(model="embedder", input=["hello world", "the cat"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 64
    assert all(abs(norm(v) - 1) < 1e-5 for v in r.embeddings)
    ps = httpx.get(f"{embed_server.url}/api/ps").json()["models"]
    assert [(m["name"], m["context_length"]) for m in ps] == [("embedder:latest", 256)]
    for call, kind in ((lambda: c.generate(model="embedder", prompt="hi"), "generate"),
                       (lambda: c.chat(model="embedder",
                                       messages=[{"role": "user", "content": "hi"}]), "chat")):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 400
        assert err.value.error == f'"embedder" does not support {kind}'
    long = "hello world " * 200
    with pytest.raises(ollama.ResponseError) as err:
        c.embed(model="embedder", input=long, truncate=False)
    assert err.value.status_code == 400 and "the context holds 256" in err.value.error
    cut = c.embed(model="embedder", input=long, truncate=True)
    assert cut.prompt_eval_count == 256


def test_cli_run_prints_the_vector(embed_server: RunningServer) -> None:
    result = embed_server.cli("run", "embedder", "hello", "world", check=True)
    vector = json.loads(result.stdout)
    assert isinstance(vector, list) and len(vector) == 64 and abs(norm(vector) - 1) < 1e-5
    api = httpx.post(f"{embed_server.url}/api/embed",
                     json={"model": "embedder", "input": "hello world"}).json()  # fmt: skip
    assert vector == api["embeddings"][0]
    short = json.loads(embed_server.cli("run", "embedder", "hi", "--dimensions", "8",
                                        check=True).stdout)  # fmt: skip
    assert len(short) == 8
    missing = embed_server.cli("run", "embedder")
    assert missing.returncode == 1
    assert "embedding models require input text" in missing.stderr
