"""``/v1/responses`` through real ``pollama serve`` processes and the real SmolLM2-135M, with
the official ``openai`` client: text, streaming, JSON schema (``responses.parse``), a stored
conversation continued by id (its prompt cache hit shown in ``cached_tokens``), the same
conversation continued after a restart, and stored responses kept apart per API key.

The tool round trip runs with Qwen2.5-Coder-0.5B in ``tests/test_e2e_tools.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from pydantic import BaseModel

from conftest import MODEL, RunningServer, create_default_model, start_server, stop_server
from pollama.keys import KeyStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(model_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{model_server.url}/v1", api_key="unused", timeout=300) as c:
        yield c


def test_create_and_stream_a_text_answer(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=24,
                                temperature=0, store=False)
    assert r.status in ("completed", "incomplete") and r.output_text.strip()
    assert r.usage and r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 24
    with client.responses.stream(model=MODEL, input="Say hello.", max_output_tokens=24,
                                 temperature=0, store=False) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == r.output_text  # greedy: the same answer


class Person(BaseModel):
    name: str
    age: int


def test_json_schema_output_parses(client: openai.OpenAI) -> None:
    r = client.responses.parse(model=MODEL, input="Make up a person: name and age.",
                               text_format=Person, temperature=0, max_output_tokens=60,
                               store=False)
    assert isinstance(r.output_parsed, Person) and r.output_parsed.name


def test_a_stored_conversation_continues_from_the_prompt_cache(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My favourite colour is green.",
                                    instructions="Answer in one short sentence.",
                                    max_output_tokens=24, temperature=0)
    second = client.responses.create(model=MODEL, input="What is my favourite colour?",
                                     instructions="Answer in one short sentence.",
                                     previous_response_id=first.id, max_output_tokens=24,
                                     temperature=0)
    assert first.usage and second.usage
    # the whole first turn is in the second prompt, and its tokens came from the cache
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    assert client.responses.retrieve(second.id).output_text == second.output_text


def _keys(home: Path) -> tuple[str, str]:
    keys = KeyStore(home / ".ollama" / "api_keys.json")
    return keys.create("alice")[0], keys.create("bob")[0]


def test_stored_responses_survive_a_restart_and_stay_with_their_key(isolated_env: Path
                                                                   ) -> None:
    home = isolated_env
    alice, bob = _keys(home)
    server = start_server(home, {"OLLAMA_API_KEY": alice})
    try:
        create_default_model(server, home)
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=alice, timeout=300) as c:
            first = c.responses.create(model=MODEL, input="Remember the number 7.",
                                       max_output_tokens=16, temperature=0)
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=bob, timeout=300) as other:
            with pytest.raises(openai.NotFoundError):
                other.responses.retrieve(first.id)
            with pytest.raises(openai.NotFoundError):
                other.responses.create(model=MODEL, input="x", previous_response_id=first.id)
            with pytest.raises(openai.NotFoundError):
                other.responses.delete(first.id)
    finally:
        stop_server(server)
    server = start_server(home, {"OLLAMA_API_KEY": alice})
    try:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=alice, timeout=300) as c:
            assert c.responses.retrieve(first.id).output_text == first.output_text
            follow = c.responses.create(model=MODEL, input="Which number?",
                                        previous_response_id=first.id, max_output_tokens=16,
                                        temperature=0)
            assert first.usage and follow.usage
            assert follow.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
            assert [i.type for i in c.responses.input_items.list(follow.id).data] == ["message"]
    finally:
        stop_server(server)
