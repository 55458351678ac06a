"""Structured output end to end: ``format`` and ``response_format`` through the official
``ollama`` client and the ``openai`` SDK, a real server and the real SmolLM2 model.

The 135M model is a poor JSON writer at temperature 1.0 (it writes prose inside keys), which
is the point: every output, on every seed, must parse and validate, because the worker's
grammar never lets anything else through and closes the JSON when ``num_predict`` runs out.
Requests of one test run four at a time (the server has four slots), so several
constrained rows share each decode batch.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jsonschema
import ollama
import openai
import pytest
from fastapi.testclient import TestClient

from conftest import MODEL, RunningServer
from ggufgen import write_tiny_model

pytestmark = pytest.mark.slow

SEEDS = range(5)
NUM_PREDICT = 128
# The prompt and schema the benchmark (bench/structured_bench.py) measures, too.
_CAT_CASE = json.loads((Path(__file__).parent / "golden" / "structured" / "cat.json").read_text())
PROMPT: str = _CAT_CASE["prompt"]
CAT: dict[str, Any] = _CAT_CASE["schema"]
ANY_OBJECT = {"type": "object"}
T = TypeVar("T")


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with no other properties allowed wherever it lists some: what the worker
    enforces when a schema says nothing of ``additionalProperties`` (llama.cpp's and so
    Ollama's reading)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)

    walk(schema)
    return schema


def check(text: str, schema: dict[str, Any]) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"not JSON ({exc}): {text!r}") from None
    jsonschema.validate(value, closed(schema))
    return value


def each_seed(run: Callable[[int], T]) -> list[T]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(run, SEEDS))


@pytest.fixture
def client(model_server: RunningServer) -> Iterator[ollama.Client]:
    c = ollama.Client(host=model_server.url, timeout=300)
    yield c
    c.close()


@pytest.fixture
def oai(model_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{model_server.url}/v1", api_key="unused",
                       timeout=300) as client:
        yield client


def options(seed: int, **extra: Any) -> dict[str, Any]:
    return {"temperature": 1.0, "seed": seed, "num_predict": NUM_PREDICT, **extra}


# -- the native API through the ollama client ----------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("fmt", ["json", CAT], ids=["json", "schema"])
def test_generate_output_always_parses_and_validates(
    client: ollama.Client, fmt: Any, stream: bool
) -> None:
    schema = ANY_OBJECT if fmt == "json" else fmt

    def run(seed: int) -> tuple[str, str, int]:
        if stream:
            parts = list(client.generate(model=MODEL, prompt=PROMPT, format=fmt,
                                         options=options(seed), stream=True))
            last = parts[-1]
            assert last.done and all(not p.done for p in parts[:-1])
            return "".join(p.response for p in parts), str(last.done_reason), last.eval_count or 0
        r = client.generate(model=MODEL, prompt=PROMPT, format=fmt, options=options(seed))
        return r.response, str(r.done_reason), r.eval_count or 0

    for text, reason, count in each_seed(run):
        check(text, schema)
        assert reason in ("stop", "length") and 0 < count <= NUM_PREDICT


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("fmt", ["json", CAT], ids=["json", "schema"])
def test_chat_output_always_parses_and_validates(
    client: ollama.Client, fmt: Any, stream: bool
) -> None:
    schema = ANY_OBJECT if fmt == "json" else fmt
    messages = [{"role": "user", "content": PROMPT}]

    def run(seed: int) -> str:
        if stream:
            parts = list(client.chat(model=MODEL, messages=messages, format=fmt,
                                     options=options(seed), stream=True))
            assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
            return "".join(p.message.content or "" for p in parts)
        r = client.chat(model=MODEL, messages=messages, format=fmt, options=options(seed))
        assert r.done_reason in ("stop", "length") and r.message.role == "assistant"
        return r.message.content or ""

    values = [check(text, schema) for text in each_seed(run)]
    if fmt is CAT:  # the schema's enum and bounds hold, not just the JSON syntax
        assert all(v["color"] in CAT["properties"]["color"]["enum"] for v in values)
        assert all(1 <= len(v["tags"]) <= 4 and 0 <= v["age"] <= 40 for v in values)


def test_greedy_json_is_the_same_streamed_or_not(client: ollama.Client) -> None:
    opts = {"temperature": 0, "num_predict": NUM_PREDICT}
    whole = client.generate(model=MODEL, prompt=PROMPT, format=CAT, options=opts)
    parts = list(client.generate(model=MODEL, prompt=PROMPT, format=CAT, options=opts,
                                 stream=True))
    assert "".join(p.response for p in parts) == whole.response
    check(whole.response, CAT)
    free = client.generate(model=MODEL, prompt=PROMPT, options=opts).response
    assert free != whole.response  # the constraint did change what the model wrote


def test_a_short_budget_still_closes_the_json(client: ollama.Client) -> None:
    """The model would ramble far past ``num_predict``: the constraint closes the JSON in
    the last tokens, and the response says ``length``."""
    prompt = "Write a very long story about a dragon, as JSON."

    def run(seed: int) -> ollama.GenerateResponse:
        fmt = "json" if seed % 2 else CAT
        budget = 24 if fmt == "json" else 64
        return client.generate(model=MODEL, prompt=prompt, format=fmt,
                               options=options(seed, num_predict=budget))

    for seed, r in zip(SEEDS, each_seed(run), strict=True):
        check(r.response, ANY_OBJECT if seed % 2 else CAT)
        assert r.eval_count is not None and r.eval_count <= (24 if seed % 2 else 64)
        assert r.done_reason in ("stop", "length")


def test_unsupported_schema_is_a_400_naming_the_problem(
    client: ollama.Client, model_server: RunningServer
) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "string"}}, "if": {"required": ["a"]},
           "then": {"required": ["b"]}}
    for call in (
        lambda: client.generate(model=MODEL, prompt="x", format=bad),
        lambda: list(client.generate(model=MODEL, prompt="x", format=bad, stream=True)),
        lambda: client.chat(model=MODEL, messages=[{"role": "user", "content": "x"}],
                            format=bad),
    ):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 400
        assert "unsupported JSON schema" in caught.value.error and '"if"' in caught.value.error
    r = httpx.post(f"{model_server.url}/api/chat", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "format": {"type": "array", "uniqueItems": True},
    })
    assert r.status_code == 400 and "uniqueItems" in r.json()["error"]


# -- the OpenAI-compatible endpoint through the openai SDK ---------------------------------


CAT_FORMAT = {"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("response_format", [{"type": "json_object"}, CAT_FORMAT],
                         ids=["json_object", "json_schema"])
def test_openai_response_format_always_parses_and_validates(
    oai: openai.OpenAI, response_format: dict[str, Any], stream: bool
) -> None:
    schema = CAT if response_format is CAT_FORMAT else ANY_OBJECT
    messages = [{"role": "user", "content": PROMPT}]

    def run(seed: int) -> tuple[str, str]:
        if stream:
            chunks = list(oai.chat.completions.create(
                model=MODEL, messages=messages, response_format=response_format,  # type: ignore[arg-type]
                temperature=1.0, seed=seed, max_tokens=NUM_PREDICT, stream=True,
            ))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, str(chunks[-1].choices[0].finish_reason)
        r = oai.chat.completions.create(
            model=MODEL, messages=messages, response_format=response_format,  # type: ignore[arg-type]
            temperature=1.0, seed=seed, max_tokens=NUM_PREDICT,
        )
        return r.choices[0].message.content or "", str(r.choices[0].finish_reason)

    for text, finish in each_seed(run):
        check(text, schema)
        assert finish in ("stop", "length")


def test_openai_unsupported_schema_is_a_400(oai: openai.OpenAI) -> None:
    fmt = {"type": "json_schema",
           "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            result = oai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}],
                response_format=fmt, stream=stream,  # type: ignore[arg-type]
            )
            if stream:
                list(result)  # type: ignore[arg-type]
        assert caught.value.status_code == 400 and "uniqueItems" in str(caught.value)


# -- another vocabulary ---------------------------------------------------------------------


def test_a_byte_level_vocabulary_on_a_real_worker(api: TestClient, tmp_path: Path) -> None:
    """A random-weight model whose vocabulary is mostly single bytes (SentencePiece with
    byte fallback, ``tests/ggufgen.py``): every output is JSON written a character at a
    time by a model with no idea of JSON, so closing within ``num_predict`` needs several
    times more tokens than with SmolLM2's vocabulary, and must still fit."""
    gguf = write_tiny_model(tmp_path / "bytes.gguf", context_length=512)
    data = gguf.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert api.post(f"/api/blobs/{digest}", content=data).status_code == 201
    r = api.post("/api/create", json={"model": "bytes", "files": {"b.gguf": digest},
                                      "stream": False})
    assert r.status_code == 200, r.text
    orders = {"type": "object", "required": ["items"], "properties": {"items": {
        "type": "array", "minItems": 3, "items": {
            "type": "object", "required": ["id", "label"],
            "properties": {"id": {"type": "integer"}, "label": {"type": "string"}}}}}}
    closed_early = 0
    for seed in range(6):
        fmt = CAT if seed % 2 else orders
        r = api.post("/api/generate", json={
            "model": "bytes", "prompt": "A cat:", "raw": True, "format": fmt, "stream": False,
            "options": {"temperature": 1.5, "top_k": 400, "seed": seed, "num_predict": 160},
        })
        assert r.status_code == 200, r.text
        body = r.json()
        check(body["response"], fmt)
        assert body["eval_count"] <= 160
        closed_early += body["done_reason"] == "length"
    assert closed_early >= 3  # the random model rambled and the constraint closed for it
