"""Context shift (the request's ``shift``, docs/ollama-behaviour.md#context-shift).

End to end: a real server with one sequence (``OLLAMA_NUM_PARALLEL=1``, so every request
meets the slot the one before left) and the real SmolLM2 model, in a window of 128 tokens
(``num_ctx`` 128 in every request, so the model loads once). "Write a very long story." at
temperature 0 writes on well past the window. The official ``ollama`` client has no
``shift`` parameter (0.6.x) and drops unknown response fields, so ``shift: false`` and the
final chunk's ``context_shifted`` are read over raw HTTP.

Comparing two greedy outputs is only fair when both evaluated their prompts in the same
chunks: llama.cpp's CPU kernels round a little differently with the number of rows a
decode holds, and that alone flips a near-tie token now and then (measured on this model:
3 of 15 prompts run cold differed from the same prompts run after a 4-token cache hit, with
no shift anywhere). So each compared run starts from a known slot: :func:`_cold` leaves
nothing the next prompt can reuse, and the prompt-cache test compares a request after a
shifted one with the same request after an unshifted one, both reusing the same prefix.

In process, over the scripted runner: what reaches the runner (``shift`` on by default, off
when asked, off for a two-phase answer's free phase) and what the final chunk says. And the
worker with tiny random-weight models: an ordinary one shifts, an M-RoPE one (whose cache
llama.cpp cannot shift) ends at its window with ``length``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from fastapi.testclient import TestClient

from conftest import MODEL, RunningServer, default_model_server
from fake_runner import FakeRunnerFactory
from ggufgen import write_tiny_model
from inprocess import serving
from pollama.config import Settings
from pollama.runner.base import LoadSpec
from test_api_tools_thinking import PLAIN, Responder, template
from test_worker import WorkerClient
from tiny_qwen2vl import write_qwen2vl_model

slow = pytest.mark.slow

NUM_CTX = 128
KEEP = 4  # num_keep's default (SmolLM2 adds no BOS token)
DROP = (NUM_CTX - KEEP) // 2  # what one shift drops from a full window
STORY = "Write a very long story."
OPTIONS = {"temperature": 0, "num_ctx": NUM_CTX, "num_predict": 300}
GENERATE = {"model": MODEL, "prompt": STORY, "options": OPTIONS}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": STORY}], "options": OPTIONS}
BODIES = {"/api/generate": GENERATE, "/api/chat": CHAT}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("shift-home")
    with default_model_server(home, {"OLLAMA_NUM_PARALLEL": "1"}) as running:
        yield running


@pytest.fixture
def client(srv: RunningServer) -> Iterator[ollama.Client]:
    c = ollama.Client(host=srv.url, timeout=300)
    yield c
    c.close()


def _text(chunk: dict[str, Any]) -> str:
    return str(chunk.get("response") or (chunk.get("message") or {}).get("content") or "")


def _answer(srv: RunningServer, path: str, body: dict[str, Any], stream: bool = False
            ) -> tuple[str, dict[str, Any]]:
    """The whole text and the final chunk of a request over raw HTTP."""
    body = {**body, "stream": stream}
    if not stream:
        r = httpx.post(srv.url + path, json=body, timeout=300)
        assert r.status_code == 200, r.text
        return _text(r.json()), r.json()
    with httpx.stream("POST", srv.url + path, json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        chunks = [json.loads(line) for line in r.iter_lines() if line]
    assert chunks[-1]["done"] is True and not any(c["done"] for c in chunks[:-1])
    assert all("context_shifted" not in c for c in chunks[:-1])
    return "".join(_text(c) for c in chunks), chunks[-1]


def _cold(srv: RunningServer) -> None:
    """Leave the slot holding a prompt whose first token no request here starts with, so
    the next request reuses nothing."""
    hello = {"model": MODEL, "prompt": "Hello", "raw": True}
    _answer(srv, "/api/generate", {**hello, "options": {**OPTIONS, "num_predict": 1}})


def _client_answer(client: ollama.Client, path: str, stream: bool) -> tuple[str, Any]:
    """The text and final part of a default (``shift`` on) request with the official client."""
    if path == "/api/generate":
        result: Any = client.generate(MODEL, STORY, options=OPTIONS, stream=stream)
    else:
        result = client.chat(MODEL, messages=CHAT["messages"], options=OPTIONS, stream=stream)
    parts = list(result) if stream else [result]
    text = "".join(p.response if path == "/api/generate" else p.message.content or ""
                   for p in parts)
    return text, parts[-1]


@slow
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", list(BODIES))
def test_generation_goes_on_past_the_window(client: ollama.Client, srv: RunningServer,
                                            path: str, stream: bool) -> None:
    _cold(srv)
    text, final = _client_answer(client, path, stream)
    assert final.done and final.eval_count > NUM_CTX  # more than the window could hold
    assert final.done_reason == "stop" or (final.done_reason, final.eval_count) == ("length", 300)
    _cold(srv)
    raw_text, raw = _answer(srv, path, BODIES[path], stream)
    assert (raw_text, raw["eval_count"], raw["done_reason"]) == (
        text, final.eval_count, final.done_reason)
    assert raw["context_shifted"] > 0 and raw["context_shifted"] % DROP == 0


@slow
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", list(BODIES))
def test_shift_false_stops_at_the_window(srv: RunningServer, path: str, stream: bool) -> None:
    text, final = _answer(srv, path, {**BODIES[path], "shift": False}, stream)
    assert final["done_reason"] == "length" and "context_shifted" not in final
    # every cell of the window filled; the last token sampled was never decoded
    assert final["eval_count"] == NUM_CTX - final["prompt_eval_count"] + 1
    assert text


@slow
def test_a_request_after_a_shifted_one_reuses_only_the_kept_prefix(srv: RunningServer) -> None:
    """The follow-up is the worst case: a raw prompt spelling exactly the tokens the slot
    held after the shift (its kept prefix and what came after the dropped tokens). Those
    later cells were computed while the dropped tokens were still there, so reusing them
    would answer from another context than a cold run; the slot keeps only its prefix."""
    _, shifted = _answer(srv, "/api/generate", GENERATE)
    dropped = shifted["context_shifted"]
    assert dropped > 0
    decoded = shifted["context"][:-1]  # the last token sampled was never decoded
    held = decoded[:KEEP] + decoded[KEEP + dropped :]
    detok = httpx.post(srv.url + "/api/detokenize", timeout=60, json={
        "model": MODEL, "tokens": held[:60], "options": {"num_ctx": NUM_CTX}})
    follow = {"model": MODEL, "prompt": detok.json()["content"], "raw": True,
              "options": {**OPTIONS, "num_predict": 40}}
    after_text, after = _answer(srv, "/api/generate", follow)
    # The same follow-up after the same request without a shift, whose slot holds the
    # unshifted prompt and answer: the same prefix is reused, the rest evaluated alike.
    _answer(srv, "/api/generate", {**GENERATE, "shift": False})
    control_text, control = _answer(srv, "/api/generate", follow)
    assert after.get("prompt_cached_count", 0) == control.get("prompt_cached_count", 0) <= KEEP
    assert after_text == control_text and after["eval_count"] == control["eval_count"]


def _first_new_word(text: str, start: int) -> str:
    """A word of ``text`` after ``start`` that does not occur before it."""
    for word in text[start:].split():
        word = word.strip(".,;:!?\"'()")
        if len(word) >= 5 and word.isalpha() and word not in text[: start + len(word)]:
            return word
    raise AssertionError(f"no new word after {start} in {text!r}")


@slow
def test_logprobs_and_stop_strings_across_a_shift(srv: RunningServer) -> None:
    _cold(srv)
    text, final = _answer(srv, "/api/generate", {**GENERATE, "logprobs": True})
    entries = final["logprobs"]
    assert len(entries) == final["eval_count"] == 300 and final["context_shifted"] > 0
    assert "".join(e["token"] for e in entries) == text
    # a stop string that first occurs after the first shift still ends the answer
    window = len("".join(e["token"] for e in entries[: NUM_CTX - final["prompt_eval_count"] + 1]))
    word = _first_new_word(text, window)
    _cold(srv)
    stop_text, stopped = _answer(
        srv, "/api/generate", {**GENERATE, "options": {**OPTIONS, "stop": [word]}}, stream=True)
    assert stopped["done_reason"] == "stop" and stopped["context_shifted"] > 0
    assert stop_text == text[: text.index(word)]


@slow
def test_structured_output_stays_valid_across_a_shift(srv: RunningServer) -> None:
    body = {**GENERATE, "prompt": "Write a long story as JSON, with a title and ten chapters.",
            "format": "json"}
    text, final = _answer(srv, "/api/generate", body)
    assert final["context_shifted"] > 0 and final["done_reason"] in ("stop", "length")
    assert isinstance(json.loads(text), dict)
    assert final["eval_count"] <= 300


@slow
def test_infinite_generation_is_still_bounded(srv: RunningServer) -> None:
    """``num_predict`` -1 with shift on: ten windows at most, as Ollama bounds it."""
    _, final = _answer(srv, "/api/generate",
                       {**GENERATE, "options": {**OPTIONS, "num_predict": -1}}, stream=True)
    assert final["context_shifted"] > 0
    assert final["done_reason"] == "stop" or (
        final["done_reason"], final["eval_count"]) == ("length", 10 * NUM_CTX)


@slow
@pytest.mark.parametrize("value", ["yes", 1, "true", []])
@pytest.mark.parametrize("path", list(BODIES))
def test_a_shift_that_is_not_a_boolean_is_a_400(srv: RunningServer, path: str,
                                                 value: Any) -> None:
    r = httpx.post(srv.url + path, json={**BODIES[path], "shift": value}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid request: shift: Input should be a valid boolean"


# -- in process, over the scripted runner ---------------------------------------------------


@pytest.fixture
def fake() -> Responder:
    return Responder()


@pytest.fixture
def scripted(settings: Settings, tmp_path: Path, fake: Responder
             ) -> Iterator[tuple[TestClient, FakeRunnerFactory]]:
    factory = FakeRunnerFactory(script=fake)
    gguf = write_tiny_model(tmp_path / "t.gguf", context_length=8192)
    models = {"plain": {"template": PLAIN}, "thinker": {"template": template(True)}}
    with serving(settings, factory, {gguf: models}) as api:
        yield api, factory


def test_shift_reaches_the_runner(scripted: tuple[TestClient, FakeRunnerFactory],
                                  fake: Responder) -> None:
    api, _ = scripted
    ask = [{"role": "user", "content": "Hi"}]
    for body, expected in [
        ({"model": "plain", "prompt": "Hi"}, True),
        ({"model": "plain", "prompt": "Hi", "shift": None}, True),
        ({"model": "plain", "prompt": "Hi", "shift": False}, False),
        ({"model": "plain", "messages": ask, "shift": False}, False),
        ({"model": "plain", "messages": ask, "shift": True}, True),
    ]:
        path = "/api/chat" if "messages" in body else "/api/generate"
        assert api.post(path, json={**body, "stream": False}).status_code == 200
        assert fake.last.shift is expected, body
    # the OpenAI endpoint has no such field: Ollama's default, on
    assert api.post("/v1/chat/completions", json={"model": "plain", "messages": ask}
                    ).status_code == 200
    assert fake.last.shift is True


def test_a_two_phase_answer_never_shifts_its_free_phase(
    scripted: tuple[TestClient, FakeRunnerFactory], fake: Responder
) -> None:
    """Its reasoning becomes the constrained phase's prompt, which must fit the window."""
    api, _ = scripted
    fake.say(["<think>", "Four.", "</think>", "\n\n", "The"], ['{"answer": 4}'])
    body = {"model": "thinker", "messages": [{"role": "user", "content": "2+2?"}],
            "format": "json", "stream": False}
    assert api.post("/api/chat", json=body).status_code == 200
    assert [(r.format, r.shift) for r in fake.requests] == [(None, False), ("json", True)]


@pytest.mark.parametrize("stream", [False, True])
def test_the_final_chunk_says_how_many_tokens_were_dropped(
    scripted: tuple[TestClient, FakeRunnerFactory], fake: Responder, stream: bool
) -> None:
    api, factory = scripted
    for path, body in [("/api/generate", {"prompt": "Hi"}),
                       ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}]})]:
        for shifted in (62, 0):
            factory.defaults["context_shifted"] = shifted
            for runner in factory.runners:
                runner.context_shifted = shifted
            r = api.post(path, json={"model": "plain", **body, "stream": stream})
            chunks = [json.loads(line) for line in r.text.splitlines() if line]
            assert [c.get("context_shifted") for c in chunks] == [None] * (len(chunks) - 1) + [
                shifted or None]


# -- the worker, with tiny models --------------------------------------------------------------


def _complete(worker: WorkerClient, req_id: int, shift: bool) -> dict[str, Any]:
    """The final message of a long greedy completion (``WorkerClient.start`` knows no
    ``shift``, so the message is sent as the server's runner sends it)."""
    request = {"prompt": "hello world", "shift": shift,
               "options": {"temperature": 0, "num_predict": 200}}
    worker._queue(req_id)
    worker.send({"op": "completion", "id": req_id, "request": request})
    _, done = worker.finish(req_id)
    return done


@pytest.mark.parametrize("kind", ["llama", "qwen2vl"])
def test_a_worker_shifts_only_where_its_cache_can(tmp_path: Path, kind: str) -> None:
    write = write_tiny_model if kind == "llama" else write_qwen2vl_model
    path = write(tmp_path / f"{kind}.gguf")
    worker = WorkerClient(LoadSpec(model_path=str(path), num_ctx=64))
    try:
        assert worker.ready["type"] == "ready", worker.ready
        for req_id, shift in enumerate((True, False), start=1):
            done = _complete(worker, req_id, shift)
            assert done["type"] == "done" and done["done_reason"] == "length", done
            if shift and kind == "llama":
                assert done["eval_count"] == 200 and done["context_shifted"] > 0
            else:  # the window ends it: every cell filled, the last token never decoded
                assert done["eval_count"] == 64 + 1 - done["prompt_eval_count"]
                assert done["context_shifted"] == 0
    finally:
        worker.close()
