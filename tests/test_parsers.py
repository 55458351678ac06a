"""Output parsers (thinking, tool calls), tag inference, and ``format`` checking.

Tool-call and thinking cases are Ollama's own (``tools/tools_test.go``,
``thinking/parser_test.go``) plus recorded outputs of the common families: Qwen/Hermes
``<tool_call>``, Llama 3 bare JSON, Mistral ``[TOOL_CALLS]``. Every case is also fed one
character at a time: streaming must never change the result.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pollama.errors import InvalidRequest
from pollama.inference.parsers import (
    OutputParser,
    Parsed,
    ThinkingParser,
    ToolCallParser,
    thinking_tags_for,
    tool_call_tag_for,
    tool_names,
)
from pollama.inference.prompt import PromptTemplate
from pollama.inference.structured import normalize_format, tool_call_schema
from pollama.template.jinja import JinjaChatTemplate

# -- thinking -----------------------------------------------------------------------------


def think(chunks: list[str]) -> tuple[str, str]:
    parser = ThinkingParser("<think>", "</think>")
    thinking, content = "", ""
    for chunk in chunks:
        t, c = parser.add(chunk)
        thinking, content = thinking + t, content + c
    t, c = parser.finish()
    return thinking + t, content + c


@pytest.mark.parametrize(
    ("text", "thinking", "content"),
    [
        ("<think> internal </think> world", "internal ", "world"),
        ("<think>a</think><think>b</think>c", "a", "<think>b</think>c"),
        ("no think", "", "no think"),
        ("  abc <think>def</think> ghi", "", "  abc <think>def</think> ghi"),
        ("\n<think>\nstep 1\nstep 2\n</think>\n\nThe answer is 4.", "step 1\nstep 2\n",
         "The answer is 4."),
        ("<think>abc</thing>def</think>ghi", "abc</thing>def", "ghi"),
        ("<think>unfinished thought</th", "unfinished thought</th", ""),  # flushed at the end
        ("  <thi", "", "  <thi"),  # a partial tag that never completed is content
        ("", "", ""),
    ],
)
def test_thinking_whole_and_streamed(text: str, thinking: str, content: str) -> None:
    assert think([text]) == (thinking, content)
    assert think(list(text)) == (thinking, content)


def test_thinking_streaming_steps() -> None:
    parser = ThinkingParser("<think>", "</think>")
    assert parser.add("  <th") == ("", "")
    assert parser.add("in") == ("", "")
    assert parser.add("k>a") == ("a", "")
    assert parser.add("bc</th") == ("bc", "")  # the partial closing tag is held back
    assert parser.add("ing>d") == ("</thing>d", "")
    assert parser.add("</think>") == ("", "")
    assert parser.done
    assert parser.add("  \n") == ("", "")  # whitespace after the closing tag is eaten
    assert parser.add(" hi ") == ("", "hi ")
    assert parser.add(" there") == ("", " there")


def test_thinking_prefilled_opening_tag() -> None:
    parser = ThinkingParser("<think>", "</think>")
    parser.add("<think>")  # what the service does when the prompt ends with the tag
    assert parser.add("reasoning</think>answer") == ("reasoning", "answer")


# -- tool calls ---------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": n, "description": n, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    for n in ("get_temperature", "get_conditions", "say_hello", "say_hello_world", "add")
]
NAMES = tool_names(TOOLS)


def run_tools(tag: str, chunks: list[str]) -> tuple[str, list[tuple[str, dict[str, Any], int]]]:
    parser = OutputParser(None, ToolCallParser(tag, NAMES))
    out = Parsed()
    for chunk in chunks:
        out.extend(parser.add(chunk))
    out.extend(parser.finish())
    ids = [c.id for c in out.tool_calls]
    assert all(i.startswith("call_") and len(i) == 13 for i in ids) and len(set(ids)) == len(ids)
    return out.content, [(c.name, c.arguments, c.index) for c in out.tool_calls]


QWEN_CALL = '<tool_call>\n{"name": "get_temperature", "arguments": {"city": "Paris"}}\n</tool_call>'

TOOL_CASES = [
    # (tag, raw output, content, calls)
    ("<tool_call>", "Hello, how can I help you today?", "Hello, how can I help you today?", []),
    ("<tool_call>", "", "", []),
    ("<tool_call>", QWEN_CALL, "", [("get_temperature", {"city": "Paris"}, 0)]),
    ("<tool_call>", '<tool_call>{"name": "get_conditions", "arguments": {}}</tool_call>', "",
     [("get_conditions", {}, 0)]),
    ("<tool_call>", "Let me check the weather. " + QWEN_CALL, "Let me check the weather. ",
     [("get_temperature", {"city": "Paris"}, 0)]),
    ("<tool_call>", "I'll use the say_hello tool. ", "I'll use the say_hello tool. ", []),
    ("<tool_call>",
     'Both! <tool_call>{"name": "get_temperature", "arguments": {"city": "London"}}</tool_call>'
     '<tool_call>{"name": "get_conditions", "arguments": {"city": "Tokyo"}}</tool_call>',
     "Both! ", [("get_temperature", {"city": "London"}, 0),
                ("get_conditions", {"city": "Tokyo"}, 1)]),
    # the longest name at the same position wins; arguments given as a JSON string
    ("<tool_call>", '<tool_call>{"name": "say_hello_world", "arguments": "{\\"x\\": 1}"}',
     "", [("say_hello_world", {"x": 1}, 0)]),
    # Hermes-style "parameters"
    ("<tool_call>", '<tool_call>{"name": "add", "parameters": {"a": 1, "b": 2}}</tool_call>',
     "", [("add", {"a": 1, "b": 2}, 0)]),
    # text after the tag that never parses stays content (Ollama drops it)
    ("<tool_call>", "Sure <tool_call>{not json", "Sure <tool_call>{not json", []),
    ("<tool_call>", "<tool_call>{\"name\": \"unknown_tool\"}</tool_call>",
     "<tool_call>{\"name\": \"unknown_tool\"}</tool_call>", []),
    # small Qwen models often drop the marker: a leading JSON call is still a call
    ("<tool_call>", '\n{"name": "get_temperature", "arguments": {"city": "Rome"}}', "",
     [("get_temperature", {"city": "Rome"}, 0)]),
    ("<tool_call>", '{"answer": 4}', '{"answer": 4}', []),
    ("<tool_call>", '  \n', '  \n', []),
    ("<tool_call>", 'Use {"name": "add", "arguments": {}}', 'Use {"name": "add", "arguments": {}}',
     []),
    # Mistral
    ("[TOOL_CALLS]",
     '[TOOL_CALLS] [{"name": "get_temperature", "arguments": {"city": "London"}}, '
     '{"name": "get_conditions", "arguments": {"city": "Tokyo"}}]',
     "", [("get_temperature", {"city": "London"}, 0), ("get_conditions", {"city": "Tokyo"}, 1)]),
    # Llama 3: bare JSON, only at the very start
    ("{", '{"name": "get_temperature", "parameters": {"city": "Tokyo"}}', "",
     [("get_temperature", {"city": "Tokyo"}, 0)]),
    ("{", '  {"get_conditions": {"city": "Oslo"}}', "  ",
     [("get_conditions", {"city": "Oslo"}, 0)]),
    ("{", 'Sure: {"name": "get_temperature", "parameters": {"city": "Tokyo"}}',
     'Sure: {"name": "get_temperature", "parameters": {"city": "Tokyo"}}', []),
    ("{", '{"answer": 42} is the JSON', '{"answer": 42} is the JSON', []),
    ("{", '{"answer": ', '{"answer": ', []),  # cut off: given back at the end
    ("[", '[{"name": "add", "arguments": {"a": 1}}]', "", [("add", {"a": 1}, 0)]),
]


@pytest.mark.parametrize(("tag", "raw", "content", "calls"), TOOL_CASES)
def test_tool_calls_whole_and_streamed(
    tag: str, raw: str, content: str, calls: list[tuple[str, dict[str, Any], int]]
) -> None:
    assert run_tools(tag, [raw]) == (content, calls)
    assert run_tools(tag, list(raw)) == (content, calls)


def test_tool_calls_stream_as_soon_as_parsed() -> None:
    parser = ToolCallParser("<tool_call>", NAMES)
    assert parser.add("Checking. <tool") == ([], "Checking. ")
    assert parser.add('_call>\n{"name": "get_temp') == ([], "")
    calls, content = parser.add('erature", "arguments": {"city": "Rome"}}')
    assert content == "" and [c.name for c in calls] == ["get_temperature"]
    assert calls[0].arguments == {"city": "Rome"}
    assert parser.add("\n</tool_call>") == ([], "")
    assert parser.finish() == ""


def test_argument_order_is_kept() -> None:
    _, calls = run_tools("<tool_call>", [
        '<tool_call>{"name": "add", "arguments": {"z": 1, "a": 2, "m": 3}}</tool_call>'])
    assert list(calls[0][1]) == ["z", "a", "m"]


def test_forced_call_parser_is_primed() -> None:
    parser = ToolCallParser("<tool_call>", NAMES)
    parser.prime()  # the prompt ends with the tag
    calls, content = parser.add('{"name": "add", "arguments": {"a": 1}}')
    assert content == "" and calls[0].name == "add"


def test_thinking_then_tool_call() -> None:
    parser = OutputParser(ThinkingParser("<think>", "</think>"),
                          ToolCallParser("<tool_call>", NAMES))
    out = Parsed()
    for ch in "<think>I need the weather.</think>\n\n" + QWEN_CALL:
        out.extend(parser.add(ch))
    out.extend(parser.finish())
    assert out.thinking == "I need the weather."
    assert out.content == "" and [c.name for c in out.tool_calls] == ["get_temperature"]


# -- tags from templates --------------------------------------------------------------------

QWEN_GO = (
    "{{- if .Messages }}{{- if .Tools }}<|im_start|>system\n# Tools\n<tools>"
    "{{- range .Tools }}\n{\"type\": \"function\", \"function\": {{ .Function }}}{{- end }}\n"
    "</tools>\nReturn <tool_call></tool_call> tags.<|im_end|>\n{{ end }}"
    "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 -}}"
    "{{- if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n"
    "{{ else if eq .Role \"assistant\" }}<|im_start|>assistant\n"
    "{{ if .Content }}{{ .Content }}{{- else if .ToolCalls }}<tool_call>\n"
    "{{ range .ToolCalls }}{\"name\": \"{{ .Function.Name }}\", \"arguments\": "
    "{{ .Function.Arguments }}}\n{{ end }}</tool_call>{{ end }}"
    "{{ if not $last }}<|im_end|>\n{{ end }}"
    "{{ else if eq .Role \"tool\" }}<|im_start|>user\n<tool_response>\n{{ .Content }}\n"
    "</tool_response><|im_end|>\n{{ end }}"
    "{{- if and (ne .Role \"assistant\") $last }}<|im_start|>assistant\n{{ end }}"
    "{{- end }}{{- else }}{{ .Prompt }}{{ end }}"
)
MISTRAL_GO = (
    "{{- range $index, $_ := .Messages }}{{- if eq .Role \"user\" }}"
    "{{- if and $.Tools (le (len (slice $.Messages $index)) 2) }}[AVAILABLE_TOOLS] "
    "{{ $.Tools }}[/AVAILABLE_TOOLS]{{- end }}[INST] {{ .Content }}[/INST]"
    "{{- else if eq .Role \"assistant\" }}{{- if .Content }} {{ .Content }}"
    "{{- else if .ToolCalls }}[TOOL_CALLS] [{{- range .ToolCalls }}{\"name\": "
    "\"{{ .Function.Name }}\", \"arguments\": {{ .Function.Arguments }}}{{- end }}]"
    "{{- end }}</s>{{- else if eq .Role \"tool\" }}[TOOL_RESULTS] {\"content\": "
    "{{ .Content }}} [/TOOL_RESULTS]{{- end }}{{- end }}"
)
LLAMA31_GO = (
    "{{- range $i, $_ := .Messages }}{{- if eq .Role \"user\" }}<|start_header_id|>user"
    "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{- else if eq .Role \"assistant\" }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{- if .ToolCalls }}"
    "{{ range .ToolCalls }}{\"name\": \"{{ .Function.Name }}\", \"parameters\": "
    "{{ .Function.Arguments }}}{{ end }}{{- else }}{{ .Content }}{{- end }}<|eot_id|>"
    "{{- end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ $.Tools }}"
)
THINK_GO = (
    "{{- range .Messages }}<|{{ .Role }}|>{{ if .Thinking }}<think>{{ .Thinking }}</think>"
    "{{ end }}{{ .Content }}{{ end }}<|assistant|>{{ if .Think }}<think>{{ end }}"
)


@pytest.mark.parametrize(
    ("template", "tag"),
    # Ollama's rule cuts the text before "{" only: this template's tag keeps its " [".
    [(QWEN_GO, "<tool_call>"), (MISTRAL_GO, "[TOOL_CALLS] ["), (LLAMA31_GO, "{"),
     ("{{ .Prompt }}", "{")],
)
def test_tool_call_tag_of_go_templates(template: str, tag: str) -> None:
    t = PromptTemplate.from_go(template)
    assert tool_call_tag_for(t) == tag
    assert ("tools" in t.capabilities()) == (template != "{{ .Prompt }}")


def test_tags_of_jinja_templates() -> None:
    qwen = JinjaChatTemplate("{% if tools %}<tools>{{ tools }}</tools>{% endif %}"
                             "<tool_call>{{ messages }}")
    assert tool_call_tag_for(PromptTemplate.from_jinja(qwen)) == "<tool_call>"
    mistral = JinjaChatTemplate("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]")
    assert tool_call_tag_for(PromptTemplate.from_jinja(mistral)) == "[TOOL_CALLS]"
    llama = JinjaChatTemplate("{% if tools %}{{ tools | tojson }}{% endif %}ipython")
    assert tool_call_tag_for(PromptTemplate.from_jinja(llama)) == "{"
    thinker = JinjaChatTemplate("{{ messages }}<think>\n</think>")
    assert thinking_tags_for(PromptTemplate.from_jinja(thinker)) == ("<think>", "</think>")
    assert thinking_tags_for(PromptTemplate.from_jinja(llama)) is None


def test_thinking_tags_of_go_templates() -> None:
    assert thinking_tags_for(PromptTemplate.from_go(THINK_GO)) == ("<think>", "</think>")
    assert thinking_tags_for(PromptTemplate.from_go(QWEN_GO)) is None


# -- format ------------------------------------------------------------------------------


def test_format_values() -> None:
    assert normalize_format(None) is None and normalize_format("") is None
    assert normalize_format("json") == "json"
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    assert normalize_format(schema) is schema
    with pytest.raises(InvalidRequest) as err:
        normalize_format("xml")
    assert str(err.value) == (
        'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object')
    with pytest.raises(InvalidRequest, match="invalid format"):
        normalize_format([1, 2])


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "obj"}, "'/type'"),
        ({"type": "object", "properties": {"age": {"type": "int"}}}, "'/properties/age/type'"),
        ({"properties": {"a/b": {"type": "string", "minLength": -1}}},
         "'/properties/a~1b/minLength'"),
        ({"type": "array", "items": {"enum": []}}, "'/items/enum'"),
        ({"anyOf": []}, "'/anyOf'"),
        ({"anyOf": [{"type": "string"}, 5]}, "'/anyOf/1'"),
        ({"required": "name"}, "'/required'"),
        ({"$ref": "https://example.com/schema.json"}, "'/$ref'"),
        ({"properties": {"x": {"$ref": "#/$defs/missing"}}}, "'/properties/x/$ref'"),
        ({"maximum": "ten"}, "'/maximum'"),
    ],
)
def test_bad_schemas_name_the_part(schema: dict[str, Any], where: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        normalize_format(schema)
    assert where in str(err.value) and "invalid JSON schema in format" in str(err.value)


def test_good_schema_with_local_refs() -> None:
    schema = {
        "$defs": {"city": {"type": "string", "pattern": "^[A-Z]"}},
        "type": "object",
        "properties": {"cities": {"type": "array", "items": {"$ref": "#/$defs/city"}},
                       "n": {"type": ["integer", "null"], "minimum": 0}},
        "additionalProperties": False,
    }
    assert normalize_format(schema) is schema


def test_tool_call_schema() -> None:
    one = tool_call_schema(TOOLS, "add")
    assert one["properties"]["name"] == {"enum": ["add"]}
    assert one["properties"]["arguments"] == TOOLS[-1]["function"]["parameters"]
    assert one["required"] == ["name", "arguments"]
    anyof = tool_call_schema(TOOLS)
    assert [o["properties"]["name"]["enum"][0] for o in anyof["anyOf"]] == NAMES
    assert normalize_format(anyof) is anyof  # what goes to the worker is a valid schema
    json.dumps(anyof)
