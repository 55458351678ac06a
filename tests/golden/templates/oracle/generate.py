# ruff: noqa: E501 -- a table of template strings, one case per line, reads best unwrapped
"""Regenerate the Go-rendered golden files for pollama's template tests.

Run from the repository root with a Go toolchain (1.19 or newer) on PATH:

    python tests/golden/templates/oracle/generate.py

It renders every case below with ``main.go`` (Go's own ``text/template`` plus Ollama's
template code, see that file) and writes ``engine.json`` and ``prompts.json`` next to this
directory. The tests only read those JSON files, so Go is not needed to run them.

The goldens were generated with Go 1.19 (Debian's golang-1.19-go). Cases that need newer Go
(range over an int, ``else with``, JSON's ``\\b``/``\\f`` escapes) are written by hand in the
tests instead. ``main.go`` gives Ollama's ``templateToolFunction`` a JSON ``String`` method:
that is pollama's one deliberate difference from Ollama HEAD (see ``pollama.template._prompt``).
"""

from __future__ import annotations

import json
import pathlib
import subprocess

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE.parent
NAMED = GOLDEN.parents[2] / "src" / "pollama" / "template" / "named"

E = []  # engine cases: template executed over JSON data (numbers decode as float64)


def e(id_: str, template: str, data: object = None) -> None:
    E.append({"id": id_, "mode": "raw", "template": template, "data": data})


# --- text, trimming, comments -----------------------------------------------------------
e("text", "hello world")
e("trim-both", "a  \n {{- 1 -}} \n\t b")
e("trim-left-only", "a  {{- 1 }}  b")
e("trim-right-only", "a  {{ 1 -}}  b")
e("trim-needs-space", "a {{-3}} b")
e("comment", "a{{/* a comment */}}b")
e("comment-trimmed", "a \n {{- /* c */ -}} \n b")
e("comment-multiline", "a{{/* one\ntwo */}}b")
e("newline-in-action", "{{ if\n.a }}yes{{\nend }}", {"a": 1})
# --- literals ---------------------------------------------------------------------------
e("string-escapes", '{{ "a\\tb\\u00e9\\x41\\"q\\\\" }}')
e("raw-string", "{{ `a\\n{{b}}` }}")
e("char-constant", "{{ 'a' }} {{ '\\n' }}")
e("numbers", "{{ 1.5 }} {{ 1e3 }} {{ 0x10 }} {{ 1_000 }} {{ 0o17 }} {{ 010 }} {{ 1.0 }} {{ -7 }}")
e("bools", "{{ true }} {{ false }}")
e(
    "float-formatting",
    "{{ .a }} {{ .b }} {{ .c }} {{ .d }} {{ .e }} {{ .f }} {{ .g }} {{ .h }}",
    {
        "a": 1000000,
        "b": 0.00001,
        "c": 3,
        "d": 123456.7,
        "e": 1e21,
        "f": 0.0001,
        "g": -2.5,
        "h": 123456,
    },
)
# --- fields and printing ----------------------------------------------------------------
e("field", "{{ .a.b }}", {"a": {"b": "x"}})
e("missing-field", "[{{ .missing }}]", {"a": 1})
e("missing-nested", "[{{ .a.missing }}]", {"a": {}})
e("dollar", "{{ with .a }}{{ $.b }}{{ end }}", {"a": 1, "b": "root"})
e("print-map", "{{ . }}", {"b": [1, "x", None, True], "a": {"z": 1, "y": "s"}})
e("print-list", "{{ .l }}", {"l": [1.5, "a b", [], {}, None]})
e("print-nil-data", "{{ . }}")
e("print-bool-number", "{{ .t }} {{ .n }}", {"t": True, "n": 2})
# --- variables --------------------------------------------------------------------------
e("var-declare-assign", "{{ $x := 1 }}{{ $x }}{{ $x = 2 }}{{ $x }}")
e("var-scope-if", "{{ $x := 1 }}{{ if true }}{{ $x := 2 }}{{ $x }}{{ end }}{{ $x }}")
e("var-assign-in-if", "{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}")
e(
    "var-assign-in-range",
    '{{ $s := "" }}{{ range .l }}{{ $s = printf "%s%v" $s . }}{{ end }}{{ $s }}',
    {"l": [1, 2, 3]},
)
e("var-dollar-field", "{{ $m := .m }}{{ $m.k }}", {"m": {"k": "v"}})
e("var-decl-not-printed", "{{ $x := 5 }}|")
# --- if / else -------------------------------------------------------------------------
e(
    "if-else-if",
    '{{ range .l }}{{ if eq . "a" }}A{{ else if eq . "b" }}B{{ else }}?{{ end }}{{ end }}',
    {"l": ["a", "b", "c"]},
)
e(
    "truthiness",
    "{{ range .l }}{{ if . }}T{{ else }}F{{ end }}{{ end }}",
    {"l": [0, 0.0, "", [], {}, None, False, "0", 1, [0], {"a": 0}, True, -1]},
)
e("if-decl", "{{ if $x := .a }}{{ $x }}{{ end }}", {"a": "v"})
# --- with ------------------------------------------------------------------------------
e(
    "with",
    "{{ with .a }}[{{ . }}]{{ else }}none{{ end }}{{ with .b }}[{{ . }}]{{ else }}none{{ end }}",
    {"a": "x", "b": ""},
)
e("with-var", "{{ with $v := .a }}{{ $v }}{{ . }}{{ end }}", {"a": 3})
# --- range ------------------------------------------------------------------------------
e("range-list-index", "{{ range $i, $e := .l }}{{ $i }}={{ $e }};{{ end }}", {"l": ["a", "b"]})
e("range-one-var", "{{ range $e := .l }}{{ $e }}{{ end }}", {"l": ["a", "b"]})
e(
    "range-map-sorted",
    "{{ range $k, $v := .m }}{{ $k }}={{ $v }};{{ end }}",
    {"m": {"b": 2, "a": 1, "C": 3, "aa": 4}},
)
e(
    "range-else",
    "{{ range .l }}x{{ else }}empty{{ end }}|{{ range .missing }}x{{ else }}none{{ end }}",
    {"l": []},
)
e(
    "range-break-continue",
    "{{ range .l }}{{ if eq . 2.0 }}{{ continue }}{{ end }}{{ if eq . 4.0 }}{{ break }}{{ end }}{{ . }}{{ end }}",
    {"l": [1, 2, 3, 4, 5]},
)
e(
    "range-nested-dollar",
    "{{ range .a }}{{ range $.b }}{{ . }}{{ end }}{{ end }}",
    {"a": [1, 2], "b": ["x", "y"]},
)
e("range-over-string", "{{ range .s }}{{ . }}{{ end }}", {"s": "abc"})
# --- and / or / not ---------------------------------------------------------------------
e(
    "and-or-values",
    '{{ and 1 0 2 }}|{{ or 0 "" "x" }}|{{ and 1 2 }}|{{ or 0 false }}|{{ and }}',
    None,
)
e("and-or-values-ok", '{{ and 1 0 2 }}|{{ or 0 "" "x" }}|{{ and 1 2 }}|{{ or 0 false }}')
e("or-short-circuit", "{{ or 1 (index .l 10) }}|{{ and 0 (index .l 10) }}", {"l": []})
e("and-pipe-final", "{{ 0 | and 1 }}|{{ 5 | or 0 }}")
e("not", "{{ not 0 }} {{ not 1 }} {{ not .missing }} {{ not .l }}", {"l": [1]})
# --- comparisons ------------------------------------------------------------------------
e("eq-multi", '{{ eq 1 2 3 1 }} {{ eq .s "a" "b" }} {{ eq .s "x" }}', {"s": "b"})
e("eq-missing", '{{ eq .missing "x" }} {{ eq .missing nil }}')
e("eq-mixed-error", '{{ eq 1 "a" }}')
e("eq-float-int-error", "{{ eq 1.5 1 }}")
e("eq-float-data", "{{ eq .n 2.0 }}", {"n": 2})
e(
    "ne-lt-le-gt-ge",
    '{{ ne 1 2 }} {{ lt 1 2 }} {{ le 2 2 }} {{ gt "b" "a" }} {{ ge 1.5 2.5 }} {{ lt "a" "b" }}',
)
e("lt-mixed-error", '{{ lt 1 "a" }}')
e("lt-bool-error", "{{ lt true false }}")
e("eq-no-args", "{{ eq 1 }}")
# --- len / index / slice ---------------------------------------------------------------
e("len", '{{ len "héllo" }} {{ len .l }} {{ len .m }}', {"l": [1, 2], "m": {"a": 1}})
e("len-nil-error", "{{ len .missing }}")
e("len-number-error", "{{ len 3 }}")
e(
    "index",
    '{{ index .l 1 }} {{ index .m "a" }} {{ index .n 0 "k" }} {{ index "abc" 1 }}',
    {"l": ["x", "y"], "m": {"a": "A"}, "n": [{"k": "v"}]},
)
e("index-missing-key", '[{{ index .m "zz" }}]', {"m": {"a": 1}})
e("index-out-of-range", "{{ index .l 5 }}", {"l": [1]})
e("index-nil", "{{ index .missing 0 }}")
e(
    "slice",
    '{{ slice .l 1 }} {{ slice .l 1 2 }} {{ slice .l }} {{ slice "hello" 1 3 }} {{ slice .l 0 1 2 }}',
    {"l": ["a", "b", "c"]},
)
e("slice-error", "{{ slice .l 2 1 }}", {"l": ["a", "b", "c"]})
e("slice-len-idiom", "{{ range $i, $_ := .l }}{{ len (slice $.l $i) }}{{ end }}", {"l": [1, 2, 3]})
# --- print / printf / println ----------------------------------------------------------
e(
    "print",
    '{{ print 1 2 }}|{{ print "a" 1 }}|{{ print 1 "a" }}|{{ print "a" "b" }}|{{ print .missing }}',
)
e("println", '{{ println 1 "a" }}|')
e("printf-basic", '{{ printf "%s|%d|%v|%q|%x|%X|%o|%b|%c|%U" "s" 42 1.5 "q" 255 255 8 5 65 65 }}')
e(
    "printf-float",
    '{{ printf "%f|%.2f|%e|%g|%.3g|%6.2f|%-8.3f|%+.1f" 3.14159 3.14159 1234.5 0.00001 3.14159 2.5 2.5 2.5 }}',
)
e(
    "printf-width",
    '{{ printf "[%5s][%-5s][%05d][%x][% x][%#x][%+d][%8.3s]" "ab" "ab" 42 "hi" "hi" 255 5 "abcdef" }}',
)
e(
    "printf-errors",
    '{{ printf "%d %s" "str" }}|{{ printf "%s" 1 2 }}|{{ printf "%z" 1 }}|{{ printf "100%%" }}|{{ printf "%" }}',
)
e("printf-nil", '{{ printf "%v %s %d" .missing .missing .missing }}')
e("printf-types", '{{ printf "%T %T %T %T %T" 1 1.5 "s" true .l }}', {"l": [1]})
e(
    "printf-composite",
    '{{ printf "%v|%s|%d|%q" .l .l .l .l }}|{{ printf "%v" .m }}',
    {"l": ["a", 1], "m": {"b": 1, "a": [True]}},
)
e("printf-zero-pad", '{{ printf "[%05.1f][%05s][%08.3f][%x][%#o][%+05d][%-05d][%06.2e][%.0f][%5.1g]" -2.5 "ab" 3.14159 -255 8 42 7 1234.5 2.5 0.000123 }}')
e("printf-g-precision", '{{ printf "%.3g %.10g %g %G %.2e %E" 100.0 1.0 1e21 1e-7 123456.0 0.5 }}')
e("printf-star", '{{ printf "[%*d][%.*f][%-*s]" 5 42 2 3.14159 4 "x" }}')
e("printf-index", '{{ printf "%[2]s %[1]s" "a" "b" }}')
e("printf-quote-unicode", '{{ printf "%q %+q %#q" "héllo\\n" "héllo" "raw" }}')
e("printf-bool", '{{ printf "%t %v %d" true false true }}')
e("printf-non-string-format", "{{ printf 5 }}")
e("printf-system-join", '{{ $s := "a" }}{{ $s = printf "%s\\n\\n%s" $s "b" }}{{ $s }}')
# --- html / js / urlquery --------------------------------------------------------------
e("html", '{{ html "<a href=\\"x\\">&\'</a>" }}|{{ html 1 "<" }}')
e("js", '{{ js "it\'s <b> & \\"q\\" = \\\\ \\n é" }}')
e("urlquery", '{{ urlquery "a b&c=d/é~_.-" }}')
# --- json and Ollama helpers -----------------------------------------------------------
e("json-map", "{{ json . }}", {"b": [1, 2.5, None, True], "a": "<x & y>", "c": {"z": {}, "y": []}})
e("json-floats", "{{ json .l }}", {"l": [1e21, 1e20, 1e-7, 0.000001, 0.1, 100, -0.5, 123456789]})
e("json-string", '{{ json "line\\nbreak\\t\\u2028 é \\u0001" }}')
e("json-missing", "{{ json .missing }}")
e("ts-type-not-property", '{{ toTypeScriptType "x" }}')
e("dates", '{{ currentDate }} {{ yesterdayDate }} {{ currentDate "x" }}')
# --- pipelines --------------------------------------------------------------------------
e("pipe-printf", '{{ .s | printf "%q" }}|{{ "a" | printf "%s-%s" "b" }}', {"s": "x"})
e("pipe-len", "{{ .l | len }}", {"l": [1, 2]})
e("paren", '{{ (len .l) }} {{ printf "%d" (len .l) }}', {"l": [1, 2]})
e("chain-paren-field", '{{ (index .m "a").b }}', {"m": {"a": {"b": "deep"}}})
e("pipe-decl", '{{ $x := .a | printf "%v!" }}{{ $x }}', {"a": 1})
# --- define / template / block ---------------------------------------------------------
e("define-template", '{{ define "x" }}X{{ . }}{{ end }}{{ template "x" 5 }}{{ template "x" "y" }}')
e("define-no-vars", '{{ define "x" }}{{ $ }}{{ end }}{{ $a := 1 }}{{ template "x" 2 }}')
e("block", '{{ block "b" . }}default {{ .v }}{{ end }}|', {"v": 1})
e("template-missing", '{{ template "nope" . }}')
e(
    "template-recursion",
    '{{ define "r" }}{{ if . }}{{ len . }}{{ template "r" (slice . 1) }}{{ end }}{{ end }}{{ template "r" .l }}',
    {"l": [1, 2, 3]},
)
# --- execution errors -------------------------------------------------------------------
e("field-on-string", "{{ .s.x }}", {"s": "str"})
e("nil-command", "{{ nil }}")
e("if-on-func-ok", "{{ if .a }}{{ end }}ok", {"a": [1]})
e("args-to-field", "{{ .a 1 }}", {"a": 1})
e("wrong-arg-count", "{{ len 1 2 }}")
e("non-executable-pipe-stage", "{{ 1 | 2 }}")
# --- parse errors -----------------------------------------------------------------------
e("err-unclosed-action", "{{ .Prompt ")
e("err-unclosed-action-multiline", "a\n{{ .a\n.b ")
e("err-unexpected-end", "{{ end }}")
e("err-missing-end", "{{ if .a }}x")
e("err-undefined-function", "{{ foo }}")
e("err-undefined-variable", "{{ $x }}")
e("err-var-out-of-scope", "{{ if true }}{{ $x := 1 }}{{ end }}{{ $x }}")
e("err-bad-number", "{{ 1x }}")
e("err-unterminated-string", '{{ "abc }}')
e("err-unclosed-comment", "{{/* abc }}")
e("err-comment-not-closed-properly", "{{/* abc */ }}")
e("err-break-outside-range", "{{ break }}")
e("err-else-in-range-if", "{{ range .l }}{{ else if .x }}{{ end }}")
e("err-empty-action", "{{ }}")
e("err-unclosed-paren", "{{ (len .l }}")
e("err-extra-paren", "{{ len .l) }}")
e("err-dot-after-literal", '{{ "a".b }}')
e("err-bad-char", "{{ .a# }}")
e("err-too-many-decls", "{{ $a, $b := 1 }}")
e("err-range-decls", "{{ range $a, $b, $c := .l }}{{ end }}")
e("err-redefine", '{{ define "a" }}x{{ end }}{{ define "a" }}y{{ end }}')
e("err-define-unterminated", '{{ define "a" }}x')
e("err-unexpected-else", "{{ else }}")
e("err-missing-value-if", "{{ if }}{{ end }}")
e("err-invalid-escape", '{{ "\\q" }}')

# --- prompt cases (Ollama's Parse + Execute) ---------------------------------------------
P = []


def p(id_: str, template: str, **values: object) -> None:
    P.append({"id": id_, "mode": "ollama", "template": template, **values})


CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello, how are you?"}],
    "system-user-assistant-user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
        {"role": "user", "content": "I'd like to show off how chat templating works!"},
    ],
    "merge-and-systems": [
        {"role": "system", "content": "First system."},
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "reply"},
        {"role": "system", "content": "Second system."},
        {"role": "user", "content": "three <&>"},
    ],
    "assistant-prefill": [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Autumn moonlight—"},
    ],
}

TOOLS_DIR = GOLDEN / "tools"
TOOL_MESSAGES = json.loads((TOOLS_DIR / "messages.json").read_text())
TOOLS = json.loads((TOOLS_DIR / "tools.json").read_text())

for path in sorted(NAMED.glob("*.gotmpl")):
    text = path.read_text()
    for conv, msgs in CONVERSATIONS.items():
        p(f"named/{path.stem}/{conv}", text, messages=msgs)
    if "Tools" in text:
        p(f"named/{path.stem}/tools", text, messages=TOOL_MESSAGES, tools=TOOLS)

for path in sorted(TOOLS_DIR.glob("*.gotmpl")):
    text = path.read_text()
    p(f"tools/{path.stem}/with-tools", text, messages=TOOL_MESSAGES, tools=TOOLS)
    p(f"tools/{path.stem}/no-tools", text, messages=CONVERSATIONS["system-user-assistant-user"])

RICH_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search <things> & stuff",
            "parameters": {
                "type": "object",
                "$defs": {"unit": {"type": "string"}},
                "required": ["query"],
                "properties": {
                    "query": {"type": "string", "description": "what"},
                    "limit": {
                        "type": ["integer", "null"],
                        "description": "max",
                        "enum": [1, 5, 10],
                    },
                    "filters": {
                        "type": "object",
                        "properties": {"z": {"type": "boolean"}, "a": {"type": "number"}},
                        "required": ["z"],
                    },
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "mode": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    "extra": {"description": "no type", "default": 3},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}},
]
RICH_CALLS = [
    {"role": "user", "content": "find"},
    {
        "role": "assistant",
        "content": "",
        "thinking": "I should search.",
        "tool_calls": [
            {
                "id": "call_1",
                "function": {
                    "index": 0,
                    "name": "search",
                    "arguments": {
                        "query": 'a "b" <c>',
                        "limit": 5,
                        "filters": {"z": True, "a": 1.5},
                        "tags": ["x", "y"],
                        "none": None,
                    },
                },
            },
            {"function": {"index": 1, "name": "noop", "arguments": {}}},
        ],
    },
    {"role": "tool", "content": "result 1", "tool_name": "search", "tool_call_id": "call_1"},
    {"role": "tool", "content": "result 2", "tool_name": "noop"},
    {"role": "user", "content": "thanks"},
]

p(
    "fields/tools-print",
    "{{ range .Messages }}{{ end }}{{ .Tools }}\n{{ json .Tools }}",
    tools=RICH_TOOLS,
)
p(
    "fields/tools-nil",
    "{{ range .Messages }}{{ end }}[{{ .Tools }}][{{ json .Tools }}][{{ if .Tools }}yes{{ end }}]",
)
p("fields/tools-empty", "{{ range .Messages }}{{ end }}[{{ .Tools }}][{{ json .Tools }}]", tools=[])
p(
    "fields/tool-parts",
    "{{ range .Messages }}{{ end }}{{ range .Tools }}{{ . }}\n{{ .Type }}|{{ .Function.Name }}|"
    "{{ .Function.Description }}\n{{ .Function }}\n{{ .Function.Parameters }}\n"
    "{{ .Function.Parameters.Properties }}\n{{ .Function.Parameters.Required }}|"
    "{{ .Function.Parameters.Type }}\n{{ end }}",
    tools=RICH_TOOLS,
)
p(
    "fields/property-loop",
    "{{ range .Messages }}{{ end }}{{ range .Tools }}{{ range $name, $prop := .Function.Parameters.Properties }}"
    "{{ $name }}: {{ $prop.Type }} | {{ toTypeScriptType $prop }} | {{ $prop.Description }}"
    "{{ if $prop.Enum }} | {{ json $prop.Enum }}{{ end }} | {{ json $prop }} | {{ len $prop.Type }}\n"
    "{{ end }}{{ end }}",
    tools=RICH_TOOLS,
)
p(
    "fields/tool-calls",
    "{{ range .Messages }}{{ .Role }}:{{ .Content }}|{{ .Thinking }}|{{ .ToolName }}|{{ .ToolCallID }}\n"
    "{{ range .ToolCalls }}{{ .ID }}|{{ .Function.Index }}|{{ .Function.Name }}|{{ .Function.Arguments }}\n"
    "{{ range $k, $v := .Function.Arguments }}  {{ $k }}={{ $v }}\n{{ end }}{{ end }}{{ end }}",
    messages=RICH_CALLS,
)
p(
    "fields/tool-calls-json",
    "{{ range .Messages }}{{ if .ToolCalls }}{{ json .ToolCalls }}{{ end }}{{ json .Images }}{{ len .ToolCalls }}\n{{ end }}",
    messages=RICH_CALLS,
)
p(
    "fields/message-struct",
    "{{ range .Messages }}{{ . }}\n{{ end }}",
    messages=CONVERSATIONS["user"],
)
p(
    "fields/missing-in-messages-mode",
    "{{ range .Messages }}{{ end }}[{{ .Prompt }}][{{ .Suffix }}][{{ .Foo }}]",
    messages=CONVERSATIONS["user"],
)
p(
    "fields/system-joined",
    "{{ .System }}|{{ range .Messages }}{{ .Role }}={{ .Content }};{{ end }}",
    messages=CONVERSATIONS["merge-and-systems"],
)
p(
    "fields/empty-messages",
    "{{ range .Messages }}x{{ else }}none{{ end }}|{{ .Messages }}|{{ len .Messages }}",
)
THINK_TMPL = (
    "{{ .Think }}|{{ .ThinkLevel }}|{{ .IsThinkSet }}|{{ range .Messages }}{{ if .Thinking }}"
    "<think>{{ .Thinking }}</think>{{ end }}{{ .Content }}{{ end }}"
)
for name, think in [
    ("unset", None),
    ("true", True),
    ("false", False),
    ("high", "high"),
    ("bogus", "bogus"),
]:
    p(f"think/{name}", THINK_TMPL, messages=RICH_CALLS[:2], think=think)
p(
    "think/legacy",
    "{{ .Think }}|{{ .ThinkLevel }}|{{ .IsThinkSet }}|{{ .Prompt }}",
    messages=CONVERSATIONS["user"],
    think="low",
)

LEGACY_MISTRAL = "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] "
LEGACY_MISTRAL_RESPONSE = LEGACY_MISTRAL + "{{ .Response }}"
LEGACY_CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}"
    "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}"
    "<|im_end|>\n"
)
for conv, msgs in CONVERSATIONS.items():
    p(f"legacy/mistral/{conv}", LEGACY_MISTRAL, messages=msgs)
    p(f"legacy/mistral-response/{conv}", LEGACY_MISTRAL_RESPONSE, messages=msgs)
    p(f"legacy/chatml/{conv}", LEGACY_CHATML, messages=msgs)
p("legacy/prompt-only", "{{ .Prompt }}", messages=CONVERSATIONS["system-user-assistant-user"])
p(
    "legacy/response-in-if",
    "{{ .Prompt }}{{ if .Response }}<r>{{ .Response }}</r>{{ end }}<end>",
    messages=CONVERSATIONS["assistant-prefill"],
)
p(
    "legacy/response-then-text",
    "<s>{{ .System }}|{{ .Prompt }}|{{ .Response }}|after</s>",
    messages=CONVERSATIONS["merge-and-systems"],
)
p(
    "legacy/response-pipe",
    '{{ .Prompt }}:{{ .Response | printf "%s!" }}:tail',
    messages=CONVERSATIONS["assistant-prefill"],
)
p("legacy/tool-messages-ignored", "{{ .Prompt }}>{{ .Response }};", messages=TOOL_MESSAGES)

FIM = "{{- if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>\n{{- else }}{{ .Prompt }}\n{{- end }}"
p("fim/prompt-suffix", FIM, prompt="def add(", suffix="return x")
p("fim/messages", FIM, messages=[{"role": "user", "content": "hello"}])
p(
    "fim/messages-template-with-suffix",
    "{{ range .Messages }}{{ .Content }}{{ end }}<{{ .Prompt }}|{{ .Suffix }}|{{ .Response }}|{{ .Think }}>",
    prompt="p",
    suffix="s",
    think=True,
)

p(
    "misc/date",
    "{{ range .Messages }}{{ .Content }}{{ end }} Today is {{ currentDate }}",
    messages=[{"role": "user", "content": "Hello"}],
)
p(
    "misc/vars-messages-lowercase",
    "{{ range .messages }}x{{ end }}{{ .System }}",
    messages=CONVERSATIONS["user"],
)
p(
    "misc/dollar-messages",
    "{{ range $.Messages }}{{ .Content }}{{ end }}",
    messages=CONVERSATIONS["user"],
)


def run(cases: list[dict]) -> list[dict]:
    lines = "\n".join(json.dumps(c) for c in cases) + "\n"
    proc = subprocess.run(
        ["go", "run", "."], cwd=HERE, input=lines, capture_output=True, text=True, check=True
    )
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    out = []
    for case, res in zip(cases, results, strict=True):
        assert case["id"] == res["id"]
        item = {k: v for k, v in case.items() if k != "mode"}
        if "output" in res:
            item["output"] = res["output"]
        else:
            item["error"] = res["error"]
        if case["mode"] == "ollama":
            item["vars"] = res.get("vars") or []
        out.append(item)
    return out


def main() -> None:
    (GOLDEN / "engine.json").write_text(json.dumps(run(E), indent=1, ensure_ascii=False) + "\n")
    (GOLDEN / "prompts.json").write_text(json.dumps(run(P), indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
