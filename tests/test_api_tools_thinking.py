"""Tool calls, thinking, ``format`` and ``tool_choice`` on every protocol, in-process.

The server runs with :class:`fake_runner.FakeRunner` replaying scripted model output
(one script per completion, in order), so each wire shape is checked exactly, through the
official ``ollama``, ``openai`` and ``anthropic`` clients where users would use them. The
models are tiny GGUFs created through ``/api/create`` with Go templates that grant
``tools`` and ``thinking``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
from fastapi.testclient import TestClient

from fake_runner import FakeRunnerFactory
from ggufgen import write_tiny_model
from inprocess import serving
from pollama.config import Settings
from pollama.runner.base import CompletionRequest


def template(thinking: bool) -> str:
    think = "{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}" if thinking else ""
    return (
        "{{- if .Tools }}<tools>{{ json .Tools }}</tools>\n{{ end }}"
        "{{- range .Messages }}<|{{ .Role }}|>" + think +
        "{{- if .ToolCalls }}<tool_call>{{ range .ToolCalls }}{\"name\": "
        "\"{{ .Function.Name }}\", \"arguments\": {{ .Function.Arguments }}}{{ end }}"
        "</tool_call>{{ end }}"
        "{{- if eq .Role \"tool\" }}<tool_response name=\"{{ .ToolName }}\">{{ .Content }}"
        "</tool_response>{{ else }}{{ .Content }}{{ end }}\n{{ end }}<|assistant|>"
    )


PLAIN = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}\n{{ end }}<|assistant|>"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                         "parameters": {"type": "object", "properties": {}}}}
CALL = ["Let me check. ", '<tool_call>{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}', "</tool_call>"]
THOUGHT = ["<think>", "The user wants", " 2+2.", "</think>", "\n\n", "It is ", "4."]
Script = Sequence[str] | Callable[[CompletionRequest], Sequence[str]]


class Responder:
    """The fake model: each completion replays the next queued script and is recorded."""

    def __init__(self) -> None:
        self.queue: list[Script] = []
        self.requests: list[CompletionRequest] = []

    def __call__(self, request: CompletionRequest) -> Sequence[str]:
        self.requests.append(request)
        script = self.queue.pop(0) if self.queue else ["ok"]
        return script(request) if callable(script) else script

    def say(self, *scripts: Script) -> None:
        self.queue = list(scripts)
        self.requests.clear()

    @property
    def last(self) -> CompletionRequest:
        return self.requests[-1]


@pytest.fixture
def fake() -> Responder:
    return Responder()


@pytest.fixture
def api(settings: Settings, tmp_path: Path, fake: Responder) -> Iterator[TestClient]:
    gguf = write_tiny_model(tmp_path / "t.gguf", context_length=8192)
    models = {"tooly": {"template": template(False)}, "thinker": {"template": template(True)},
              "plain": {"template": PLAIN}}
    with serving(settings, FakeRunnerFactory(script=fake), {gguf: models}) as client:
        yield client


def lines(response: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines() if line]


def sse(response: Any) -> list[tuple[str | None, Any]]:
    """(event name, data) pairs of a server-sent event stream."""
    out = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = ""
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


# -- capabilities and refusals ------------------------------------------------------------


def test_capabilities_follow_the_template(api: TestClient) -> None:
    caps = {n: api.post("/api/show", json={"model": n}).json()["capabilities"]
            for n in ("tooly", "thinker", "plain")}
    assert caps == {"tooly": ["completion", "tools"],
                    "thinker": ["completion", "tools", "thinking"], "plain": ["completion"]}


def test_refusals_use_each_protocols_shape(api: TestClient, fake: Responder) -> None:
    chat = {"model": "plain", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    r = api.post("/api/chat", json={**chat, "tools": [WEATHER]})
    assert (r.status_code, r.json()) == (
        400, {"error": "registry.ollama.ai/library/plain:latest does not support tools"})
    r = api.post("/api/chat", json={**chat, "think": True})
    assert (r.status_code, r.json()) == (400, {"error": '"plain" does not support thinking'})
    r = api.post("/api/generate", json={"model": "plain", "prompt": "x", "think": "high"})
    assert r.json() == {"error": '"plain" does not support thinking'}
    r = api.post("/api/chat", json={**chat, "think": "extreme"})
    assert r.status_code == 400 and r.json()["error"] == (
        'invalid think value: "extreme" (must be "high", "medium", "low", "max", true, or false)')
    r = api.post("/api/chat", json={**chat, "top_logprobs": 21})
    assert r.json() == {"error": "top_logprobs must be between 0 and 20"}
    assert api.post("/api/chat", json={**chat, "think": False}).status_code == 200
    r = api.post("/v1/chat/completions", json={**chat, "tools": [WEATHER]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = api.post("/v1/chat/completions", json={**chat, "reasoning_effort": "extreme"})
    assert r.status_code == 400 and "invalid reasoning value" in r.json()["error"]["message"]
    # Anthropic drops thinking for a model that cannot think, as Ollama does
    fake.say(["hello"])
    r = api.post("/v1/messages", json={"model": "plain", "max_tokens": 5, "messages": [
        {"role": "user", "content": "hi"}], "thinking": {"type": "enabled", "budget_tokens": 9}})
    assert r.status_code == 200 and r.json()["content"] == [{"type": "text", "text": "hello"}]


# -- tool calls ---------------------------------------------------------------------------


def test_native_chat_tool_calls(native: ollama.Client, fake: Responder) -> None:
    fake.say(CALL)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = native.chat(model="tooly", messages=messages, tools=[WEATHER])
    assert '<tools>[{"type":"function","function":{"name":"get_weather"' in fake.last.prompt
    assert r.message.content == "Let me check. "
    (call,) = r.message.tool_calls or []
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    assert r.done_reason == "stop"

    fake.say(CALL)
    parts = list(native.chat(model="tooly", messages=messages, tools=[WEATHER], stream=True))
    with_calls = [p for p in parts if p.message.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done and parts[-1].done
    assert "".join(p.message.content for p in parts) == "Let me check. "

    # the call and the tool's answer go back through the template; the model answers
    fake.say(["It is 22 degrees."])
    history = [*messages, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "content": "22C", "tool_name": "get_weather"}]
    r = native.chat(model="tooly", messages=history, tools=[WEATHER])
    assert ('<tool_call>{"name": "get_weather", "arguments": {"city":"Paris"}}</tool_call>'
            in fake.last.prompt)
    assert '<tool_response name="get_weather">22C</tool_response>' in fake.last.prompt
    assert r.message.content == "It is 22 degrees." and not r.message.tool_calls


def test_native_wire_shape_of_a_call(api: TestClient, fake: Responder) -> None:
    fake.say(['<tool_call>{"name": "get_weather", "arguments": {"z": 1, "city": "Oslo"}}'])
    body = {"model": "tooly", "messages": [{"role": "user", "content": "?"}],
            "tools": [WEATHER], "stream": False}
    message = api.post("/api/chat", json=body).json()["message"]
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and len(call["id"]) == 13
    assert call["function"] == {"index": 0, "name": "get_weather",
                                "arguments": {"z": 1, "city": "Oslo"}}
    assert list(call["function"]["arguments"]) == ["z", "city"]  # the model's order
    # text that never parses as a call is kept as content, not lost or an error
    fake.say(["<tool_call>{oops"])
    message = api.post("/api/chat", json=body).json()["message"]
    assert message == {"role": "assistant", "content": "<tool_call>{oops"}


def test_openai_tool_calls(oai: openai.OpenAI, fake: Responder) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    fake.say(CALL)
    r = oai.chat.completions.create(model="tooly", messages=messages, tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check. "
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    fake.say(CALL)
    chunks = list(oai.chat.completions.create(model="tooly", messages=messages,
                                              tools=[WEATHER], stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    (tool_delta,) = [d for d in deltas if d.tool_calls]
    assert tool_delta.tool_calls[0].index == 0
    assert json.loads(tool_delta.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"

    # the tool's answer, named from the earlier call's id
    fake.say(["22 degrees."])
    history = [*messages, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "22C"}]
    r = oai.chat.completions.create(model="tooly", messages=history, tools=[WEATHER])
    assert '<tool_response name="get_weather">22C</tool_response>' in fake.last.prompt
    assert r.choices[0].message.content == "22 degrees." and r.choices[0].finish_reason == "stop"
    bad = [*history[:1], {**history[1], "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]
    with pytest.raises(openai.BadRequestError, match="invalid tool call arguments"):
        oai.chat.completions.create(model="tooly", messages=bad)


def test_anthropic_tool_use(claude: anthropic.Anthropic, fake: Responder) -> None:
    tool = {"name": "get_weather", "description": "Current weather",
            "input_schema": WEATHER["function"]["parameters"]}
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    fake.say(CALL)
    r = claude.messages.create(model="tooly", max_tokens=50, messages=messages, tools=[tool])
    assert r.stop_reason == "tool_use"
    assert [b.type for b in r.content] == ["text", "tool_use"]
    use = r.content[1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}

    fake.say(CALL)
    with claude.messages.stream(model="tooly", max_tokens=50, messages=messages,
                                tools=[tool]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]

    fake.say(["22 degrees."])
    history = [*messages, {"role": "assistant", "content": [
        {"type": "tool_use", "id": use.id, "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": [{"type": "text", "text": "22C"}]}]}]
    r = claude.messages.create(model="tooly", max_tokens=50, messages=history, tools=[tool])
    assert '<tool_response name="get_weather">22C</tool_response>' in fake.last.prompt
    assert r.content[0].type == "text" and r.stop_reason == "end_turn"


# -- tool_choice ----------------------------------------------------------------------------


def test_tool_choice(oai: openai.OpenAI, claude: anthropic.Anthropic, fake: Responder) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    # none: no tools in the prompt, nothing parsed
    fake.say(CALL)
    r = oai.chat.completions.create(model="tooly", messages=messages, tools=[WEATHER, TIME],
                                    tool_choice="none")
    assert "<tools>" not in fake.last.prompt and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == "".join(CALL)
    # required: the tag is prefilled and the call's JSON is constrained to the tools
    fake.say(['{"name": "get_weather", "arguments": {"city": "Oslo"}}'])
    r = oai.chat.completions.create(model="tooly", messages=messages, tools=[WEATHER, TIME],
                                    tool_choice="required")
    assert fake.last.prompt.endswith("<|assistant|><tool_call>\n")
    assert [o["properties"]["name"] for o in fake.last.format["anyOf"]] == [
        {"enum": ["get_weather"]}, {"enum": ["get_time"]}]
    (call,) = r.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    # a named function
    fake.say(['{"name": "get_time", "arguments": {}}'])
    r = oai.chat.completions.create(
        model="tooly", messages=messages, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert fake.last.format["properties"]["name"] == {"enum": ["get_time"]}
    assert r.choices[0].message.tool_calls[0].function.name == "get_time"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        oai.chat.completions.create(
            model="tooly", messages=messages, tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}})
    # Anthropic's "any"
    fake.say(['{"name": "get_weather", "arguments": {"city": "Oslo"}}'])
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
    m = claude.messages.create(model="tooly", max_tokens=50, messages=messages, tools=[tool],
                               tool_choice={"type": "any"})
    assert m.stop_reason == "tool_use" and m.content[0].type == "tool_use"
    assert fake.last.format["properties"]["arguments"] == WEATHER["function"]["parameters"]


# -- thinking -----------------------------------------------------------------------------


def test_native_thinking(native: ollama.Client, api: TestClient, fake: Responder) -> None:
    messages = [{"role": "user", "content": "2+2?"}]
    fake.say(THOUGHT)
    r = native.chat(model="thinker", messages=messages)  # thinking models think by default
    assert (r.message.thinking, r.message.content) == ("The user wants 2+2.", "It is 4.")
    fake.say(THOUGHT)
    parts = list(native.chat(model="thinker", messages=messages, think="high", stream=True))
    thinking = [p.message.thinking for p in parts if p.message.thinking]
    content = [p.message.content for p in parts if p.message.content]
    assert "".join(thinking) == "The user wants 2+2." and "".join(content) == "It is 4."
    assert not any(p.message.thinking and p.message.content for p in parts)
    # think false: no separation, the raw text is the content
    fake.say(THOUGHT)
    r = native.chat(model="thinker", messages=messages, think=False)
    assert r.message.thinking is None and r.message.content == "".join(THOUGHT)
    # generate has a top-level thinking field
    fake.say(THOUGHT)
    g = api.post("/api/generate", json={"model": "thinker", "prompt": "2+2?", "stream": False})
    body = g.json()
    assert (body["thinking"], body["response"]) == ("The user wants 2+2.", "It is 4.")
    # thinking sent back in history reaches the template
    fake.say(["ok"])
    native.chat(model="thinker", messages=[
        *messages, {"role": "assistant", "content": "4", "thinking": "easy"},
        {"role": "user", "content": "and 3+3?"}])
    assert "<|assistant|><think>easy</think>4" in fake.last.prompt


def test_openai_reasoning(oai: openai.OpenAI, api: TestClient, fake: Responder) -> None:
    messages: list[Any] = [{"role": "user", "content": "2+2?"}]
    fake.say(THOUGHT)
    r = oai.chat.completions.create(model="thinker", messages=messages, reasoning_effort="low")
    message = r.choices[0].message
    assert message.content == "It is 4."
    assert (message.model_extra or {})["reasoning"] == "The user wants 2+2."
    assert (message.model_extra or {})["reasoning_content"] == "The user wants 2+2."
    # a chunk with both reasoning and content is split in two, as Ollama does
    fake.say(["<think>hmm</think>yes"])
    events = sse(api.post("/v1/chat/completions", json={
        "model": "thinker", "messages": messages, "stream": True}))
    deltas = [d["choices"][0]["delta"] for _, d in events if d != "[DONE]" and d["choices"]]
    assert deltas[0] == {"role": "assistant", "reasoning": "hmm", "reasoning_content": "hmm"}
    assert deltas[1] == {"content": "yes"} and deltas[-1] == {}
    assert events[-1] == (None, "[DONE]")


def test_anthropic_thinking(claude: anthropic.Anthropic, api: TestClient,
                            fake: Responder) -> None:
    messages: list[Any] = [{"role": "user", "content": "2+2?"}]
    fake.say(THOUGHT)
    r = claude.messages.create(model="thinker", max_tokens=50, messages=messages,
                               thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking == "The user wants 2+2."  # type: ignore[union-attr]
    fake.say(THOUGHT + ["<tool_call>", '{"name": "get_weather", "arguments": {"city": "X"}}'])
    response = api.post("/v1/messages", json={
        "model": "thinker", "max_tokens": 50, "messages": messages, "stream": True,
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]})
    events = sse(response)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    starts = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    assert events[0][1]["message"]["usage"]["input_tokens"] > 0  # known before any token
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert stops == [0, 1, 2]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    fake.say(THOUGHT)
    with claude.messages.stream(model="thinker", max_tokens=50, messages=messages) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[1].text == "It is 4."  # type: ignore[union-attr]


# -- format -------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}},
          "required": ["answer"]}


def test_format_is_checked_and_passed_down(api: TestClient, oai: openai.OpenAI,
                                           fake: Responder) -> None:
    chat = {"model": "plain", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    r = api.post("/api/chat", json={**chat, "format": "xml"})
    assert (r.status_code, r.json()["error"]) == (
        400, 'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object')
    r = api.post("/api/generate", json={"model": "plain", "prompt": "x",
                                        "format": {"type": "object", "properties": 3}})
    assert r.status_code == 400 and "'/properties'" in r.json()["error"]
    with pytest.raises(openai.BadRequestError, match="/properties/answer/type"):
        oai.chat.completions.create(
            model="plain", messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"properties": {"answer": {"type": "int"}}}}})
    fake.say(['{"answer": 4}'])
    assert api.post("/api/chat", json={**chat, "format": "json"}).status_code == 200
    assert fake.last.format == "json"
    fake.say(['{"answer": 4}'])
    r = oai.chat.completions.create(
        model="plain", messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert fake.last.format == SCHEMA and json.loads(r.choices[0].message.content or "")
    fake.say(["{}"])
    oai.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}],
                                response_format={"type": "json_object"})
    assert fake.last.format == "json"


def test_format_on_a_thinking_model_applies_after_the_thinking(
    api: TestClient, native: ollama.Client, fake: Responder
) -> None:
    first = ["<think>", "I should answer", " 4.", "</think>", "\n\n", "The ans"]
    fake.say(first, ['{"answer": 4}'])
    r = native.chat(model="thinker", messages=[{"role": "user", "content": "2+2?"}],
                    format=SCHEMA)
    unconstrained, constrained = fake.requests
    assert unconstrained.format is None and constrained.format == SCHEMA
    assert constrained.prompt == unconstrained.prompt + "<think>I should answer 4.</think>\n\n"
    assert r.message.thinking == "I should answer 4." and r.message.content == '{"answer": 4}'
    assert r.eval_count == len(first) + 1  # both phases count

    # a model that answers without thinking is constrained from the original prompt
    fake.say(["Sure"], ['{"answer": 4}'])
    body = api.post("/api/generate", json={"model": "thinker", "prompt": "2+2?",
                                           "format": "json", "stream": False}).json()
    assert body["response"] == '{"answer": 4}' and "thinking" not in body
    assert fake.requests[1].prompt == fake.requests[0].prompt
    # think false: constrained from the start, one pass
    fake.say(['{"answer": 4}'])
    native.chat(model="thinker", messages=[{"role": "user", "content": "2+2?"}],
                format=SCHEMA, think=False)
    assert [q.format for q in fake.requests] == [SCHEMA]


# -- /v1/completions ------------------------------------------------------------------------


def test_completions_echo(oai: openai.OpenAI, fake: Responder) -> None:
    fake.say([" blue", "."])
    r = oai.completions.create(model="plain", prompt="The sky is", echo=True, max_tokens=5)
    assert r.choices[0].text == "The sky is blue." and r.choices[0].finish_reason == "stop"
    fake.say([" blue", "."])
    chunks = list(oai.completions.create(model="plain", prompt="The sky is", echo=True,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "The sky is blue."
    assert chunks[-1].choices == [] and chunks[-1].usage and chunks[-1].usage.completion_tokens
