"""Rerank end to end: the real CLI creates the models from safetensors folders, a real server
and real workers score, and the scores are the model's.

* all-MiniLM-L6-v2 (an embedding model, the real weights): ranks by cosine. A query about
  machine learning ranks the machine-learning passage first and an unrelated French passage
  last, and every score is the cosine of the numpy reference's vectors
  (``tests/hfgen.py``).
* a cross-encoder made in the test from all-MiniLM's weights and a random classification head
  (fixed seed), written as ``BertForSequenceClassification`` and converted by the same create
  path: its scores match a numpy forward pass of that head over ``[CLS] query [SEP] document
  [SEP]``, a document's score is the same alone as among others, and a document longer than
  the window is cut (its score then the reference's of the cut pair) or, with ``truncate:
  false``, refused naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import RunningServer, start_server, stop_server
from hfgen import (
    bert_forward,
    cross_encoder_folder,
    cross_encoder_score,
    folder_reference,
    mean_pooled,
    wordpiece,
)
from models import minilm_fixture  # noqa: F401  (the ``minilm`` fixture)

pytestmark = pytest.mark.slow

WINDOW = 256
QUERY = "How do neural networks learn from training data in machine learning?"
DOCUMENTS = [
    "Le marché du village ouvre chaque samedi matin sur la place de l'église.",
    "Bake the bread for forty minutes until the crust is golden brown.",
    "Machine learning models such as neural networks learn by adjusting their weights to "
    "reduce the error on training data, using gradient descent.",
    "The stock market closed higher today after a week of losses.",
]
LONG = "Gradient descent updates each weight a little at a time. " * 40


@pytest.fixture(scope="module")
def cross(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Path:
    """The cross-encoder's folder (``hfgen.cross_encoder_folder``)."""
    folder = tmp_path_factory.mktemp("rerank") / "cross-encoder"
    cross_encoder_folder(minilm, folder)
    return folder


@pytest.fixture(scope="module")
def srv(
    tmp_path_factory: pytest.TempPathFactory, minilm: Path, cross: Path
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("rerank-home")
    running = start_server(home)
    for name, source in (("all-minilm", minilm), ("minilm-reranker", cross)):
        modelfile = home / f"{name}.Modelfile"
        modelfile.write_text(f"FROM {source}\n")
        running.cli("create", name, "-f", str(modelfile), check=True, timeout=300)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def http(srv: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=300) as client:
        yield client


Reference = tuple[dict[str, np.ndarray], dict[str, Any], dict[str, int]]


@pytest.fixture(scope="module")
def minilm_ref(minilm: Path) -> Reference:
    return folder_reference(minilm)


@pytest.fixture(scope="module")
def cross_ref(cross: Path) -> Reference:
    return folder_reference(cross)


def pair_ids(query: str, document: str, vocab: dict[str, int], window: int = 0) -> list[int]:
    """``[CLS] query [SEP] document [SEP]``, the document cut to fit ``window``."""
    head = wordpiece(query, vocab)
    doc = wordpiece(document, vocab)[1:-1]
    if window:
        doc = doc[: window - len(head) - 1]
    return head + doc + [vocab["[SEP]"]]


def rerank(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/api/rerank", json=body)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def test_an_embedding_model_ranks_by_cosine(http: httpx.Client, minilm_ref: Reference) -> None:
    body = rerank(http, model="all-minilm", query=QUERY, documents=DOCUMENTS,
                  return_documents=True)  # fmt: skip
    assert body["method"] == "cosine"
    order = [item["index"] for item in body["results"]]
    assert order[0] == 2 and order[-1] == 0  # machine learning first, the French market last
    assert body["results"][0]["document"] == {"text": DOCUMENTS[2]}
    weights, config, vocab = minilm_ref
    q = mean_pooled(bert_forward(wordpiece(QUERY, vocab), weights, config))
    for item in body["results"]:
        d = mean_pooled(bert_forward(wordpiece(DOCUMENTS[item["index"]], vocab), weights, config))
        assert item["relevance_score"] == pytest.approx(float(q @ d), abs=2e-3)
    tokens = len(wordpiece(QUERY, vocab)) + sum(len(wordpiece(d, vocab)) for d in DOCUMENTS)
    assert body["usage"]["total_tokens"] == tokens


def test_a_cross_encoder_scores_as_its_head_does(
    http: httpx.Client, cross_ref: Reference
) -> None:
    weights, config, vocab = cross_ref
    expected = [cross_encoder_score(pair_ids(QUERY, d, vocab), weights, config)
                for d in DOCUMENTS]  # fmt: skip
    for route in ("/api/rerank", "/v1/rerank", "/rerank"):
        r = http.post(route, json={"model": "minilm-reranker", "query": QUERY,
                                   "documents": DOCUMENTS})  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["method"] == "cross-encoder"
        assert [x["index"] for x in body["results"]] == list(np.argsort(expected)[::-1])
        for item in body["results"]:
            assert item["relevance_score"] == pytest.approx(expected[item["index"]], abs=2e-3)
        tokens = sum(len(pair_ids(QUERY, d, vocab)) for d in DOCUMENTS)
        assert body["usage"]["total_tokens"] == tokens
    show = http.post("/api/show", json={"model": "minilm-reranker"}).json()
    assert show["capabilities"] == ["rerank"]
    tags = {m["name"]: m for m in http.get("/api/tags").json()["models"]}
    assert tags["minilm-reranker:latest"]["capabilities"] == ["rerank"]


def test_a_score_does_not_depend_on_the_other_documents(http: httpx.Client) -> None:
    """The pairs of one pass never attend to each other (``runner/embedder.py``). Not to the
    bit: llama.cpp's CPU matrix kernels for F32/F16 weights accumulate in another order for
    a pass of one pair than for a pass of several (measured: at most 7e-5 here, as for
    all-MiniLM's embeddings), while a pair that saw another would move by tenths."""
    together = rerank(http, model="minilm-reranker", query=QUERY, documents=DOCUMENTS)
    scores = {x["index"]: x["relevance_score"] for x in together["results"]}
    for i, doc in enumerate(DOCUMENTS):
        alone = rerank(http, model="minilm-reranker", query=QUERY, documents=[doc])
        assert alone["results"][0]["relevance_score"] == pytest.approx(scores[i], abs=2e-4)
        reversed_ = rerank(http, model="minilm-reranker", query=QUERY,
                           documents=[doc, *DOCUMENTS[::-1]])  # fmt: skip
        first = next(x for x in reversed_["results"] if x["index"] == 0)
        assert first["relevance_score"] == pytest.approx(scores[i], abs=2e-4)


def test_a_long_document_is_cut_or_refused_by_name(
    http: httpx.Client, cross_ref: Reference
) -> None:
    weights, config, vocab = cross_ref
    ids = pair_ids(QUERY, LONG, vocab, WINDOW)
    assert len(ids) == WINDOW
    body = rerank(http, model="minilm-reranker", query=QUERY, documents=["short", LONG])
    long_score = next(x for x in body["results"] if x["index"] == 1)["relevance_score"]
    assert long_score == pytest.approx(cross_encoder_score(ids, weights, config), abs=2e-3)
    r = http.post("/api/rerank", json={"model": "minilm-reranker", "query": QUERY,
                                       "documents": ["short", LONG], "truncate": False})
    assert r.status_code == 400
    assert "document 1 has" in r.json()["error"] and "the context holds 256" in r.json()["error"]
    r = http.post("/api/rerank", json={"model": "all-minilm", "query": QUERY,
                                       "documents": ["short", LONG], "truncate": False})
    assert r.status_code == 400 and "document 1 has" in r.json()["error"]


def test_bad_requests_through_the_real_server(http: httpx.Client) -> None:
    def error(route: str, **body: Any) -> str:
        r = http.post(route, json={"model": "minilm-reranker", "query": QUERY, **body})
        assert r.status_code == 400, r.text
        detail = r.json()["error"]
        return detail if isinstance(detail, str) else str(detail["message"])

    assert "documents is empty" in error("/api/rerank", documents=[])
    assert "top_n must be at least 1" in error("/v1/rerank", documents=["a"], top_n=0)
    huge = "word " * 200_000  # a megabyte: refused by its size before any tokenizing
    r = http.post("/api/rerank", json={"model": "minilm-reranker", "query": huge,
                                       "documents": ["a"]})
    assert r.status_code == 400 and "the query is too long" in r.json()["error"]
    assert "is a reranker" in http.post(
        "/api/embed", json={"model": "minilm-reranker", "input": "x"}
    ).json()["error"]
