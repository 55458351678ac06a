"""Real tool calls from a real model, through the real CLI and the three official clients.

Qwen2.5-Coder-0.5B-Instruct (``tests/models.py``: fetched once, cached across runs) is
created with ``pollama create`` from a Modelfile, then offered a weather tool through
``/api/chat`` (``ollama``), ``/v1/chat/completions`` (``openai``) and ``/v1/messages``
(``anthropic``), streaming and not: each must come back as a parsed call. The tool's answer
is then fed back in each protocol's own shape and the model must reply in words.

Greedy decoding keeps the outputs fixed. This 0.5B model writes its call as bare JSON
(without the ``<tool_call>`` marker its template asks for), which the parser accepts as
llama.cpp's does; and given the tool's answer alone it calls the tool again, so the last
turn adds a short user follow-up, as a chat user would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
from fastapi.testclient import TestClient

from conftest import RunningServer, start_server, stop_server
from ggufgen import write_tiny_model
from models import qwen_coder_fixture  # noqa: F401 - provides the fixture qwen_coder

pytestmark = pytest.mark.slow

MODEL = "qwen-coder"
QUESTION = "How is the weather in Paris?"
RESULT = "It is 22 degrees and sunny in Paris."
FOLLOW_UP = "Thanks. So, what is the weather in Paris? Reply in plain text."
PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string", "description": "The city name"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": PARAMETERS}}
CLAUDE_TOOL = {"name": "get_weather", "description": "Get the current weather for a city",
               "input_schema": PARAMETERS}


@pytest.fixture(scope="module")
def srv(qwen_coder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("qwen-home")
    running = start_server(home)
    modelfile = home / "Modelfile"
    modelfile.write_text(f"FROM {qwen_coder}\nPARAMETER temperature 0\n")
    running.cli("create", MODEL, "-f", str(modelfile), check=True, timeout=300)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def native(srv: RunningServer) -> Iterator[ollama.Client]:
    client = ollama.Client(host=srv.url, timeout=300)
    yield client
    client.close()


def test_capabilities_and_refusal(native: ollama.Client) -> None:
    assert native.show(MODEL).capabilities == ["completion", "tools", "insert"]
    with pytest.raises(ollama.ResponseError) as err:
        native.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], think=True)
    assert err.value.status_code == 400 and "does not support thinking" in err.value.error


def test_ollama_client(native: ollama.Client) -> None:
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    options = {"num_predict": 64}
    r = native.chat(model=MODEL, messages=messages, tools=[WEATHER], options=options)
    (call,) = r.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert "paris" in str(call.function.arguments.get("city", "")).lower()
    assert r.done_reason == "stop"

    parts = list(native.chat(model=MODEL, messages=messages, tools=[WEATHER], options=options,
                             stream=True))
    streamed = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [c.function.name for c in streamed] == ["get_weather"] and parts[-1].done

    history = [*messages, r.message,
               {"role": "tool", "content": RESULT, "tool_name": "get_weather"},
               {"role": "user", "content": FOLLOW_UP}]
    final = native.chat(model=MODEL, messages=history, tools=[WEATHER], options=options)
    assert not final.message.tool_calls and "22" in final.message.content


def test_openai_client(srv: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=300)
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    args: dict[str, Any] = {"model": MODEL, "tools": [WEATHER], "temperature": 0,
                            "max_tokens": 64}
    r = client.chat.completions.create(messages=messages, **args)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
    assert r.usage and r.usage.completion_tokens > 0

    chunks = list(client.chat.completions.create(messages=messages, stream=True, **args))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls if tc.function] == ["get_weather"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    history = [*messages,
               {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": RESULT},
               {"role": "user", "content": FOLLOW_UP}]
    final = client.chat.completions.create(messages=history, **args)
    assert final.choices[0].finish_reason == "stop"
    assert not final.choices[0].message.tool_calls
    assert "22" in (final.choices[0].message.content or "")

    # tool_choice "required" gets a call though nothing was asked
    forced = client.chat.completions.create(
        messages=[{"role": "user", "content": "I am going to Rome tomorrow."}],
        tool_choice="required", **args)
    assert forced.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in forced.choices[0].message.tool_calls or []] == [
        "get_weather"]


def test_anthropic_client(srv: RunningServer) -> None:
    client = anthropic.Anthropic(base_url=srv.url, api_key="unused", timeout=300)
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    args: dict[str, Any] = {"model": MODEL, "tools": [CLAUDE_TOOL], "max_tokens": 64}
    r = client.messages.create(messages=messages, **args)
    assert r.stop_reason == "tool_use"
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and "paris" in str(use.input["city"]).lower()  # type: ignore[index]

    with client.messages.stream(messages=messages, **args) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [b.name for b in streamed.content if b.type == "tool_use"] == ["get_weather"]

    history = [*messages, {"role": "assistant", "content": [use.model_dump()]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": use.id, "content": RESULT},
                   {"type": "text", "text": FOLLOW_UP}]}]
    final = client.messages.create(messages=history, **args)
    assert final.stop_reason == "end_turn"
    assert [b.type for b in final.content] == ["text"]
    assert "22" in final.content[0].text  # type: ignore[union-attr]


RESPONSES_TOOL = {"type": "function", "name": "get_weather",
                  "description": "Get the current weather for a city", "parameters": PARAMETERS}


def test_responses_client(srv: RunningServer) -> None:
    """The Responses API's round trip: a function_call item out, its function_call_output
    back, both stateless (the whole history sent) and stored (``previous_response_id``)."""
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=300)
    args: dict[str, Any] = {"model": MODEL, "tools": [RESPONSES_TOOL], "temperature": 0,
                            "max_output_tokens": 64}
    r = client.responses.create(input=QUESTION, **args)
    (call,) = [item for item in r.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    assert "paris" in json.loads(call.arguments)["city"].lower()

    with client.responses.stream(input=QUESTION, **args) as stream:
        streamed = stream.get_final_response()
    assert [i.name for i in streamed.output if i.type == "function_call"] == ["get_weather"]

    answer = [{"type": "function_call_output", "call_id": call.call_id, "output": RESULT},
              {"role": "user", "content": FOLLOW_UP}]
    stored = client.responses.create(input=answer, previous_response_id=r.id, **args)
    stateless = client.responses.create(
        input=[{"role": "user", "content": QUESTION}, call.model_dump(), *answer], **args)
    for final in (stored, stateless):
        assert not [i for i in final.output if i.type == "function_call"]
        assert "22" in final.output_text
    assert stored.output_text == stateless.output_text  # the same conversation either way


# A Qwen3-style template: the generation prompt opens the thought when thinking is on.
THINKING_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n{% if enable_thinking is not defined or enable_thinking %}"
    "<think>\n{% else %}<think>\n\n</think>\n\n{% endif %}"
)


def test_tiny_thinking_model_on_a_real_worker(api: TestClient, tmp_path: Path) -> None:
    """No thinking model ships on PyPI: a random-weight one shows the wire shapes for real.

    The prompt ends inside ``<think>``, so whatever the model writes is reasoning: it must
    arrive as ``thinking`` (never as content) with thinking on, and as content with it off.
    """
    gguf = write_tiny_model(tmp_path / "think.gguf", chat_template=THINKING_JINJA,
                            context_length=512)
    data = gguf.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert api.post(f"/api/blobs/{digest}", content=data).status_code == 201
    r = api.post("/api/create", json={"model": "thinky", "files": {"t.gguf": digest},
                                      "stream": False})
    assert r.status_code == 200, r.text
    assert "thinking" in api.post("/api/show", json={"model": "thinky"}).json()["capabilities"]
    # Greedy decoding of random weights gives blanks (eaten as the thought's leading space),
    # so sample, with a seed.
    sampling = {"temperature": 1.5, "seed": 7, "top_k": 400}
    body = {"model": "thinky", "messages": [{"role": "user", "content": "hello"}],
            "options": {"num_predict": 8, **sampling}, "stream": False}
    message = api.post("/api/chat", json=body).json()["message"]
    assert message["thinking"] and message["content"] == ""
    off = api.post("/api/chat", json={**body, "think": False}).json()["message"]
    assert "thinking" not in off and off["content"]
    r = api.post("/v1/chat/completions", json={
        "model": "thinky", "messages": body["messages"], "max_tokens": 8, **sampling})
    choice = r.json()["choices"][0]
    assert choice["message"]["reasoning"] and choice["message"]["content"] == ""
