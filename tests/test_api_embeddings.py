"""Embeddings in-process: the vector rules, the three endpoints, and the official clients.

The server runs with :class:`fake_runner.FakeRunner`, whose raw vector of an input
is ``fake_vector`` of its byte tokens (far from norm 1), so every expected vector here is
computed independently with numpy. Two tiny GGUFs are created through ``/api/create``: a
generation model ``gen`` and an embedding model ``embedder`` (it has a pooling type).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ollama
import openai
import pytest
from fastapi.testclient import TestClient

from fake_runner import BOS_TOKEN, FakeRunnerFactory, fake_vector
from ggufgen import write_tiny_model
from inprocess import serving
from pollama.config import Settings
from pollama.errors import InternalError, InvalidRequest
from pollama.gguf import read_gguf
from pollama.inference import vectors
from pollama.inference.embeddings import legacy_raw
from pollama.server.vectors_json import dumps


def expected(text: str, dims: int | None = None, num_ctx: int | None = None) -> np.ndarray:
    tokens = [BOS_TOKEN, *text.encode()][:num_ctx]
    raw = np.array(fake_vector(tokens), dtype=np.float32).astype(np.float64)
    if dims:
        raw = raw / np.linalg.norm(raw)
        raw = raw[:dims]
    return raw / np.linalg.norm(raw)


def close(a: Any, b: Any, tol: float = 1e-6) -> bool:
    return bool(np.allclose(np.asarray(a, dtype=np.float64), b, atol=tol, rtol=0))


@pytest.fixture
def factory() -> FakeRunnerFactory:
    return FakeRunnerFactory()


@pytest.fixture
def api(settings: Settings, tmp_path: Path, factory: FakeRunnerFactory) -> Iterator[TestClient]:
    models = {write_tiny_model(tmp_path / f"{name}.gguf", pooling_type=pooling): {name: {}}
              for name, pooling in (("gen", None), ("embedder", 1))}
    with serving(settings, factory, models) as client:
        yield client


# -- vector rules (inference/vectors.py) ------------------------------------------------------


def test_finish_normalizes_and_shortens() -> None:
    v = np.array([3.0, 4.0, 12.0], dtype=np.float32)
    assert close(vectors.finish(v), [3 / 13, 4 / 13, 12 / 13])
    assert close(vectors.finish(v, dimensions=2), [0.6, 0.8])
    assert close(vectors.finish(v, dimensions=3), [3 / 13, 4 / 13, 12 / 13])
    assert close(vectors.finish(v, normalize=False), [3, 4, 12])
    assert vectors.finish(np.zeros(4, dtype=np.float32)).tolist() == [0.0] * 4  # no 0/0
    with pytest.raises(InvalidRequest, match="dimensions 4 is more than the model's 3"):
        vectors.finish(v, dimensions=4)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(InternalError, match="^embedding contains NaN or Inf values$"):
            vectors.finish(np.array([1.0, bad], dtype=np.float32))


def test_float32_values_are_written_as_go_writes_them() -> None:
    v = np.array([0.1, 1 / 3, -2.5e-8, 7.0], dtype=np.float32)
    text = dumps({"embeddings": [v]})
    assert text == b'{"embeddings":[[0.1,0.33333334,-2.5e-8,7.0]]}'  # Go's json spelling
    out = json.loads(text)["embeddings"][0]
    assert np.array(out, dtype=np.float32).tobytes() == v.tobytes()  # exactly the same floats
    assert vectors.checked_float(float(v[1])) == 0.33333334
    wide = vectors.to_float64_list(v)
    assert wide[0] == float(np.float32(0.1)) != 0.1  # widened, as Go's float64(v)
    raw = base64.b64decode(vectors.to_base64(v))
    assert struct.unpack("<4f", raw) == tuple(float(x) for x in v)


def test_legacy_raw_follows_ollamas_rule(tmp_path: Path) -> None:
    def info(arch: str, pooling: int | None, **kv: Any) -> Any:
        extra = {f"{arch}.{k}": v for k, v in kv.items()}
        path = write_tiny_model(tmp_path / f"{arch}{pooling}{kv}.gguf", arch=arch,
                                pooling_type=pooling, extra_kv=extra)  # fmt: skip
        return read_gguf(path)

    assert not legacy_raw(info("llama", None))
    assert not legacy_raw(info("llama", 1))
    assert legacy_raw(info("nomic-bert", 1))
    assert not legacy_raw(info("nomic-bert", 1, normalize_embeddings=True))
    assert legacy_raw(info("bert", 1))  # a "llama" tokenizer on a bert model
    assert legacy_raw(info("gemma3", None)) is False


# -- /api/embed ----------------------------------------------------------------------------------


def test_embed_string_and_list(api: TestClient) -> None:
    r = api.post("/api/embed", json={"model": "gen", "input": "hello"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "embeddings", "total_duration", "load_duration",
                         "prompt_eval_count"}  # fmt: skip
    assert body["model"] == "gen" and len(body["embeddings"]) == 1
    assert close(body["embeddings"][0], expected("hello"))
    assert body["prompt_eval_count"] == 6 and body["total_duration"] >= body["load_duration"] > 0
    texts = ["one", "two words", "three words here"]
    body = api.post("/api/embed", json={"model": "gen", "input": texts}).json()
    assert [close(v, expected(t)) for v, t in zip(body["embeddings"], texts, strict=True)] == [
        True, True, True
    ]
    for vector in body["embeddings"]:
        assert abs(math.fsum(x * x for x in vector) - 1) < 1e-6
    assert body["prompt_eval_count"] == sum(len(t) + 1 for t in texts)


def test_embed_dimensions(api: TestClient) -> None:
    body = api.post("/api/embed", json={"model": "gen", "input": "x", "dimensions": 3}).json()
    assert close(body["embeddings"][0], expected("x", dims=3))
    full = api.post("/api/embed", json={"model": "gen", "input": "x", "dimensions": 0}).json()
    assert len(full["embeddings"][0]) == 8  # 0 means the full length, as Go's omitempty
    for bad, message in ((-1, "dimensions must be a positive integer, not -1"),
                         (9, "dimensions 9 is more than the model's 8 embedding dimensions"),
                         ("many", "dimensions")):  # fmt: skip
        r = api.post("/api/embed", json={"model": "gen", "input": "x", "dimensions": bad})
        assert r.status_code == 400 and message in r.json()["error"], r.text


def test_embed_bad_inputs_are_400(api: TestClient, factory: FakeRunnerFactory) -> None:
    cases = [([], "invalid input: the input list is empty, nothing to embed"),
             (["ok", 3], "invalid input type"), (5, "invalid input type"),
             ({"text": "x"}, "invalid input type"), ([["nested"]], "invalid input type")]
    for value, message in cases:
        r = api.post("/api/embed", json={"model": "gen", "input": value})
        assert (r.status_code, r.json()) == (400, {"error": message})
    assert factory.loads() == 0  # refused before anything loaded


def test_embed_missing_model_is_404(api: TestClient) -> None:
    r = api.post("/api/embed", json={"model": "nope", "input": "x"})
    assert (r.status_code, r.json()) == (404, {"error": "model 'nope' not found"})
    r = api.post("/api/embed", json={"input": "x"})
    assert (r.status_code, r.json()) == (404, {"error": "model '' not found"})
    r = api.post("/api/embeddings", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert r.json() == {"error": 'model "nope" not found, try pulling it first'}
    r = api.post("/api/embeddings", json={"prompt": "x"})
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})


def test_embed_truncate(api: TestClient) -> None:
    long = "a" * 40
    opts = {"num_ctx": 16}
    r = api.post("/api/embed", json={"model": "gen", "input": long, "truncate": False,
                                     "options": opts})  # fmt: skip
    assert r.status_code == 400
    assert r.json()["error"] == ("the input length exceeds the context length: the input has "
                                 "41 tokens, the context holds 16")  # fmt: skip
    body = api.post("/api/embed", json={"model": "gen", "input": long, "options": opts}).json()
    assert body["prompt_eval_count"] == 16
    assert close(body["embeddings"][0], expected(long, num_ctx=16))


def test_embed_without_input_loads_and_keep_alive_zero_unloads(
    api: TestClient, factory: FakeRunnerFactory
) -> None:
    for body in ({"model": "embedder"}, {"model": "embedder", "input": ""}):
        r = api.post("/api/embed", json=body)
        assert r.status_code == 200 and r.json() == {"model": "embedder", "embeddings": []}
    assert factory.loads() == 1 and [m["name"] for m in api.get("/api/ps").json()["models"]] == [
        "embedder:latest"
    ]
    r = api.post("/api/embed", json={"model": "embedder", "keep_alive": 0})
    assert r.json() == {"model": "embedder", "embeddings": []}
    assert api.get("/api/ps").json()["models"] == [] and factory.loads() == 1
    r = api.post("/api/embeddings", json={"model": "embedder", "prompt": ""})
    assert (r.status_code, r.json()) == (200, {"embedding": []})
    assert factory.loads() == 2


def test_nan_from_the_model_is_ollamas_error(api: TestClient, factory: FakeRunnerFactory) -> None:
    factory.defaults["embedding"] = lambda tokens: [1.0, math.nan]
    r = api.post("/api/embed", json={"model": "gen", "input": "x"})
    assert (r.status_code, r.json()) == (500, {"error": "embedding contains NaN or Inf values"})


def test_embedding_models_load_alone_and_refuse_generation(
    api: TestClient, factory: FakeRunnerFactory
) -> None:
    assert api.post("/api/show", json={"model": "embedder"}).json()["capabilities"] == [
        "embedding"
    ]
    assert api.post("/api/embed", json={"model": "embedder", "input": "x"}).status_code == 200
    spec = factory.runners[-1].spec
    assert spec.embedding and spec.num_parallel == 1
    for path, body, kind in (
        ("/api/generate", {"model": "embedder", "prompt": "hi"}, "generate"),
        ("/api/chat", {"model": "embedder", "messages": [{"role": "user", "content": "hi"}]},
         "chat"),
    ):  # fmt: skip
        r = api.post(path, json=body)
        assert (r.status_code, r.json()) == (400, {"error": f'"embedder" does not support {kind}'})
    r = api.post("/v1/chat/completions",
                 json={"model": "embedder", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_generation_model_shares_its_runner_with_embeddings(
    api: TestClient, factory: FakeRunnerFactory
) -> None:
    r = api.post("/api/generate", json={"model": "gen", "prompt": "hi", "stream": False})
    assert r.status_code == 200
    assert api.post("/api/embed", json={"model": "gen", "input": "x"}).status_code == 200
    assert factory.loads() == 1  # the same LoadSpec: no reload
    assert not factory.runners[0].spec.embedding


def test_legacy_embeddings_endpoint(api: TestClient) -> None:
    body = api.post("/api/embeddings", json={"model": "gen", "prompt": "hello"}).json()
    assert list(body) == ["embedding"] and close(body["embedding"], expected("hello"))


def test_embeddings_are_reported_to_metrics(api: TestClient) -> None:
    api.post("/api/embed", json={"model": "gen", "input": ["abc", "de"]})
    text = api.get("/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("pollama_prompt_tokens_total{"))
    assert 'model="gen:latest"' in line and line.endswith(" 7.0")


# -- /v1/embeddings --------------------------------------------------------------------------------


def test_v1_embeddings_float_and_base64(api: TestClient) -> None:
    body = api.post("/v1/embeddings", json={"model": "gen", "input": ["a", "bc"],
                                            "encoding_format": "float"}).json()  # fmt: skip
    assert body["object"] == "list" and body["model"] == "gen"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    assert close(body["data"][1]["embedding"], expected("bc"))
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    b64 = api.post("/v1/embeddings", json={"model": "gen", "input": "bc",
                                           "encoding_format": "base64"}).json()  # fmt: skip
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = np.frombuffer(raw, dtype="<f4")
    assert decoded.tolist() == np.array(body["data"][1]["embedding"], dtype=np.float32).tolist()


def test_v1_embeddings_errors_use_openais_shape(api: TestClient) -> None:
    cases = [
        ({"model": "gen", "input": []}, 400, "invalid input: the input list is empty"),
        ({"model": "gen"}, 400, "invalid input"),
        ({"model": "gen", "input": [1, 2]}, 400, "invalid input type"),
        ({"model": "gen", "input": "x", "encoding_format": "hex"}, 400,
         "Invalid value for 'encoding_format' = hex. Supported values: ['float', 'base64']."),
        ({"model": "gen", "input": "x", "dimensions": -3}, 400, "dimensions must be"),
        ({"model": "nope", "input": "x"}, 404, "model 'nope' not found"),
    ]  # fmt: skip
    for body, status, message in cases:
        r = api.post("/v1/embeddings", json=body)
        err = r.json()["error"]
        assert r.status_code == status and err["message"].startswith(message), r.text
        assert err["type"] == ("invalid_request_error" if status == 400 else "not_found_error")


# -- the official clients --------------------------------------------------------------------------


def test_ollama_client_embed_and_embeddings(native: ollama.Client) -> None:
    one = native.embed(model="gen", input="hello")
    assert len(one.embeddings) == 1 and close(one.embeddings[0], expected("hello"))
    many = native.embed(model="gen", input=["a", "b"], dimensions=4, truncate=True)
    assert close(many.embeddings[1], expected("b", dims=4))
    legacy = native.embeddings(model="gen", prompt="hello")
    assert close(legacy.embedding, expected("hello"))


def test_openai_sdk_embeddings(oai: openai.OpenAI) -> None:
    as_floats = oai.embeddings.create(model="gen", input=["hello", "x"], encoding_format="float")
    default = oai.embeddings.create(model="gen", input=["hello", "x"])  # base64 on the wire
    for a, b, text in zip(as_floats.data, default.data, ["hello", "x"], strict=True):
        assert close(a.embedding, expected(text))
        same = np.array(a.embedding, dtype=np.float32) == np.array(b.embedding, dtype=np.float32)
        assert same.all()  # the same float32 values, whichever encoding carried them
    short = oai.embeddings.create(model="gen", input="hello", dimensions=2)
    assert close(short.data[0].embedding, expected("hello", dims=2))
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == 8
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model="gen", input=[])
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="nope", input="x")


def test_embedding_routes_need_an_inference_key() -> None:
    from pollama.keys import Permission
    from pollama.server.security import permission_for

    for path in ("/api/embed", "/api/embeddings", "/v1/embeddings"):
        assert permission_for("POST", path) is Permission.INFERENCE
