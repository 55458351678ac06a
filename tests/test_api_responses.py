"""``/v1/responses`` in-process, with a scripted fake runner: the exact wire shapes through
the official ``openai`` client (``responses.create``, ``responses.stream``, ``retrieve``,
``input_items.list``, ``delete``), reasoning items and effort levels, tool calls in both
directions, stored conversations and who may see them, and every refusal.

The real model's answers through a real server are ``tests/test_e2e_responses.py``'s (and
the tool round trip with Qwen2.5-Coder ``tests/test_e2e_tools.py``'s).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from fake_runner import FakeRunnerFactory
from ggufgen import write_tiny_model
from inprocess import openai_client, serving
from pollama.config import Settings
from pollama.keys import KeyStore
from test_api_tools_thinking import PLAIN, THOUGHT, Responder, sse, template

LEVEL = ("{{ if .IsThinkSet }}[think={{ .Think }}/{{ .ThinkLevel }}]{{ end }}"
         "{{- range .Messages }}<|{{ .Role }}|>{{ if .Thinking }}<think>{{ .Thinking }}</think>"
         "{{ end }}{{ .Content }}\n{{ end }}<|assistant|>")
TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}
CALL = ['<tool_call>{"name": "get_weather", ', '"arguments": {"city": "Paris"}}',
        "</tool_call>"]


@pytest.fixture
def fake() -> Responder:
    return Responder()


@pytest.fixture
def api(settings: Settings, tmp_path: Path, fake: Responder) -> Iterator[TestClient]:
    gguf = write_tiny_model(tmp_path / "t.gguf", context_length=8192)
    models = {"tooly": {"template": template(False)}, "thinker": {"template": template(True)},
              "plain": {"template": PLAIN}, "level": {"template": LEVEL}}
    with serving(settings, FakeRunnerFactory(script=fake), {gguf: models}) as client:
        yield client


@pytest.fixture
def oai(api: TestClient) -> openai.OpenAI:
    return openai_client(api)


def test_text_answer_through_the_sdk(oai: openai.OpenAI, fake: Responder) -> None:
    fake.say(["Hello", " there."])
    r = oai.responses.create(model="plain", input="hi", instructions="Be brief.",
                             max_output_tokens=20, temperature=0.5)
    assert r.id.startswith("resp_") and len(r.id) == 53 and r.object == "response"
    assert (r.status, r.output_text, r.model, r.instructions) == (
        "completed", "Hello there.", "plain", "Be brief.")
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert r.usage and r.usage.output_tokens > 0 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert fake.last.prompt == "<|system|>Be brief.\n<|user|>hi\n<|assistant|>"
    assert (fake.last.options.num_predict, fake.last.options.temperature) == (20, 0.5)


def test_stream_events_in_the_order_the_sdk_expects(oai: openai.OpenAI, fake: Responder
                                                    ) -> None:
    fake.say(["Hel", "lo"])
    with oai.responses.stream(model="plain", input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "Hello" and final.status == "completed"
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["Hel", "lo"]


def test_length_limit_is_an_incomplete_response(settings: Settings, tmp_path: Path) -> None:
    gguf = write_tiny_model(tmp_path / "l.gguf", context_length=4096)
    factory = FakeRunnerFactory(script=["a", "b", "c"], done_reason="length")
    with serving(settings, factory, {gguf: {"plain": {"template": PLAIN}}}) as api:
        oai = openai_client(api)
        r = oai.responses.create(model="plain", input="hi", max_output_tokens=3)
        with oai.responses.stream(model="plain", input="hi", max_output_tokens=3) as s:
            streamed = s.get_final_response()
    for answer in (r, streamed):
        assert answer.status == "incomplete" and answer.incomplete_details
        assert answer.incomplete_details.reason == "max_output_tokens"
        assert answer.output_text == "abc"


def test_reasoning_effort_and_reasoning_items(oai: openai.OpenAI, fake: Responder) -> None:
    fake.say(THOUGHT, THOUGHT)
    r = oai.responses.create(model="thinker", input="2+2?", reasoning={"effort": "high"})
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and message.type == "message"
    assert [s.text for s in reasoning.summary] == ["The user wants 2+2."]
    assert r.output_text == "It is 4."
    with oai.responses.stream(model="thinker", input="2+2?", reasoning={"effort": "low"}) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert kinds[2:6] == ["response.output_item.added", "response.reasoning_summary_part.added",
                          "response.reasoning_summary_text.delta",
                          "response.reasoning_summary_text.delta"]
    assert "response.reasoning_summary_text.done" in kinds
    assert [i.type for i in final.output] == ["reasoning", "message"]


@pytest.mark.parametrize(("effort", "level"), [
    ("low", "low"), ("medium", "medium"), ("high", "high"), ("minimal", "low"),
    ("xhigh", "max"), ("max", "max")])
def test_effort_reaches_the_templates_think_level(oai: openai.OpenAI, fake: Responder,
                                                  effort: str, level: str) -> None:
    fake.say(["ok"])
    oai.responses.create(model="level", input="x", reasoning={"effort": effort})  # type: ignore[arg-type]
    assert fake.last.prompt.startswith(f"[think=true/{level}]")


def test_effort_none_turns_thinking_off(oai: openai.OpenAI, fake: Responder) -> None:
    fake.say(["ok"])
    oai.responses.create(model="level", input="x", reasoning={"effort": "none"})
    assert fake.last.prompt == "[think=false/]<|user|>x\n<|assistant|>"


def test_function_call_out_and_its_output_back(oai: openai.OpenAI, fake: Responder) -> None:
    fake.say(CALL, ["It is 22 C."])
    r = oai.responses.create(model="tooly", input="Weather in Paris?", tools=[TOOL])  # type: ignore[list-item]
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id
    follow = [{"role": "user", "content": "Weather in Paris?"}, call.model_dump(),
              {"type": "function_call_output", "call_id": call.call_id, "output": "22 C"}]
    r2 = oai.responses.create(model="tooly", input=follow, tools=[TOOL])  # type: ignore[arg-type,list-item]
    assert r2.output_text == "It is 22 C."
    prompt = fake.last.prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city":"Paris"}}' in prompt
    assert '<tool_response name="get_weather">22 C</tool_response>' in prompt


def test_streamed_function_call_events(oai: openai.OpenAI, fake: Responder) -> None:
    fake.say(CALL)
    with oai.responses.stream(model="tooly", input="Weather?", tools=[TOOL]) as s:  # type: ignore[list-item]
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[2:6] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done", "response.output_item.done"]
    assert final.output[0].type == "function_call"
    assert json.loads(final.output[0].arguments) == {"city": "Paris"}


def test_tool_choice_and_text_format_reach_the_runner(oai: openai.OpenAI, fake: Responder
                                                      ) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fake.say(['{"n": 4}'], ['{"a": 1}'])
    r = oai.responses.create(model="plain", input="n?", text={"format": {
        "type": "json_schema", "name": "n", "schema": schema, "strict": True}})
    assert json.loads(r.output_text) == {"n": 4} and fake.last.format == schema
    oai.responses.create(model="plain", input="x", text={"format": {"type": "json_object"}})
    assert fake.last.format == "json"
    fake.say(CALL)
    oai.responses.create(model="tooly", input="hi", tools=[TOOL], tool_choice="required")  # type: ignore[list-item]
    assert fake.last.format is not None  # a forced call is a grammar over the tools


def _error(r: Any) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["message"]


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"input": [{"type": "web_search_call", "id": "x"}]}, 400,
     'input[0]: unknown input item type "web_search_call" (supported: message, function_call'),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
     'input[0].content[0]: unknown content type "input_audio"'),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, 400,
     "input_file is not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image",
                                               "image_url": "https://x/y.png"}]}]}, 400,
     "pollama does not fetch URLs"),
    ({"input": [{"content": "no type"}]}, 400, "missing required 'type' field"),
    ({"input": [{"role": "robot", "content": "x"}]}, 400, 'invalid role "robot"'),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, 400,
     "invalid reasoning value: 'extreme' (must be one of 'none', 'minimal', 'low'"),
    ({"input": "x", "reasoning": {"summary": "long"}}, 400, "invalid reasoning summary"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, 400,
     'tools[0]: tool type "web_search" is not supported'),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, 400, "invalid text.format type"),
    ({"input": "x", "conversation": "conv_1"}, 400,
     "continue a conversation with previous_response_id"),
    ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens must be a positive"),
    ({}, 400, "input is required"),
    ({"input": "x", "previous_response_id": "resp_nope"}, 404,
     "Response with id 'resp_nope' not found."),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
     400, "input[0]: arguments is not valid JSON"),
])
def test_bad_input_is_a_clear_error(api: TestClient, body: dict[str, Any], status: int,
                                    words: str) -> None:
    r = api.post("/v1/responses", json={"model": "tooly", **body})
    got = _error(r)
    assert got[0] == status and words in got[1], got
    assert r.json()["error"]["type"] == ("not_found_error" if status == 404
                                         else "invalid_request_error")


def test_stored_responses_continue_read_list_and_delete(oai: openai.OpenAI, fake: Responder,
                                                        api: TestClient) -> None:
    fake.say(["Blue."], ["You said blue."])
    first = oai.responses.create(model="plain", input="My color is blue. Say it.")
    assert first.store is True
    second = oai.responses.create(model="plain", input="What did you say?",
                                  previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert fake.last.prompt == ("<|user|>My color is blue. Say it.\n<|assistant|>Blue.\n"
                                "<|user|>What did you say?\n<|assistant|>")
    got = oai.responses.retrieve(first.id)
    assert got.model_dump() == first.model_dump()
    items = oai.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["message"]
    assert items.data[0].content[0].text == "What did you say?"  # type: ignore[union-attr]
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="plain", input="x", previous_response_id=first.id)
    assert api.delete(f"/v1/responses/{first.id}").status_code == 404
    # a continuation of a continuation holds the whole conversation
    fake.say(["Third."])
    oai.responses.create(model="plain", input="And now?", previous_response_id=second.id,
                         instructions="New rules.")
    assert fake.last.prompt.startswith("<|system|>New rules.\n<|user|>My color is blue.")


def test_store_false_keeps_nothing(oai: openai.OpenAI, fake: Responder,
                                   settings: Settings) -> None:
    fake.say(["x"])
    r = oai.responses.create(model="plain", input="hi", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(r.id)


def test_input_items_pages(oai: openai.OpenAI, fake: Responder, api: TestClient) -> None:
    fake.say(["ok"])
    r = oai.responses.create(model="plain", input=[
        {"role": "user", "content": f"m{i}"} for i in range(5)])
    page = api.get(f"/v1/responses/{r.id}/input_items", params={"limit": 2}).json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["m4", "m3"] and page["has_more"]
    rest = api.get(f"/v1/responses/{r.id}/input_items",
                   params={"limit": 10, "after": page["last_id"]}).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["m2", "m1", "m0"]
    assert not rest["has_more"]
    asc = api.get(f"/v1/responses/{r.id}/input_items", params={"order": "asc"}).json()
    assert asc["data"][0]["content"][0]["text"] == "m0"
    bad = api.get(f"/v1/responses/{r.id}/input_items", params={"limit": 101})
    assert _error(bad) == (400, "limit must be between 1 and 100")


def test_a_stored_response_is_visible_only_to_its_key(settings: Settings, tmp_path: Path,
                                                      fake: Responder) -> None:
    keys = KeyStore(settings.api_keys_path)
    alice, _ = keys.create("alice")
    bob, _ = keys.create("bob")
    gguf = write_tiny_model(tmp_path / "k.gguf", context_length=4096)
    with serving(settings, FakeRunnerFactory(script=fake), {}) as api:
        api.headers["Authorization"] = f"Bearer {alice}"
        from inprocess import create_models
        create_models(api, gguf, {"plain": {"template": PLAIN}})
        fake.say(["secret"])
        made = api.post("/v1/responses", json={"model": "plain", "input": "x"}).json()
        ident = made["id"]
        assert api.get(f"/v1/responses/{ident}").status_code == 200
        as_bob = {"Authorization": f"Bearer {bob}"}
        for method, path in (("GET", f"/v1/responses/{ident}"),
                             ("GET", f"/v1/responses/{ident}/input_items"),
                             ("DELETE", f"/v1/responses/{ident}")):
            r = api.request(method, path, headers=as_bob)
            assert _error(r) == (404, f"Response with id '{ident}' not found."), path
        r = api.post("/v1/responses", headers=as_bob, json={
            "model": "plain", "input": "y", "previous_response_id": ident})
        assert r.status_code == 404
        assert api.get(f"/v1/responses/{ident}").json()["output"][0]["content"][0]["text"] == (
            "secret")


def test_a_failure_after_the_stream_began_is_response_failed(settings: Settings,
                                                             tmp_path: Path) -> None:
    gguf = write_tiny_model(tmp_path / "c.gguf", context_length=4096)
    factory = FakeRunnerFactory(script=["one ", "two ", "three"], crash_after=2)
    with serving(settings, factory, {gguf: {"plain": {"template": PLAIN}}}) as api:
        r = api.post("/v1/responses", json={"model": "plain", "input": "x", "stream": True})
    assert r.status_code == 200
    events = sse(r)
    assert [n for n, _ in events][-2:] == ["response.failed", "error"]
    failed = events[-2][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert "response.completed" not in [n for n, _ in events]


def test_a_conversation_longer_than_a_request_is_answered_but_not_stored(
        settings: Settings, tmp_path: Path, fake: Responder) -> None:
    gguf = write_tiny_model(tmp_path / "b.gguf", context_length=4096)
    small = settings.model_copy(update={"max_body_size": 4000})
    with serving(small, FakeRunnerFactory(script=fake), {gguf: {"plain": {"template": PLAIN}}}
                 ) as api:
        oai = openai_client(api)
        fake.say(["a" * 2500], ["b" * 2500], ["c"])
        first = oai.responses.create(model="plain", input="x")
        second = oai.responses.create(model="plain", input="y", previous_response_id=first.id)
        assert first.store and second.store
        third = oai.responses.create(model="plain", input="z", previous_response_id=second.id)
        assert third.store is False  # said in the answer: its turns are over 4000 bytes
        with pytest.raises(openai.NotFoundError):
            oai.responses.retrieve(third.id)
