"""Logprobs and the stop sequence on every protocol, in-process with the scripted runner.

The fake runner sends chunks with scripted logprob entries (the real worker's behaviour is
tested in ``test_worker.py`` and end to end in ``test_e2e_logprobs.py``); here each wire
shape is checked: Ollama's ``logprobs`` per chunk, OpenAI chat's ``logprobs.content``, the
legacy completions shape, and Anthropic's ``stop_sequence``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from fastapi.testclient import TestClient

from fake_runner import FakeRunnerFactory
from ggufgen import write_tiny_model
from inprocess import native_client, serving
from pollama.config import Settings
from pollama.runner.base import CompletionChunk, Logprob, TokenLogprob
from test_api_tools_thinking import PLAIN, Responder, lines, sse, template


def lp(text: str, value: float = -0.5, data: bytes | None = None) -> Logprob:
    """A scripted entry with two alternatives: itself and ``alt``."""
    raw = text.encode() if data is None else data
    top = [TokenLogprob(text, value, list(raw)), TokenLogprob("alt", value - 1, [97, 108, 116])]
    return Logprob(text, value, list(raw), top)


def said(*texts: str) -> list[CompletionChunk]:
    """One chunk per text, each carrying the entry of one token of that text."""
    return [CompletionChunk(text=t, logprobs=[lp(t, -0.1 * i)]) for i, t in enumerate(texts)]


class Setup:
    def __init__(self, client: TestClient, factory: FakeRunnerFactory) -> None:
        self.client, self.factory = client, factory

    def ends(self, done_reason: str, stop_sequence: str = "") -> None:
        """How the next completions end (the runner that exists, and any loaded later)."""
        self.factory.defaults.update(done_reason=done_reason, stop_sequence=stop_sequence)
        for runner in self.factory.runners:
            runner.done_reason, runner.stop_sequence = done_reason, stop_sequence


@pytest.fixture
def fake() -> Responder:
    return Responder()


@pytest.fixture
def setup(settings: Settings, tmp_path: Path, fake: Responder) -> Iterator[Setup]:
    factory = FakeRunnerFactory(script=fake)
    gguf = write_tiny_model(tmp_path / "t.gguf", context_length=8192)
    models = {"thinker": {"template": template(True)}, "plain": {"template": PLAIN}}
    with serving(settings, factory, {gguf: models}) as client:
        yield Setup(client, factory)


@pytest.fixture
def api(setup: Setup) -> TestClient:
    return setup.client


THOUGHT = ("<think>", "Two plus", " two.", "</think>", "\n\n", "It is ", "4.")
ASK = [{"role": "user", "content": "2+2?"}]


def tokens(entries: list[dict[str, Any]] | None) -> list[str]:
    return [e["token"] for e in entries or []]


# -- Ollama -------------------------------------------------------------------------------


def test_native_chunks_carry_the_logprobs_of_their_tokens(api: TestClient,
                                                          fake: Responder) -> None:
    fake.say(said(*THOUGHT))
    body = {"model": "thinker", "messages": ASK, "logprobs": True, "top_logprobs": 2}
    parts = lines(api.post("/api/chat", json=body))
    assert (fake.last.logprobs, fake.last.top_logprobs) == (True, 2)
    # every token's entry once, in order, on the line made from its chunk: the parser held
    # "<think>", "</think>" and the blank back, yet their entries went out at once
    assert [tokens(p.get("logprobs")) for p in parts] == [[t] for t in THOUGHT] + [[]]
    assert [p["message"].get("thinking", "") + p["message"]["content"] for p in parts] == [
        "", "Two plus", " two.", "", "", "It is ", "4.", ""]
    assert "logprobs" not in parts[-1] and parts[-1]["done"]
    first = parts[1]["logprobs"][0]
    assert first == {"token": "Two plus", "logprob": pytest.approx(-0.1),
                     "bytes": list(b"Two plus"),
                     "top_logprobs": [{"token": "Two plus", "logprob": pytest.approx(-0.1),
                                       "bytes": list(b"Two plus")},
                                      {"token": "alt", "logprob": pytest.approx(-1.1),
                                       "bytes": [97, 108, 116]}]}

    fake.say(said(*THOUGHT))
    whole = api.post("/api/chat", json={**body, "stream": False}).json()
    assert tokens(whole["logprobs"]) == list(THOUGHT)
    assert whole["message"] == {"role": "assistant", "content": "It is 4.",
                                "thinking": "Two plus two."}


def test_native_logprobs_through_the_official_client(api: TestClient, fake: Responder) -> None:
    client = native_client(api)
    script = [CompletionChunk(text="Hi", logprobs=[lp("Hi")]),
              CompletionChunk(text="", logprobs=[Logprob("", -0.25, [], [])])]
    fake.say(script)
    r = client.generate(model="plain", prompt="x", logprobs=True, top_logprobs=2)
    assert r.response == "Hi" and r.logprobs is not None
    assert [(e.token, e.logprob) for e in r.logprobs] == [("Hi", -0.5), ("", -0.25)]
    assert [t.token for t in r.logprobs[0].top_logprobs or []] == ["Hi", "alt"]
    fake.say(script)
    raw = lines(api.post("/api/generate", json={"model": "plain", "prompt": "x",
                                                "logprobs": True}))
    assert raw[-2]["logprobs"] == [{"token": "", "logprob": -0.25}]  # no bytes, no top
    fake.say(["plain text"])
    r = client.generate(model="plain", prompt="x")
    assert r.logprobs is None and fake.last.logprobs is False
    r = client.generate(model="plain", prompt="x", top_logprobs=3)  # without logprobs: none
    assert (fake.last.logprobs, fake.last.top_logprobs) == (False, 0)


# -- OpenAI -------------------------------------------------------------------------------


def test_openai_chat_logprobs(oai: openai.OpenAI, api: TestClient, fake: Responder) -> None:
    script = [CompletionChunk(text="<think>Sum", logprobs=[lp("<think>"), lp("Sum")]),
              CompletionChunk(text=".</think>It is", logprobs=[lp(".</think>"), lp("It is")]),
              CompletionChunk(text=" 4.", logprobs=[lp(" 4.")])]
    fake.say(script)
    r = oai.chat.completions.create(model="thinker", messages=ASK, logprobs=True,
                                    top_logprobs=2)
    assert (fake.last.logprobs, fake.last.top_logprobs) == (True, 2)
    content = r.choices[0].logprobs.content if r.choices[0].logprobs else None
    assert [e.token for e in content or []] == ["<think>", "Sum", ".</think>", "It is", " 4."]
    first = (content or [])[0]
    assert first.logprob == -0.5 and first.bytes == list(b"<think>")
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [("<think>", -0.5),
                                                                  ("alt", -1.5)]

    fake.say(script)
    chunks = list(oai.chat.completions.create(model="thinker", messages=ASK, logprobs=True,
                                              top_logprobs=2, stream=True))
    per_chunk = [[e.token for e in (c.choices[0].logprobs.content or [])]
                 if c.choices and c.choices[0].logprobs else [] for c in chunks]
    deltas = [(getattr(c.choices[0].delta, "reasoning", None), c.choices[0].delta.content)
              for c in chunks]
    # the event with reasoning and content is split in two chunks: the entries go on the
    # first; the finish chunk has none
    assert per_chunk == [["<think>", "Sum"], [".</think>", "It is"], [], [" 4."], []]
    assert deltas[1:4] == [(".", None), (None, "It is"), (None, " 4.")]

    fake.say(["no logprobs asked"])
    r = oai.chat.completions.create(model="plain", messages=ASK, top_logprobs=3)
    assert fake.last.logprobs is False and r.choices[0].logprobs is None
    bad = api.post("/v1/chat/completions", json={"model": "plain", "messages": ASK,
                                                 "logprobs": True, "top_logprobs": 21})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "top_logprobs must be between 0 and 20"


def test_completions_legacy_logprobs(oai: openai.OpenAI, api: TestClient,
                                     fake: Responder) -> None:
    # "é" comes in two byte tokens: its character counts once, at the token that starts it
    script = [CompletionChunk(text="Hi", logprobs=[lp("Hi")]),
              CompletionChunk(text=" é", logprobs=[lp(" \ufffd", -1.0, b" \xc3"),
                                                   lp("\ufffd", -2.0, b"\xa9")]),
              CompletionChunk(text="!", logprobs=[lp("!", -0.25)])]
    fake.say(script)
    r = oai.completions.create(model="plain", prompt="Say", logprobs=2, echo=True)
    assert (fake.last.logprobs, fake.last.top_logprobs) == (True, 2)
    choice = r.choices[0]
    assert choice.text == "SayHi é!" and choice.logprobs is not None
    assert choice.logprobs.tokens == ["Hi", " \ufffd", "\ufffd", "!"]
    assert choice.logprobs.token_logprobs == [-0.5, -1.0, -2.0, -0.25]
    assert choice.logprobs.text_offset == [3, 5, 6, 7]
    assert choice.logprobs.top_logprobs == [{"Hi": -0.5, "alt": -1.5},
                                            {" \ufffd": -1.0, "alt": -2.0},
                                            {"\ufffd": -2.0, "alt": -3.0},
                                            {"!": -0.25, "alt": -1.25}]

    fake.say(script)
    chunks = list(oai.completions.create(model="plain", prompt="Say", logprobs=2,
                                         stream=True))
    pieces = [(c.choices[0].text, c.choices[0].logprobs) for c in chunks]
    assert "".join(text for text, _ in pieces) == "Hi é!"
    assert [lp_.tokens if lp_ else None for _, lp_ in pieces] == [
        ["Hi"], [" \ufffd", "\ufffd"], ["!"], None]
    assert [lp_.text_offset if lp_ else None for _, lp_ in pieces] == [[0], [2, 3], [4], None]

    fake.say(["x"])
    r = oai.completions.create(model="plain", prompt="Say", logprobs=0)
    assert fake.last.logprobs is False and r.choices[0].logprobs is None
    bad = api.post("/v1/completions", json={"model": "plain", "prompt": "x", "logprobs": 21})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "logprobs must be between 0 and 20"


# -- Anthropic ----------------------------------------------------------------------------


def test_anthropic_stop_sequence(claude: anthropic.Anthropic, setup: Setup,
                                 fake: Responder) -> None:
    ask: Any = {"model": "plain", "max_tokens": 50, "messages": ASK}
    setup.ends("stop", "END")
    fake.say(["It is 4."])
    r = claude.messages.create(**ask, stop_sequences=["END", "STOP"])
    assert list(fake.last.options.stop) == ["END", "STOP"]
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", "END")
    fake.say(["It is 4."])
    with claude.messages.stream(**ask, stop_sequences=["END"]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "END")
    events = sse(setup.client.post("/v1/messages", json={**ask, "stream": True,
                                                         "stop_sequences": ["END"]}))
    (delta,) = [data for name, data in events if name == "message_delta"]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}

    # a stop word that is not one of the request's (the template's own) is a natural end
    setup.ends("stop", "<|im_end|>")
    fake.say(["It is 4."])
    r = claude.messages.create(**ask)
    assert (r.stop_reason, r.stop_sequence) == ("end_turn", None)
    setup.ends("stop")
    fake.say(["It is 4."])
    r = claude.messages.create(**ask, stop_sequences=["END"])
    assert (r.stop_reason, r.stop_sequence) == ("end_turn", None)
    setup.ends("length")
    fake.say(["It is"])
    with claude.messages.stream(**ask, stop_sequences=["END"]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("max_tokens", None)
