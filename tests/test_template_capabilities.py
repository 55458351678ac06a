"""Capabilities and output tags inferred from templates (ports of Ollama's tests)."""

from __future__ import annotations

import pathlib

import pytest

from pollama.template import (
    Template,
    go_template_has_tool_round_trip,
    infer_thinking_tags,
    infer_tool_call_tag,
    jinja_capabilities,
    jinja_has_tool_round_trip,
    named_template,
    prefer_jinja_template,
    template_capabilities,
)

GOLDEN = pathlib.Path(__file__).parent / "golden" / "templates"

QWEN3 = (GOLDEN / "tools" / "qwen3.gotmpl").read_text()
QWEN3_THINKING = """
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if and $last .Thinking }}
<think>{{ .Thinking }}</think>
{{ end }}
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}
{{- end }}
{{- end }}{{ if .Tools }}{{ end }}"""

# thinking/template_test.go
THINKING_CASES = [
    (
        """
            {{ if .Thinking}}
                /think
            {{ end }}
            {{- range $i, $_ := .Messages }}
                {{- $last := eq (len (slice $.Messages $i)) 1 -}}
                {{ if and $last .Thinking }}
                    <think>{{ .Thinking }}</think>
                {{ end }}
            {{ end }}
        """,
        ("<think>", "</think>"),
    ),
    (
        """
            {{- range $i, $_ := .Messages }}
                {{- range $j, $_ := .NotMessages }}
                    {{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}
                {{ end }}
            {{ end }}
        """,
        None,
    ),
    (
        """
            {{- range $i, $_ := .Messages }}
                {{ if .Thinking }}
                    Some text before   {{ .Thinking }}    Some text after
                {{ end }}
            {{ end }}
        """,
        ("Some text before", "Some text after"),
    ),
    (QWEN3_THINKING, ("<think>", "</think>")),
    ("{{ .Thinking }}{{ range .Messages }}{{ .Content }}{{ end }}", None),
]


@pytest.mark.parametrize(("text", "tags"), THINKING_CASES)
def test_infer_thinking_tags(text: str, tags: tuple[str, str] | None) -> None:
    assert infer_thinking_tags(Template.parse(text)) == tags


# tools/template_test.go
TOOL_TAG_CASES = [
    ("", "{"),
    ("{{if .ToolCalls}}{{end}}", "{"),
    ("{{if .ToolCalls}}{{range .ToolCalls}}{{ . }}{{end}}{{end}}", "{"),
    ("{{if .ToolCalls}}```json\n{{end}}", "```json"),
    ("{{if .ToolCalls}}[{{range .ToolCalls}}{{ . }}{{end}}]{{end}}", "["),
    ("{{if .ToolCalls}}\n [ {{range .ToolCalls}}{{ . }}{{end}}]{{end}}", "["),
    ("{{if .ToolCalls}}{{range .ToolCalls}}{{ . }}{{end}}]{{end}}", "{"),
    ("{{if .ToolCalls}} {{range .ToolCalls}}{{ . }}{{end}}{{end}}", "{"),
    ("{{if .ToolCalls}}{{range .ToolCalls}}\n{{ . }}\n{{end}}{{end}}", "{"),
    (
        '{{if .ToolCalls}}{{range .ToolCalls}}{"name": "{{ .Function.Name }}", '
        '"arguments": {{ .Function.Arguments }}}{{end}}{{end}}',
        "{",
    ),
    (
        '{{if .ToolCalls}}{{range .ToolCalls}}\r\n{"name": "{{ .Function.Name }}", '
        '"arguments": {{ .Function.Arguments }}}{{end}}{{end}}',
        "{",
    ),
    (
        "{{if .ToolCalls}}<|tool▁calls▁begin|>{{range .ToolCalls}}<|tool▁call▁begin|>function"
        'get_current_weather\n```json\n{"location": "Tokyo"}\n```<|tool▁call▁end|>\n{{end}}'
        "<|tool▁calls▁end|>{{end}}",
        "<|tool▁calls▁begin|>",
    ),
    (
        '{{if .ToolCalls}}{{range .ToolCalls}}<tool_call>{"name": "{{ .Function.Name }}", '
        '"arguments": {{ .Function.Arguments }}}</tool_call>{{end}}{{end}}',
        "<tool_call>",
    ),
    (
        '{{if .ToolCalls}}\n{{range .ToolCalls}}<tool_call>{"name": "{{ .Function.Name }}", '
        '"arguments": {{ .Function.Arguments }}}</tool_call>{{end}}{{end}}',
        "<tool_call>",
    ),
    ("{{if .ToolCalls}}First text{{if .Something}}inner{{end}}Second text{{end}}", "First text"),
    ("{{if .ToolCalls}}Action: ```json{{end}}", "Action: ```json"),
    ("{{if .ToolCalls}}functools[{{end}}", "functools["),
    ("{{if .ToolCalls}}[TOOL_CALL] [{{end}}", "[TOOL_CALL] ["),
    ("{{if .ToolCalls}}[TOOL_CALL][{{end}}", "[TOOL_CALL]["),
    (
        "{{ range .Messages }}{{ if .Content }}x{{ else if .ToolCalls }}<tc>{{ end }}{{ end }}",
        "<tc>",
    ),
]


@pytest.mark.parametrize(("text", "tag"), TOOL_TAG_CASES)
def test_infer_tool_call_tag(text: str, tag: str) -> None:
    assert infer_tool_call_tag(Template.parse(text)) == tag


@pytest.mark.parametrize(
    ("name", "tag"),
    [("qwen2.5", "<tool_call>"), ("mistral", "[TOOL_CALLS] ["), ("llama3.2", "{")],
)
def test_tool_call_tags_of_real_templates(name: str, tag: str) -> None:
    text = (GOLDEN / "tools" / f"{name}.gotmpl").read_text()
    assert infer_tool_call_tag(Template.parse(text)) == tag


def test_go_template_capabilities() -> None:
    chatml = named_template("chatml")
    command_r = named_template("command-r")
    assert chatml is not None and command_r is not None
    assert template_capabilities(Template.parse(chatml.template)) == set()
    assert template_capabilities(Template.parse(command_r.template)) == {"tools"}
    fim = Template.parse("{{ if .Suffix }}<PRE>{{ .Prompt }}<SUF>{{ .Suffix }}{{ end }}")
    assert template_capabilities(fim) == {"insert"}
    assert template_capabilities(Template.parse(QWEN3_THINKING)) == {"tools", "thinking"}
    assert template_capabilities(Template.parse(QWEN3)) == {"tools"}


def test_jinja_capabilities() -> None:
    smollm2 = (GOLDEN / "smollm2-135m-instruct.jinja").read_text()
    assert jinja_capabilities(smollm2) == set()
    assert jinja_capabilities("") == set()
    assert jinja_capabilities("{% if tools %}{{ tools }}{% endif %}") == {"tools"}
    assert jinja_capabilities("<think>{{ t }}</think>") == {"thinking"}
    split = "{% set content = (content.split('</think>')|last) %}"
    assert jinja_capabilities(split) == {"thinking"}
    assert jinja_capabilities(split + "{{ reasoning_content }}") == set()


def test_tool_round_trips() -> None:
    go_with_results = Template.parse(
        '{{ if .Tools }}t{{ end }}{{ range .Messages }}{{ if eq .Role "tool" }}r{{ end }}'
        "{{ range .ToolCalls }}{{ .Function.Name }}{{ end }}{{ end }}"
    )
    go_without_results = Template.parse(
        "{{ if .Tools }}t{{ end }}{{ range .Messages }}{{ range .ToolCalls }}x{{ end }}{{ end }}"
    )
    assert go_template_has_tool_round_trip(go_with_results)
    assert not go_template_has_tool_round_trip(go_without_results)
    assert go_template_has_tool_round_trip(Template.parse(QWEN3))
    assert jinja_has_tool_round_trip(
        "{{ tools }}{% for t in m.tool_calls %}{% endfor %}"
        "{% if message.role == 'tool' %}{% endif %}"
    )
    assert not jinja_has_tool_round_trip("{{ tools }}{{ tool_calls }}")


# server/images_test.go: when the GGUF chat template wins over the Go TEMPLATE
def test_prefer_jinja_with_more_capabilities() -> None:
    jinja = (
        "{% if tools %}{{ tools }}{% endif %}{% set content = (content.split('</think>')|last) %}"
    )
    go = Template.parse(
        "{{ range .Messages }}{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}"
        "{{ .Content }}{{ end }}"
    )
    go_caps = {"completion"} | template_capabilities(go)
    jinja_caps = {"completion"} | jinja_capabilities(jinja)
    assert go_caps == {"completion", "thinking"}
    assert jinja_caps == {"completion", "tools", "thinking"}
    assert prefer_jinja_template(jinja, jinja_caps, go, go_caps)


def test_prefer_jinja_with_stronger_round_trip() -> None:
    jinja = (
        "{% if tools %}{{ tools }}{% endif %}{% for message in messages %}"
        "{% if message.tool_calls %}{% for tool_call in message.tool_calls %}"
        "{{ tool_call.function.name }}{% endfor %}{% endif %}"
        "{% if message.role == 'tool' %}tool_response {{ message.content }}{% endif %}{% endfor %}"
    )
    go = Template.parse(
        "{{ if .Tools }}tools{{ end }}{{ range .Messages }}"
        "{{ range .ToolCalls }}{{ .Function.Name }}{{ end }}{{ end }}"
    )
    go_caps = {"completion"} | template_capabilities(go)
    jinja_caps = {"completion"} | jinja_capabilities(jinja)
    assert go_caps == jinja_caps == {"completion", "tools"}
    assert prefer_jinja_template(jinja, jinja_caps, go, go_caps)


def test_keep_go_template_when_jinja_has_weaker_tool_support() -> None:
    jinja = (
        "{%- if tools and not available_tools -%}{{- set available_tools = tools -}}{%- endif -%}"
        "{%- if thinking -%}<think></think><response></response>{%- endif -%}"
        "{%- for message in messages -%}{{ message['content'] }}{%- endfor -%}"
    )
    go = Template.parse(
        "{{ if .Tools }}tools{{ end }}{{ range .Messages }}"
        '{{ if eq .Role "tool" }}tool_response{{ else }}{{ .Role }}{{ end }}'
        "{{ if .ToolCalls }}<|tool_call|>{{ range .ToolCalls }}{{ .Function.Name }}{{ end }}"
        "{{ else }}{{ .Content }}{{ end }}{{ end }}"
    )
    go_caps = {"completion"} | template_capabilities(go)
    jinja_caps = {"completion"} | jinja_capabilities(jinja)
    assert len(jinja_caps) > len(go_caps)
    assert not prefer_jinja_template(jinja, jinja_caps, go, go_caps)


def test_same_capabilities_without_tools_keep_go_template() -> None:
    go = Template.parse("{{ range .Messages }}{{ .Content }}{{ end }}")
    assert not prefer_jinja_template("{{ messages }}", {"completion"}, go, {"completion"})
