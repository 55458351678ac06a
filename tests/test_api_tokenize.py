"""``/api/tokenize``, ``/api/detokenize``, ``_debug_render_only`` and ``/api/tags``
capabilities, in-process.

The server runs over :class:`fake_runner.FakeRunner`, whose tokenizer is byte-level (a
token per UTF-8 byte, 256 for BOS, a vocabulary of 257), so every expected token, piece and
error is known exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fake_runner import BOS_TOKEN, FakeRunnerFactory
from ggufgen import write_tiny_model
from inprocess import create_models, serving
from pollama.config import Settings
from pollama.inference.tokenizer import MAX_CONTENT_BYTES, MAX_TOKENS, join_pieces

TEXT = "héllo 世界 🙂"
THINKING = (
    "{{ if .IsThinkSet }}[think={{ .ThinkLevel }}]{{ end }}"
    "{{- range .Messages }}<|{{ .Role }}|>{{ if .Thinking }}<think>{{ .Thinking }}</think>"
    "{{ end }}{{ .Content }}\n{{ end }}<|assistant|>"
)
PLAIN = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}\n{{ end }}<|assistant|>"


@pytest.fixture
def factory() -> FakeRunnerFactory:
    return FakeRunnerFactory()


@pytest.fixture
def api(settings: Settings, tmp_path: Path, factory: FakeRunnerFactory) -> Iterator[TestClient]:
    gguf = write_tiny_model(tmp_path / "t.gguf", context_length=8192)
    models = {"plain": {"template": PLAIN}, "thinker": {"template": THINKING}}
    with serving(settings, factory, {gguf: models}) as client:
        yield client


def completions(factory: FakeRunnerFactory) -> int:
    return sum(1 for r in factory.runners for call in r.calls if call[0] == "completion")


# -- /api/tags ------------------------------------------------------------------------------


def test_tags_entries_carry_the_capabilities_show_gives(api: TestClient) -> None:
    entries = api.get("/api/tags").json()["models"]
    assert {e["name"] for e in entries} == {"plain:latest", "thinker:latest"}
    for entry in entries:
        shown = api.post("/api/show", json={"model": entry["name"]}).json()
        assert entry["capabilities"] == shown["capabilities"]
    caps = {e["name"]: e["capabilities"] for e in entries}
    assert caps == {"plain:latest": ["completion"], "thinker:latest": ["completion", "thinking"]}


def test_tags_stays_fast_for_many_models(settings: Settings, tmp_path: Path) -> None:
    gguf = write_tiny_model(tmp_path / "t.gguf", context_length=8192)
    with serving(settings, FakeRunnerFactory(), {}) as client:
        create_models(client, gguf, {f"m{i}": {"template": THINKING} for i in range(150)})
        client.get("/api/tags")
        started = time.perf_counter()
        entries = client.get("/api/tags").json()["models"]
        elapsed = time.perf_counter() - started
    assert len(entries) == 150
    assert all(e["capabilities"] == ["completion", "thinking"] for e in entries)
    assert elapsed < 2.0, f"/api/tags of 150 models took {elapsed:.2f}s"


# -- /api/tokenize and /api/detokenize ----------------------------------------------------------


def test_tokenize_round_trips_multibyte_text(api: TestClient) -> None:
    body = api.post("/api/tokenize", json={"model": "plain", "content": TEXT}).json()
    assert body == {"tokens": [BOS_TOKEN, *TEXT.encode()]}
    back = api.post("/api/detokenize", json={"model": "plain", "tokens": body["tokens"]})
    assert back.status_code == 200
    assert back.json() == {"content": TEXT}


def test_pieces_join_to_the_text_and_split_characters_go_to_their_last_byte(
    api: TestClient,
) -> None:
    body = api.post(
        "/api/tokenize",
        json={"model": "plain", "content": TEXT, "add_special": False, "with_pieces": True},
    ).json()
    assert body["tokens"] == list(TEXT.encode())
    assert "".join(body["pieces"]) == TEXT
    assert len(body["pieces"]) == len(body["tokens"])
    assert body["pieces"][:3] == ["h", "", "é"]  # é is two bytes: its piece is on the second
    with_bos = api.post(
        "/api/tokenize", json={"model": "plain", "content": "hi", "with_pieces": True}
    ).json()
    assert with_bos == {"tokens": [BOS_TOKEN, 104, 105], "pieces": ["<s>", "h", "i"]}


def test_join_pieces_keeps_a_dangling_byte() -> None:
    assert join_pieces([b"a", b"\xe4", b"\xb8"]) == ["a", "", "\ufffd"]


@pytest.mark.parametrize(
    ("tokens", "words"),
    [
        ([104, BOS_TOKEN + 1], "invalid token id 257 at index 1"),
        ([104, -1], "invalid token id -1 at index 1"),
        ([104, "x"], "invalid token at index 1: 'x' is not an integer"),
        ([1.5], "invalid token at index 0: 1.5 is not an integer"),
        ([True], "invalid token at index 0: True is not an integer"),
    ],
)
def test_bad_tokens_are_a_400_naming_the_first(
    api: TestClient, tokens: list[object], words: str
) -> None:
    r = api.post("/api/detokenize", json={"model": "plain", "tokens": tokens})
    assert r.status_code == 400
    assert words in r.json()["error"]


def test_too_much_is_refused_before_anything_loads(
    api: TestClient, factory: FakeRunnerFactory
) -> None:
    r = api.post("/api/detokenize", json={"model": "plain", "tokens": [0] * (MAX_TOKENS + 1)})
    assert r.status_code == 400
    assert "too many tokens" in r.json()["error"]
    r = api.post("/api/tokenize", json={"model": "plain", "content": "a" * (MAX_CONTENT_BYTES + 1)})
    assert r.status_code == 400
    assert "at most" in r.json()["error"]
    assert factory.loads() == 0


def test_unknown_and_missing_models(api: TestClient) -> None:
    for path, body in (("/api/tokenize", {"content": "x"}), ("/api/detokenize", {"tokens": [1]})):
        r = api.post(path, json={"model": "nope", **body})
        assert r.status_code == 404
        assert r.json() == {"error": "model 'nope' not found"}
        assert api.post(path, json=body).status_code == 400


def test_tokenizer_shares_the_generate_runner(api: TestClient, factory: FakeRunnerFactory) -> None:
    api.post("/api/generate", json={"model": "plain", "prompt": "hi", "stream": False})
    api.post("/api/tokenize", json={"model": "plain", "content": "hi"})
    assert factory.loads() == 1


# -- _debug_render_only ---------------------------------------------------------------------


def test_chat_render_only_returns_the_prompt_and_generates_nothing(
    api: TestClient, factory: FakeRunnerFactory
) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    r = api.post(
        "/api/chat", json={"model": "plain", "messages": messages, "_debug_render_only": True}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["_debug_info"] == {"rendered_template": "<|user|>Hi\n<|assistant|>",
                                   "image_count": 0}
    assert body["model"] == "plain"
    assert body["created_at"]
    assert body["done"] is False
    assert completions(factory) == 0


def test_render_only_passes_the_think_level(api: TestClient) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    for think, mark in (("low", "[think=low]"), ("high", "[think=high]"), (True, "[think=medium]")):
        body = api.post("/api/chat", json={"model": "thinker", "messages": messages,
                                           "think": think, "_debug_render_only": True}).json()
        assert body["_debug_info"]["rendered_template"] == mark + "<|user|>Hi\n<|assistant|>"


def test_render_only_truncates_as_a_real_request(api: TestClient) -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}-" + "x" * 40}
                for i in range(9)]
    body = api.post("/api/chat", json={"model": "plain", "messages": messages,
                                       "options": {"num_ctx": 128},
                                       "_debug_render_only": True}).json()
    rendered = body["_debug_info"]["rendered_template"]
    assert "m8-" in rendered
    assert "m0-" not in rendered
    assert len(rendered.encode()) <= 128


def test_generate_render_only(api: TestClient, factory: FakeRunnerFactory) -> None:
    body = api.post("/api/generate", json={"model": "plain", "prompt": "Why?",
                                           "system": "Be brief.",
                                           "_debug_render_only": True}).json()
    assert body["_debug_info"]["rendered_template"] == (
        "<|system|>Be brief.\n<|user|>Why?\n<|assistant|>"
    )
    assert body["response"] == ""
    assert completions(factory) == 0
