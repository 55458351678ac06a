"""Rerank in-process: the three routes, the request shapes (Jina/Cohere, TEI), sorting and
``top_n``, the two methods, and every bad input.

The server runs with :class:`fake_runner.FakeRunner`: its cross-encoder score of a pair is
the first value of ``fake_vector`` of ``fake_pair_tokens``, and an embedding model's vectors
are ``fake_vector`` of the text's byte tokens, so every expected score here is computed
independently. Three tiny GGUFs are created: ``gen`` (a generation model), ``embedder``
(mean pooling) and ``ranker`` (pooling type rank: a cross-encoder).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fake_runner import BOS_TOKEN, FakeRunnerFactory, fake_pair_tokens, fake_vector
from ggufgen import write_tiny_model
from inprocess import serving
from pollama.config import Settings
from pollama.inference.rerank import MAX_DOCUMENTS

DOCS = ["the cat sat", "dogs bark loudly", "a quiet evening", "cats purr"]
QUERY = "cats"
ROUTES = ("/api/rerank", "/v1/rerank", "/rerank")


def cross_score(query: str, doc: str) -> float:
    return float(np.float32(fake_vector(fake_pair_tokens(query, doc))[0]))


def cosine_score(query: str, doc: str) -> float:
    q, d = (np.asarray(fake_vector([BOS_TOKEN, *t.encode()]), dtype=np.float64)
            for t in (query, doc))  # fmt: skip
    return float(q @ d / np.linalg.norm(q) / np.linalg.norm(d))


@pytest.fixture
def factory() -> FakeRunnerFactory:
    return FakeRunnerFactory()


@pytest.fixture
def api(settings: Settings, tmp_path: Path, factory: FakeRunnerFactory) -> Iterator[TestClient]:
    models = {write_tiny_model(tmp_path / f"{name}.gguf", pooling_type=pooling): {name: {}}
              for name, pooling in (("gen", None), ("embedder", 1), ("ranker", 4))}
    with serving(settings, factory, models) as client:
        yield client


def rerank(api: TestClient, route: str = "/api/rerank", **body: Any) -> Any:
    return api.post(route, json={"model": "ranker", "query": QUERY, "documents": DOCS, **body})


def test_a_cross_encoder_scores_each_pair_and_sorts(api: TestClient) -> None:
    expected = [cross_score(QUERY, d) for d in DOCS]
    order = sorted(range(len(DOCS)), key=lambda i: -expected[i])
    for route in ROUTES:
        r = rerank(api, route)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "ranker" and body["method"] == "cross-encoder"
        assert [x["index"] for x in body["results"]] == order
        for item in body["results"]:
            want = expected[item["index"]]
            assert item["relevance_score"] == pytest.approx(want, rel=1e-6, abs=1e-6)
            assert "document" not in item
        tokens = sum(len(fake_pair_tokens(QUERY, d)) for d in DOCS)
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        native = {"total_duration", "load_duration", "prompt_eval_count"}
        assert native <= set(body) if route == "/api/rerank" else not native & set(body)


def test_an_embedding_model_ranks_by_cosine(api: TestClient) -> None:
    body = rerank(api, model="embedder").json()
    assert body["method"] == "cosine"
    expected = {i: cosine_score(QUERY, d) for i, d in enumerate(DOCS)}
    scores = [x["relevance_score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True)
    for item in body["results"]:
        assert item["relevance_score"] == pytest.approx(expected[item["index"]], rel=1e-6, abs=1e-6)
    assert body["usage"]["total_tokens"] == len(QUERY) + 1 + sum(len(d) + 1 for d in DOCS)


def test_top_n_and_return_documents(api: TestClient) -> None:
    full = rerank(api).json()["results"]
    body = rerank(api, top_n=2, return_documents=True).json()
    assert [x["index"] for x in body["results"]] == [x["index"] for x in full[:2]]
    for item in body["results"]:
        assert item["document"] == {"text": DOCS[item["index"]]}
    assert len(rerank(api, top_n=99).json()["results"]) == len(DOCS)


def test_cohere_document_objects_are_texts(api: TestClient) -> None:
    objects = [{"text": d} for d in DOCS]
    assert rerank(api, documents=objects).json()["results"] == rerank(api).json()["results"]


def test_tei_requests_get_teis_list(api: TestClient) -> None:
    r = api.post("/rerank", json={"model": "ranker", "query": QUERY, "texts": DOCS,
                                  "return_text": True})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list) and len(body) == len(DOCS)
    assert set(body[0]) == {"index", "score", "text"}
    assert body[0]["text"] == DOCS[body[0]["index"]]
    assert [x["index"] for x in body] == [x["index"] for x in rerank(api).json()["results"]]


def test_equal_scores_keep_the_documents_order(api: TestClient) -> None:
    body = rerank(api, documents=["same", "other", "same", "same"]).json()
    same = [x["index"] for x in body["results"] if x["index"] != 1]
    assert same == [0, 2, 3]


def test_a_generation_model_cannot_rerank_and_is_told_which_can(api: TestClient) -> None:
    for route in ROUTES:
        r = rerank(api, route, model="gen")
        assert r.status_code == 400
        message = r.json()["error"] if route == "/api/rerank" else r.json()["error"]["message"]
        assert "model 'gen' cannot rerank: it is a generation model" in message
        assert "ranker" in message and "embedder" in message


def test_a_cross_encoder_has_no_embeddings(api: TestClient) -> None:
    r = api.post("/api/embed", json={"model": "ranker", "input": "x"})
    assert r.status_code == 400 and "is a reranker" in r.json()["error"]
    show = api.post("/api/show", json={"model": "ranker"}).json()
    assert show["capabilities"] == ["rerank"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"documents": []}, 400, "documents is empty"),
        ({"documents": None}, 400, "documents is required"),
        ({"documents": "one text"}, 400, "documents must be a list"),
        ({"documents": ["ok", 3]}, 400, "document 1 must be a string"),
        ({"top_n": 0}, 400, "top_n must be at least 1, not 0"),
        ({"top_n": -2}, 400, "top_n must be at least 1"),
        ({"top_n": "3"}, 400, "top_n"),
        ({"query": ""}, 400, "query is empty"),
        ({"query": 7}, 400, "query must be a string"),
        ({"return_documents": "yes"}, 400, "return_documents"),
        ({"documents": ["x"] * (MAX_DOCUMENTS + 1)}, 400, "too many documents"),
        ({"model": "nope"}, 404, "model 'nope' not found"),
    ],
)
def test_bad_input(api: TestClient, body: dict[str, Any], status: int, words: str) -> None:
    r = rerank(api, **body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    r = rerank(api, "/v1/rerank", **body)
    assert r.status_code == status and words in r.json()["error"]["message"]


def test_an_empty_body_and_bad_json_are_400(api: TestClient) -> None:
    assert api.post("/api/rerank", content=b"").status_code == 400
    assert api.post("/rerank", content=b"{not json").status_code == 400


def test_a_long_document_is_truncated_or_refused(api: TestClient, settings: Settings) -> None:
    long = "word " * 5000  # over the fake's num_ctx (the model's 2048 default)
    assert rerank(api, documents=["short", long]).status_code == 200
    r = rerank(api, documents=["short", long], truncate=False)
    assert r.status_code == 400 and "exceeds the context length" in r.json()["error"]


def test_rerank_routes_need_an_inference_key() -> None:
    from pollama.keys import Permission
    from pollama.server.security import permission_for

    for path in ROUTES:
        assert permission_for("POST", path) is Permission.INFERENCE
