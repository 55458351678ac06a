"""The tokenizer endpoints, ``_debug_render_only`` and ``/api/tags`` capabilities end to end:
a real server, the real default model, ``httpx`` (the ``ollama`` client has no tokenizer
calls) and the ``ollama`` client for the listing."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import ollama
import pytest

from conftest import MODEL, RunningServer
from pollama.template import Template, render_prompt

pytestmark = pytest.mark.slow

TEXTS = [
    "héllo 世界 🙂",
    "plain ascii",
    " leading space and\ttabs\nnewlines",
    "ÆØÅ ñ ü — “quotes” 🙂🙂",
]
THINKING = (
    "{{ if .IsThinkSet }}[think={{ .ThinkLevel }}]{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ if .Thinking }}<think>{{ .Thinking }}"
    "</think>{{ end }}{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


@pytest.fixture
def http(model_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=model_server.url, timeout=120) as client:
        yield client


@pytest.mark.parametrize("text", TEXTS)
def test_detokenize_of_tokenize_is_the_text(http: httpx.Client, text: str) -> None:
    r = http.post("/api/tokenize", json={"model": MODEL, "content": text, "add_special": False,
                                        "with_pieces": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] and all(isinstance(t, int) for t in body["tokens"])
    assert "".join(body["pieces"]) == text
    back = http.post("/api/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.status_code == 200, back.text
    assert back.json() == {"content": text}


def test_add_special_only_adds_specials(http: httpx.Client) -> None:
    plain = http.post("/api/tokenize", json={"model": MODEL, "content": "hi",
                                            "add_special": False}).json()["tokens"]
    special = http.post("/api/tokenize", json={"model": MODEL, "content": "hi"}).json()["tokens"]
    assert special[len(special) - len(plain):] == plain


def test_bad_tokens_and_unknown_model(http: httpx.Client) -> None:
    r = http.post("/api/detokenize", json={"model": MODEL, "tokens": [1, 10_000_000]})
    assert r.status_code == 400
    assert "invalid token id 10000000 at index 1" in r.json()["error"]
    r = http.post("/api/detokenize", json={"model": MODEL, "tokens": [1, "two"]})
    assert r.status_code == 400
    assert "index 1" in r.json()["error"]
    for path, extra in (("/api/tokenize", {"content": "x"}), ("/api/detokenize", {"tokens": [1]})):
        r = http.post(path, json={"model": "no-such-model", **extra})
        assert r.status_code == 404


def test_render_only_is_the_template_rendered(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    r = http.post("/api/chat", json={"model": MODEL, "messages": messages,
                                    "_debug_render_only": True})
    assert r.status_code == 200, r.text
    body = r.json()
    show = http.post("/api/show", json={"model": MODEL}).json()
    expected = render_prompt(Template.parse(show["template"]), messages=messages,
                             system=show.get("system"))
    assert body["_debug_info"] == {"rendered_template": expected, "image_count": 0}
    assert "eval_count" not in body and body["done"] is False
    gen = http.post("/api/generate", json={"model": MODEL, "prompt": "What is 2+2?",
                                          "_debug_render_only": True}).json()
    assert gen["_debug_info"]["rendered_template"] == expected
    assert gen["response"] == ""


def test_render_only_think_level_reaches_the_template(http: httpx.Client) -> None:
    r = http.post("/api/create", json={"model": "e2e-thinklevel", "from": MODEL,
                                      "template": THINKING, "stream": False})
    assert r.status_code == 200, r.text
    try:
        messages = [{"role": "user", "content": "Hi"}]
        for level in ("low", "high"):
            body = http.post("/api/chat", json={"model": "e2e-thinklevel", "messages": messages,
                                               "think": level, "_debug_render_only": True}).json()
            rendered = body["_debug_info"]["rendered_template"]
            assert rendered.startswith(f"[think={level}]<|im_start|>user\nHi<|im_end|>")
    finally:
        http.request("DELETE", "/api/delete", json={"model": "e2e-thinklevel"})


def test_tags_capabilities_of_the_default_model(
    model_server: RunningServer, http: httpx.Client
) -> None:
    client = ollama.Client(host=model_server.url)
    try:
        assert any(m.model == MODEL for m in client.list().models)  # the client still parses
        shown = client.show(MODEL)
    finally:
        client.close()
    raw = http.get("/api/tags").json()["models"]
    caps = next(m["capabilities"] for m in raw if m["model"] == MODEL)
    assert caps == shown.capabilities
    assert "completion" in caps
