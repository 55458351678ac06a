"""The Go template engine: golden outputs rendered by Go itself, plus targeted unit tests.

``golden/templates/engine.json`` holds templates executed by Go's ``text/template`` with
Ollama's functions and ``missingkey=zero`` (see ``golden/templates/oracle``). JSON numbers
decode as float64 in Go, so the data is loaded with floats here too.
"""

from __future__ import annotations

import datetime as dt
import json
import pathlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pollama.template as template_pkg
from pollama.errors import InvalidRequest, TemplateError
from pollama.template import Template

GOLDEN = pathlib.Path(__file__).parent / "golden" / "templates"
NOW = dt.datetime(2024, 3, 1, 12, 0, 0)  # the oracle's fixed clock

ENGINE_CASES = json.loads((GOLDEN / "engine.json").read_text())

# Execution errors whose text cannot match Go's: Go names the static type of a value read
# from a map[string]any ("interface {}"), and Go 1.19 fails `len` of nil inside reflect.
MESSAGE_DIFFERS = {"field-on-string", "len-nil-error"}


def go_data(data: Any) -> Any:
    return json.loads(json.dumps(data), parse_int=float)


def render(text: str, data: Any = None, **kwargs: Any) -> str:
    return Template.parse(text, append_response=False).execute(data, now=NOW, **kwargs)


@pytest.mark.parametrize("case", ENGINE_CASES, ids=[c["id"] for c in ENGINE_CASES])
def test_engine_matches_go(case: dict[str, Any]) -> None:
    if "output" in case:
        assert render(case["template"], go_data(case["data"])) == case["output"]
        return
    with pytest.raises(TemplateError) as info:
        render(case["template"], go_data(case["data"]))
    if case["id"] not in MESSAGE_DIFFERS:
        assert str(info.value) == case["error"]


def test_golden_file_covers_parse_and_exec_errors() -> None:
    errors = [c for c in ENGINE_CASES if "error" in c]
    assert any(c["id"].startswith("err-") for c in errors)
    assert any("executing" in c["error"] for c in errors)
    assert len(ENGINE_CASES) > 100


# -- readable unit tests of the semantics prompts depend on ----------------------------------


def test_trim_markers_remove_all_ascii_whitespace_on_their_side() -> None:
    assert render("a \n\t {{- 1 }} \n b") == "a1 \n b"
    assert render("a \n {{ 1 -}} \n\t b") == "a \n 1b"
    assert render("{{- 3 }}") == "3"
    assert render("{{-3}}") == "-3"  # no space after the dash: a negative number


def test_range_else_and_index_variables() -> None:
    text = "{{ range $i, $m := .l }}{{ $i }}:{{ $m }} {{ else }}empty{{ end }}"
    assert render(text, {"l": ["a", "b"]}) == "0:a 1:b "
    assert render(text, {"l": []}) == "empty"
    assert render(text, {}) == "empty"


def test_range_over_map_is_sorted_by_key() -> None:
    assert render("{{ range $k, $v := . }}{{ $k }}{{ $v }}{{ end }}", {"b": 2, "a": 1}) == "a1b2"


def test_variable_assignment_reaches_outer_scope_but_declaration_does_not() -> None:
    assert render("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}") == "2"
    assert render("{{ $x := 1 }}{{ if true }}{{ $x := 2 }}{{ end }}{{ $x }}") == "1"


def test_printf_and_eq_with_several_arguments() -> None:
    assert render('{{ printf "%s=%d %q" "a" 3 "b" }}') == 'a=3 "b"'
    assert render('{{ eq .r "user" "system" }}', {"r": "system"}) == "true"
    assert render('{{ eq .r "user" "system" }}', {"r": "tool"}) == "false"


def test_and_or_return_the_deciding_value_and_short_circuit() -> None:
    assert render('{{ or .a "fallback" }}', {"a": ""}) == "fallback"
    assert render('{{ and "x" .a }}', {"a": "y"}) == "y"
    assert render("{{ and 0 (index .l 99) }}", {"l": []}) == "0"
    with pytest.raises(TemplateError, match="index out of range"):
        render("{{ and 1 (index .l 99) }}", {"l": []})


def test_missing_keys_print_no_value_and_are_falsy() -> None:
    assert render("[{{ .x }}]{{ if .x }}yes{{ else }}no{{ end }}", {}) == "[<no value>]no"


def test_field_of_a_missing_value_is_nil_instead_of_an_error() -> None:
    # Go fails here ("nil pointer evaluating interface {}.b"); a nil is more useful.
    assert render("{{ .a.b }}", {}) == "<no value>"


# -- Go features newer than the oracle's toolchain (hand-checked against the Go docs) -------


def test_range_over_an_integer() -> None:
    assert render("{{ range 3 }}{{ . }}{{ end }}") == "012"
    assert render("{{ range $i := 2 }}{{ $i }}{{ end }}") == "01"
    assert render("{{ range 0 }}x{{ else }}none{{ end }}") == "none"
    with pytest.raises(TemplateError, match="more than one variable"):
        render("{{ range $i, $e := 2 }}{{ end }}")


def test_else_with_chain() -> None:
    text = "{{ with .a }}A{{ . }}{{ else with .b }}B{{ . }}{{ else }}C{{ end }}"
    assert render(text, {"a": 1, "b": 2}) == "A1"
    assert render(text, {"b": 2}) == "B2"
    assert render(text, {}) == "C"


def test_json_uses_short_escapes_for_backspace_and_form_feed() -> None:
    assert render('{{ json "\\b\\f" }}') == '"\\b\\f"'


# -- the Response touch-up and variables -----------------------------------------------------

PARSE_VARS = [
    ("{{ .Prompt }}", ["prompt", "response"]),
    ("{{ .System }} {{ .Prompt }}", ["prompt", "response", "system"]),
    ("{{ .System }} {{ .Prompt }} {{ .Response }}", ["prompt", "response", "system"]),
    (
        "{{ with .Tools }}{{ . }}{{ end }} {{ .System }} {{ .Prompt }}",
        ["prompt", "response", "system", "tools"],
    ),
    ("{{ range .Messages }}{{ .Role }} {{ .Content }}{{ end }}", ["content", "messages", "role"]),
    (
        '{{ range .Messages }}{{ if eq .Role "tool" }}Tool Result: {{ .ToolName }} '
        "{{ .Content }}{{ end }}{{ end }}",
        ["content", "messages", "role", "toolname"],
    ),
    (
        '{{ $system := "" }}{{ range $i, $m := .Messages }}{{ $m.Content }}{{ end }}',
        ["$m", "content", "messages"],  # declarations are not identifiers, uses are
    ),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_VARS)
def test_vars_match_ollama(text: str, expected: list[str]) -> None:
    assert Template.parse(text).vars() == expected


def test_variables_are_field_names_as_written() -> None:
    t = Template.parse("{{ $.System }}{{ range $m := .Messages }}{{ $m.Content }}{{ end }}")
    assert t.variables() == {"System", "Messages", "Content"}
    assert t.has_var("MESSAGES")


def test_prompt_only_template_gets_a_response_action() -> None:
    t = Template.parse("{{ .Prompt }}")
    assert t.execute({"Prompt": "p", "Response": "r"}) == "pr"
    assert t.text == "{{ .Prompt }}" == str(t)
    messages = Template.parse("{{ range .Messages }}{{ .Content }}{{ end }}")
    assert messages.execute({"Messages": [{"Content": "x"}], "Response": "r"}) == "x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{{ .Prompt ", "template: :1: unclosed action"),
        ('{{define "x"}}{{template "x"}}{{end}}{{template "x"}}', "undefined template specified"),
        ("{{ if .x }}", "template: :1: unexpected EOF"),
        ("{{ nosuchfunc }}", 'template: :1: function "nosuchfunc" not defined'),
        ("line1\n{{ $x }}", 'template: :2: undefined variable "$x"'),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as info:
        Template.parse(text)
    assert str(info.value) == message
    assert isinstance(info.value, InvalidRequest)


def test_template_without_pipeline_is_fine_outside_ollama_mode() -> None:
    text = '{{ define "x" }}X{{ end }}{{ template "x" }}'
    assert render(text) == "X"


# -- bounds and the sandbox -------------------------------------------------------------------


def test_infinite_template_recursion_is_stopped() -> None:
    text = '{{ define "r" }}{{ template "r" . }}{{ end }}{{ template "r" . }}'
    with pytest.raises(TemplateError, match="exceeded maximum template depth"):
        render(text)


def test_step_budget_stops_long_loops() -> None:
    with pytest.raises(TemplateError, match="exceeded 1000 steps"):
        render("{{ range 100000 }}x{{ end }}", max_steps=1000)
    assert render("{{ range 10 }}x{{ end }}", max_steps=1000) == "x" * 10


def test_output_budget_stops_exponential_strings() -> None:
    text = '{{ $s := "ab" }}{{ range 40 }}{{ $s = printf "%s%s" $s $s }}{{ end }}{{ $s }}'
    with pytest.raises(TemplateError, match="exceeds 4096 characters"):
        render(text, max_output=4096)


def test_deep_nesting_is_a_parse_error_not_a_crash() -> None:
    deep_ifs = "{{ if 1 }}" * 500 + "x" + "{{ end }}" * 500
    with pytest.raises(TemplateError, match="nested"):
        Template.parse(deep_ifs)
    deep_parens = "{{ " + "(" * 500 + "1" + ")" * 500 + " }}"
    with pytest.raises(TemplateError, match="nested"):
        Template.parse(deep_parens)


class _Spy:
    """An object that fails the test if the engine touches it beyond its type."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"attribute {name} read")

    def __str__(self) -> str:
        raise AssertionError("str() called")

    __repr__ = __str__

    def __len__(self) -> int:
        raise AssertionError("len() called")

    def __iter__(self) -> Any:
        raise AssertionError("iterated")


@pytest.mark.parametrize(
    "text",
    [
        "{{ .x.Secret }}",
        "{{ .x }}",
        "{{ len .x }}",
        "{{ range .x }}{{ end }}",
        "{{ if .x }}{{ end }}",
        "{{ index .x 0 }}",
    ],
)
def test_python_objects_are_opaque(text: str) -> None:
    with pytest.raises(TemplateError):
        render(text, {"x": _Spy()})


def test_python_objects_print_only_their_type_in_printf_and_json() -> None:
    assert render('{{ printf "%v" .x }}|{{ json .x }}', {"x": _Spy()}) == (
        "%!v(unsupported _Spy=%!v(unsupported _Spy))|"
    )


def test_dates_come_from_the_injected_clock() -> None:
    assert render("{{ currentDate }} {{ yesterdayDate }}") == "2024-03-01 2024-02-29"


def test_public_api() -> None:
    assert sorted(template_pkg.__all__) == sorted(
        [
            "DEFAULT_TEMPLATE",
            "MAX_RENDER_OUTPUT",
            "MAX_RENDER_STEPS",
            "NamedTemplate",
            "RenderBudget",
            "RenderLimitExceeded",
            "Template",
            "collate",
            "detect_named_template",
            "go_template_has_tool_round_trip",
            "infer_thinking_tags",
            "infer_tool_call_tag",
            "jinja_capabilities",
            "jinja_has_tool_round_trip",
            "named_template",
            "named_templates",
            "prefer_jinja_template",
            "render_prompt",
            "template_capabilities",
            "think_values",
        ]
    )
    for name in template_pkg.__all__:
        assert hasattr(template_pkg, name)


# -- properties -------------------------------------------------------------------------------

_TEMPLATE_ALPHABET = list("{}-./$()|:=\"'`, \n\tabxy01") + [
    "if ", "else ", "end", "range ", "with ", "define ", "template ", "block ", "break",
    "continue", "nil", "true", ".X", "$x", "printf ", "len ", "index ", "slice ", "and ",
    "eq ", "json ", "{{", "}}", "{{- ", " -}}", "/*", "*/",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_TEMPLATE_ALPHABET), max_size=30).map("".join))
def test_arbitrary_text_parses_or_raises_template_error(text: str) -> None:
    try:
        t = Template.parse(text)
    except TemplateError:
        return
    try:
        t.execute({"X": [1, "a", {"b": None}], "Y": "s"}, max_steps=10_000)
    except TemplateError:
        pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@given(_json_values)
def test_json_function_output_is_valid_json_of_the_same_value(value: Any) -> None:
    # Go writes integral floats without a fraction; read them back as floats.
    assert json.loads(render("{{ json .v }}", {"v": value}), parse_int=float) == value
