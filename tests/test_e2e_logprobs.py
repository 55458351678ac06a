"""Token logprobs and stop sequences end to end: the real server and model, through the
official ``ollama``, ``openai`` and ``anthropic`` clients, streaming and not.

At temperature 0 greedy decoding takes the most likely token, so every entry must be its
own top-1 alternative with the same logprob; the entries' tokens put together are the
response text, and there is one per generated token (``eval_count``), except those a stop
sequence swallowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import anthropic
import ollama
import openai
import pytest

from conftest import MODEL, RunningServer

pytestmark = pytest.mark.slow

TOP = 3
QUESTION = "Tell me about the moon."
OPTIONS = {"temperature": 0, "num_predict": 24}


@pytest.fixture
def client(model_server: RunningServer) -> Iterator[ollama.Client]:
    c = ollama.Client(host=model_server.url, timeout=120)
    yield c
    c.close()


@pytest.fixture
def oai(model_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{model_server.url}/v1", api_key="unused") as c:
        yield c


@pytest.fixture
def claude(model_server: RunningServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=model_server.url, api_key="unused") as c:
        yield c


def field(item: Any, name: str) -> Any:
    return item[name] if isinstance(item, dict) else getattr(item, name)


def check_greedy(entries: Sequence[Any], text: str, n_top: int = TOP) -> None:
    """The properties every greedy response's entries have, whatever the client's types."""
    assert entries
    assert "".join(field(e, "token") for e in entries) == text
    for entry in entries:
        value = field(entry, "logprob")
        top = field(entry, "top_logprobs")
        assert value <= 0 and len(top) == n_top
        values = [field(t, "logprob") for t in top]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        assert (field(top[0], "token"), values[0]) == (field(entry, "token"), value)


# -- Ollama's API -------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_generate_logprobs(client: ollama.Client, stream: bool) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": QUESTION, "options": OPTIONS,
                            "logprobs": True, "top_logprobs": TOP}
    if stream:
        parts = list(client.generate(**args, stream=True))
        entries = [e for p in parts for e in p.logprobs or []]
        text, final = "".join(p.response for p in parts), parts[-1]
    else:
        final = client.generate(**args)
        entries, text = list(final.logprobs or []), final.response
    assert len(entries) == final.eval_count
    check_greedy(entries, text)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(client: ollama.Client, stream: bool) -> None:
    args: dict[str, Any] = {"model": MODEL, "options": OPTIONS, "logprobs": True,
                            "top_logprobs": TOP,
                            "messages": [{"role": "user", "content": QUESTION}]}
    if stream:
        parts = list(client.chat(**args, stream=True))
        entries = [e for p in parts for e in p.logprobs or []]
        text, final = "".join(p.message.content or "" for p in parts), parts[-1]
    else:
        final = client.chat(**args)
        entries, text = list(final.logprobs or []), final.message.content or ""
    assert len(entries) == final.eval_count
    check_greedy(entries, text)
    plain = client.chat(**{**args, "logprobs": False})
    assert plain.logprobs is None and plain.message.content == text


def test_a_stop_sequence_drops_its_tokens(client: ollama.Client) -> None:
    """Stop at a whole token from the middle of the greedy answer: the entries are those
    of the tokens before it, and ``eval_count`` counts the stop's token too."""
    args: dict[str, Any] = {"model": MODEL, "prompt": QUESTION, "logprobs": True}
    full = client.generate(**args, options=OPTIONS)
    tokens = [e.token for e in full.logprobs or []]
    i = next(i for i in range(3, len(tokens))
             if len(tokens[i].strip()) >= 3 and tokens[i] not in "".join(tokens[:i]))
    parts = list(client.generate(**args, options={**OPTIONS, "stop": [tokens[i]]},
                                 stream=True))
    entries = [e for p in parts for e in p.logprobs or []]
    text = "".join(p.response for p in parts)
    assert parts[-1].done_reason == "stop" and text == "".join(tokens[:i])
    assert [e.token for e in entries] == tokens[:i]
    assert parts[-1].eval_count == len(entries) + 1


def test_logprobs_of_json_output(client: ollama.Client) -> None:
    """Structured output: one entry per token still, and no -inf from the grammar's mask."""
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Name a color."}],
                    format="json", options=OPTIONS, logprobs=True, top_logprobs=TOP)
    entries = list(r.logprobs or [])
    assert len(entries) == r.eval_count and "".join(e.token for e in entries) == r.message.content
    assert all(math.isfinite(e.logprob) and e.logprob <= 0 for e in entries)
    assert any(e.token != (e.top_logprobs or [])[0].token for e in entries)  # the raw model's


# -- OpenAI -------------------------------------------------------------------------------


def test_openai_chat_logprobs(oai: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "max_tokens": 24, "temperature": 0,
                            "logprobs": True, "top_logprobs": TOP,
                            "messages": [{"role": "user", "content": QUESTION}]}
    r = oai.chat.completions.create(**args)
    content = r.choices[0].logprobs.content if r.choices[0].logprobs else None
    assert content and r.usage and len(content) == r.usage.completion_tokens
    check_greedy(content, r.choices[0].message.content or "")
    assert all(e.bytes is None or bytes(e.bytes).decode() == e.token for e in content)

    chunks = list(oai.chat.completions.create(**args, stream=True,
                                              stream_options={"include_usage": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content or []]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check_greedy(streamed, text)
    usage = chunks[-1].usage
    assert usage and len(streamed) == usage.completion_tokens
    assert [e.token for e in streamed] == [e.token for e in content]


def check_legacy(logprobs: Any, text: str, offset: int = 0) -> None:
    """The legacy completions shape at temperature 0 (alternatives as ``{text: logprob}``:
    tokens that render alike, such as control tokens, share one key)."""
    assert "".join(logprobs.tokens) == text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset)
    for token, value, top, at in zip(logprobs.tokens, logprobs.token_logprobs,
                                     logprobs.top_logprobs, logprobs.text_offset, strict=True):
        assert value <= 0 and 1 <= len(top) <= TOP
        assert max(top.values()) == top[token] == value
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
        assert text[at - offset :].startswith(token)


def test_openai_completions_legacy_logprobs(oai: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": "The moon is", "max_tokens": 16,
                            "temperature": 0, "logprobs": TOP}
    r = oai.completions.create(**args)
    choice = r.choices[0]
    assert choice.logprobs is not None and r.usage
    check_legacy(choice.logprobs, choice.text)
    assert len(choice.logprobs.tokens or []) == r.usage.completion_tokens

    echoed = oai.completions.create(**args, echo=True).choices[0]
    assert echoed.logprobs and echoed.logprobs.text_offset
    assert echoed.logprobs.text_offset[0] == len("The moon is")
    check_legacy(echoed.logprobs, choice.text, offset=len("The moon is"))

    chunks = list(oai.completions.create(**args, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    tokens = [t for p in parts for t in p.tokens or []]
    offsets = [o for p in parts for o in p.text_offset or []]
    assert tokens == choice.logprobs.tokens and offsets == choice.logprobs.text_offset
    assert "".join(c.choices[0].text for c in chunks) == choice.text


# -- Anthropic ----------------------------------------------------------------------------


def test_anthropic_stop_reasons(claude: anthropic.Anthropic, client: ollama.Client) -> None:
    ask: Any = {"model": MODEL, "max_tokens": 200, "extra_body": {"temperature": 0},
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    natural = claude.messages.create(**ask)
    assert (natural.stop_reason, natural.stop_sequence) == ("end_turn", None)
    answer = natural.content[0].text  # type: ignore[union-attr]
    word = next(w for w in answer.split()[2:] if len(w) >= 4)
    stopped = claude.messages.create(**ask, stop_sequences=["zzzz", word])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", word)
    assert stopped.content[0].text == answer[: answer.index(word)]  # type: ignore[union-attr]
    with claude.messages.stream(**ask, stop_sequences=[word]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == answer[: answer.index(word)]
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", word)
    short = claude.messages.create(**{**ask, "max_tokens": 2}, stop_sequences=[word])
    assert (short.stop_reason, short.stop_sequence) == ("max_tokens", None)
