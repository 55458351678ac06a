"""Prompt rendering as Ollama's ``Template.Execute`` does it.

Three sets of golden outputs:

* ``golden/templates/<name>.gotmpl/<conversation>``: Ollama's own ``template/testdata``;
* ``golden/templates/tools/*.out``: Ollama's tool-calling templates rendered by Ollama;
* ``golden/templates/prompts.json``: named, tool, legacy, thinking and fill-in-the-middle cases
  rendered by Ollama's template code under Go (``golden/templates/oracle``).
"""

from __future__ import annotations

import datetime as dt
import json
import pathlib
from typing import Any

import pytest

from pollama.errors import InvalidRequest
from pollama.template import (
    Template,
    collate,
    named_template,
    named_templates,
    render_prompt,
    think_values,
)
from pollama.template._prompt import cut_after_response

GOLDEN = pathlib.Path(__file__).parent / "golden" / "templates"
NOW = dt.datetime(2024, 3, 1, 12, 0, 0)

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user": [{"role": "user", "content": "Hello, how are you?"}],
    "user-assistant-user": [
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
        {"role": "user", "content": "I'd like to show off how chat templating works!"},
    ],
    "system-user-assistant-user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
        {"role": "user", "content": "I'd like to show off how chat templating works!"},
    ],
}

# Ollama's TestTemplate strips one trailing space from these before comparing.
TRAILING_SPACE = {"chatqa", "llama2-chat", "mistral-instruct", "openchat", "vicuna"}


@pytest.mark.parametrize("name", named_templates())
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_named_templates_match_ollama_testdata(name: str, conversation: str) -> None:
    named = named_template(name)
    assert named is not None
    got = render_prompt(Template.parse(named.template), messages=CONVERSATIONS[conversation])
    if name in TRAILING_SPACE and got.endswith(" "):
        got = got[:-1]
    assert got == (GOLDEN / f"{name}.gotmpl" / conversation).read_text()


TOOLS_DIR = GOLDEN / "tools"


@pytest.mark.parametrize("path", sorted(TOOLS_DIR.glob("*.gotmpl")), ids=lambda p: p.stem)
def test_tool_templates_match_ollama_output(path: pathlib.Path) -> None:
    messages = json.loads((TOOLS_DIR / "messages.json").read_text())
    tools = json.loads((TOOLS_DIR / "tools.json").read_text())
    got = render_prompt(Template.parse(path.read_text()), messages=messages, tools=tools)
    assert got == path.with_suffix(".out").read_text()


PROMPT_CASES = json.loads((GOLDEN / "prompts.json").read_text())


@pytest.mark.parametrize("case", PROMPT_CASES, ids=[c["id"] for c in PROMPT_CASES])
def test_prompts_match_go(case: dict[str, Any]) -> None:
    template = Template.parse(case["template"])
    assert template.vars() == case["vars"]
    got = render_prompt(
        template,
        messages=case.get("messages") or [],
        tools=case.get("tools"),
        think=case.get("think"),
        prompt=case.get("prompt", ""),
        suffix=case.get("suffix", ""),
        now=NOW,
    )
    assert got == case["output"]


# -- Ollama's TestExecuteWithMessages: legacy and messages templates agree --------------------

MISTRAL_LEGACY = "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] "
MISTRAL_MESSAGES = (
    "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}\n{{- range .Messages }}\n"
    '{{- if eq .Role "user" }}{{ .Content }}[/INST] {{ else if eq .Role "assistant" }}'
    "{{ .Content }}[INST] {{ end }}\n{{- end }}"
)


@pytest.mark.parametrize(
    "text", [MISTRAL_LEGACY, MISTRAL_LEGACY + "{{ .Response }}", MISTRAL_MESSAGES]
)
def test_mistral_legacy_and_messages_forms_agree(text: str) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant!"},
        {"role": "user", "content": "Hello friend!"},
        {"role": "assistant", "content": "Hello human!"},
        {"role": "user", "content": "What is your name?"},
    ]
    assert render_prompt(Template.parse(text), messages=messages) == (
        "[INST] You are a helpful assistant!\n\n"
        "Hello friend![/INST] Hello human![INST] What is your name?[/INST] "
    )


@pytest.mark.parametrize(
    "text",
    [
        "[INST] {{ .Prompt }}[/INST] ",
        "[INST] {{ .Prompt }}[/INST] {{ .Response }}",
        "\n{{- range $i, $m := .Messages }}\n"
        '{{- if eq .Role "user" }}[INST] {{ .Content }}[/INST] '
        '{{ else if eq .Role "assistant" }}{{ .Content }}{{ end }}\n{{- end }}',
    ],
)
def test_trailing_assistant_message_is_continued(text: str) -> None:
    messages = [
        {"role": "user", "content": "Hello friend!"},
        {"role": "assistant", "content": "Hello human!"},
        {"role": "user", "content": "What is your name?"},
        {"role": "assistant", "content": "My name is Ollama and I"},
    ]
    assert render_prompt(Template.parse(text), messages=messages) == (
        "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] "
        "My name is Ollama and I"
    )


def test_legacy_cut_leaves_the_template_unchanged() -> None:
    t = Template.parse("{{ .Prompt }}|{{ .Response }}|after")
    messages = [{"role": "user", "content": "q"}]
    assert render_prompt(t, messages=messages) == "q|"
    assert render_prompt(t, messages=messages) == "q|"
    assert t.execute({"Prompt": "a", "Response": "b"}) == "a|b|after"
    cut = cut_after_response(t.root)
    assert cut is not t.root and len(cut.nodes) < len(t.root.nodes)


def test_fill_in_the_middle_uses_prompt_and_suffix_only() -> None:
    t = Template.parse(
        "{{- if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>\n"
        "{{- else }}{{ .Prompt }}\n{{- end }}"
    )
    assert render_prompt(t, prompt="def add(", suffix="return x") == (
        "<PRE> def add( <SUF>return x <MID>"
    )
    assert render_prompt(t, messages=[{"role": "user", "content": "hello"}]) == "hello"


def test_system_argument_becomes_the_first_message() -> None:
    t = Template.parse("{{ .System }}|{{ range .Messages }}{{ .Role }};{{ end }}")
    assert render_prompt(t, system="S", messages=[{"role": "user", "content": "u"}]) == (
        "S|system;user;"
    )


# -- Ollama's TestCollate and the think values --------------------------------------------------


def test_collate_merges_consecutive_roles_except_tool() -> None:
    system, merged = collate(
        [
            {"role": "system", "content": "You are helpful"},
            {"role": "user", "content": "Hello"},
            {"role": "user", "content": "How are you?"},
            {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
            {"role": "tool", "content": "72F", "tool_name": "get_temperature"},
            {"role": "System", "content": "Be brief"},
        ]
    )
    assert system == "You are helpful\n\nBe brief"
    assert [(m["role"], m["content"], m.get("tool_name")) for m in merged] == [
        ("system", "You are helpful", None),
        ("user", "Hello\n\nHow are you?", None),
        ("tool", "sunny", "get_weather"),
        ("tool", "72F", "get_temperature"),
        ("system", "Be brief", None),
    ]


def test_collate_does_not_mutate_its_input() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    collate(messages)
    assert messages == [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]


@pytest.mark.parametrize(
    ("think", "expected"),
    [
        (None, (False, "", False)),
        (True, (True, "medium", True)),
        (False, (False, "", True)),
        ("high", (True, "high", True)),
        ("max", (True, "max", True)),
        ("bogus", (False, "bogus", True)),
    ],
)
def test_think_values(think: bool | str | None, expected: tuple[bool, str, bool]) -> None:
    values = think_values(think)
    assert (values["Think"], values["ThinkLevel"], values["IsThinkSet"]) == expected


# -- Ollama's tool argument/property rendering tests ----------------------------------------


def test_tool_call_arguments_print_as_json_and_range_as_a_map() -> None:
    messages = [
        {
            "role": "assistant",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"unit": "celsius", "n": 2}}}
            ],
        }
    ]
    printed = Template.parse(
        "{{- range .Messages }}{{- range .ToolCalls }}{{ .Function.Arguments }}{{- end }}{{- end }}"
    )
    assert render_prompt(printed, messages=messages) == '{"n":2,"unit":"celsius"}'
    ranged = Template.parse(
        "{{- range .Messages }}{{- range .ToolCalls }}{{- range $k, $v := .Function.Arguments }}"
        "{{ $k }}={{ $v }};{{- end }}{{- end }}{{- end }}"
    )
    assert render_prompt(ranged, messages=messages) == "n=2;unit=celsius;"


def test_tool_properties_print_as_json_and_range_with_types() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"location": {"type": "string", "description": "City"}},
                },
            },
        }
    ]
    printed = Template.parse(
        "{{- range .Messages }}{{- end }}{{- range .Tools }}"
        "{{ .Function.Parameters.Properties }}{{- end }}"
    )
    assert render_prompt(printed, messages=[], tools=tools) == (
        '{"location":{"type":"string","description":"City"}}'
    )
    ranged = Template.parse(
        "{{- range .Messages }}{{- end }}{{- range .Tools }}{{- range $name, $prop := "
        ".Function.Parameters.Properties }}{{ $name }}:{{ $prop.Type }};{{- end }}{{- end }}"
    )
    assert render_prompt(ranged, messages=[], tools=tools) == "location:string;"


def test_images_are_bytes_and_json_as_base64() -> None:
    t = Template.parse("{{ range .Messages }}{{ len .Images }} {{ json .Images }}{{ end }}")
    got = render_prompt(t, messages=[{"role": "user", "content": "", "images": ["aGk="]}])
    assert got == '1 ["aGk="]'


def test_malformed_tool_arguments_are_rejected() -> None:
    t = Template.parse("{{ range .Messages }}{{ end }}")
    bad = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}]
    with pytest.raises(InvalidRequest):
        render_prompt(t, messages=bad)
