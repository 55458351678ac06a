"""The OpenAI-compatible endpoints through the official ``openai`` SDK, real server and model."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from conftest import MODEL, RunningServer

pytestmark = pytest.mark.slow


@pytest.fixture
def oai(model_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{model_server.url}/v1", api_key="unused") as client:
        yield client


def test_chat_completion(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16, temperature=0,
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage and r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion_stream_with_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12 or finishes[-1] == "stop"


def test_extra_body_options_are_honoured(oai: openai.OpenAI) -> None:
    a = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a joke."}], max_tokens=10,
        temperature=1.5, seed=7, extra_body={"top_k": 1},
    )
    b = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a joke."}], max_tokens=10,
        temperature=0,
    )
    assert a.choices[0].message.content == b.choices[0].message.content  # top_k 1 is greedy


def test_unknown_fields_are_ignored(oai: openai.OpenAI) -> None:
    """Fields of newer API versions (or typos) must not break a client: they are ignored."""
    r = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
        temperature=0, extra_body={"web_search_options": {"x": 1}, "no_such_field": [1, 2]},
    )
    plain = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
        temperature=0,
    )
    assert r.choices[0].message.content == plain.choices[0].message.content
    c = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"zzz": True})
    assert c.choices[0].text is not None


def test_completions(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    streamed = list(oai.completions.create(model=MODEL, prompt="The sky is", max_tokens=8,
                                           temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_models(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert MODEL in ids
    m = oai.models.retrieve(MODEL)
    assert m.id == MODEL and m.owned_by == "library"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope:latest")


def test_errors_use_openai_shape(model_server: RunningServer, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    assert "model 'missing' not found" in str(err.value)
    r = httpx.post(f"{model_server.url}/v1/chat/completions",
                   json={"model": MODEL, "messages": []}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"] == "[] is too short - 'messages'"
