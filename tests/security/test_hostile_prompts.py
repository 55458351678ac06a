"""Templates that would hold the server: every render is bounded and runs off the event loop.

Found by attacking a real ``pollama serve``: a 50-character ``template`` override that
printed a million-character string 32 times killed the worker; a GGUF chat template whose
macro fans out blocked every endpoint, ``/healthz`` included, for 46 s; ``replace`` in a
loop built a 1 GB string. Each hostile template here must be refused quickly with a
``RenderLimitExceeded`` (a ``TemplateError``: a 400 that names the limit), and while one
renders, the event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import RunningServer
from ggufgen import write_tiny_model
from pollama.errors import TemplateError
from pollama.inference.prompt import PromptTemplate, build_chat_prompt, build_generate_prompt
from pollama.template import MAX_RENDER_OUTPUT, RenderLimitExceeded, Template, render_prompt
from pollama.template.jinja import JinjaChatTemplate, render_chat_template

FAST = 5.0
"""Seconds a refusal may take at most. A budget is spent in about a second on an idle core;
this leaves room for a loaded test machine, and is far below what the attacks took."""

HI = [{"role": "user", "content": "hi"}]

FAN_OUT = (
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
    "{{ f(30) }}{% for m in messages %}{{ m.content }}{% endfor %}"
)

JINJA_BOMBS = {
    "macro fan-out, depth 30": FAN_OUT,
    "fan-out that prints nothing": (
        "{% macro f(n) %}{% if n > 0 %}{% set a = f(n - 1) %}{% set b = f(n - 1) %}"
        "{% endif %}{% endmacro %}{{ f(30) }}"
    ),
    "replace in a loop": (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s.replace('a', 'aa') %}{% endfor %}{{ ns.s|length }}"
    ),
    "replace filter in a loop": (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s|replace('a', 'aa') %}{% endfor %}"
    ),
    "one replace into a huge string": "{% set s = 'a' * 100000 %}{{ s.replace('a', s) }}",
    "join of shared references": "{% set s = 'a' * 100000 %}{{ ([s] * 1000)|join }}",
    "str.join of shared references": "{% set s = 'a' * 100000 %}{{ ''.join([s] * 1000) }}",
    "printing shared references": "{% set s = 'a' * 1000 %}{% set l = [s] * 1000 %}"
    "{% set m = [l, l, l, l, l, l, l, l, l, l] %}{{ [m, m, m, m, m, m, m, m, m, m] }}",
    "nested loops without output": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    ),
    "nested loops over one list": (
        "{% set l = [1] * 1000 %}{% for a in l %}{% for b in l %}{% for c in l %}"
        "{% endfor %}{% endfor %}{% endfor %}"
    ),
    "loop of conditions": "{% for a in range(1000000) %}"
    + "{% if a == 1 %}{% endif %}" * 200
    + "{% endfor %}",
    "huge center width": "{{ 'a'|center(1000000000) }}",
    "wide center in a loop": (
        "{% for i in range(100000) %}{{ 'a'|center(10000000)|length }}{% endfor %}"
    ),
    "indent of many lines": "{% set s = '\n' * 10000000 %}{{ s|indent(100)|length }}",
    "wordwrap of a long text": "{% set s = 'ab ' * 3000000 %}{{ s|wordwrap(1)|length }}",
    "wordwrap with a long wrapstring": "{{ ('a b' * 100)|wordwrap(1, wrapstring='x' * 100000) }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "recursive loop": "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "filters in a long loop": (
        "{% for i in range(1000000) %}{{ i|string|length|string|length }}{% endfor %}"
    ),
    "methods in a long loop": (
        "{% for i in range(1000000) %}{% set x = 'a'.upper().lower().strip() %}{% endfor %}"
    ),
    "select in a loop": (
        "{% set l = [1] * 1000000 %}{% for i in range(100000) %}"
        "{{ l|select('odd')|list|length }}{% endfor %}"
    ),
    "concatenation in a loop": (
        "{% set s = 'a' * 8000000 %}{% for i in range(100000) %}{% set t = s ~ s %}{% endfor %}"
    ),
    "tojson of shared references": "{% set s = 'a' * 100000 %}{{ ([s] * 1000)|tojson }}",
    "format fields": "{% set s = 'a' * 100000 %}{{ ('{0}' * 1000).format(s) }}",
    "percent fields": "{% set s = 'a' * 100000 %}{{ ('%s' * 1000) % (s,) * 1 }}",
    "nested format width": "{{ '{0:{1}}'.format('a', 100000000) }}",
    "batch fill": "{{ [1]|batch(1000000, 'x' * 1000000)|list|length }}",
    "list of a range": "{{ range(1000000000)|list|length }}",
    "expandtabs": "{{ ('\t' * 1000000).expandtabs(100)|length }}",
    "squaring an integer": (
        "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
        "{% endfor %}{{ ns.x > 0 }}"
    ),
    "output flood": "{% for i in range(1000000) %}{{ 'x' * 1000 }}{% endfor %}",
    "indented JSON of deep nesting": (
        "{% set ns = namespace(l=[1]) %}{% for i in range(900) %}{% set ns.l = [ns.l] %}"
        "{% endfor %}{{ ns.l|tojson(indent=1024)|length }}"
    ),
    "JSON with a long separator": "{{ ([1] * 1000)|tojson(separators=(',', 'x' * 1000000)) }}",
    "split into millions": "{{ ('a\r' * 8000000).split()|length }}",
}


def test_ordinary_uses_are_not_refused() -> None:
    template = (
        "{{ '%d' % 123456789012 }} {{ '{}'.format(99999999999) }} {{ '%5.2f' % 3.14159 }} "
        "{{ {'a': [1, 2]}|tojson(indent=2)|length }} {{ 'a b\nc'.split()|length }} "
        "{{ ('x' * 1000)|center(1010)|length }} {{ range(10)|list|sum }} "
        "{{ [[1], [2]]|sum(start=[]) }} {{ 'ab'|replace('a', 'xyz') }} "
        "{{ messages|map(attribute='content')|join(', ') }}"
    )
    assert render_chat_template(template, [*HI, {"role": "assistant", "content": "yo"}]) == (
        "123456789012 99999999999  3.14 29 3 1010 45 [1, 2] xyzb hi, yo"
    )


def _refused_fast(render: Callable[[], Any]) -> TemplateError:
    start = time.monotonic()
    with pytest.raises(TemplateError) as caught:
        render()
    elapsed = time.monotonic() - start
    assert elapsed < FAST, f"refused only after {elapsed:.1f} s: {caught.value}"
    return caught.value


@pytest.mark.parametrize("template", JINJA_BOMBS.values(), ids=JINJA_BOMBS.keys())
def test_hostile_jinja_is_refused_fast(template: str) -> None:
    error = _refused_fast(lambda: render_chat_template(template, HI))
    assert "chat template" in str(error)
    assert len(str(error)) < 400  # a clear message, not a dump of the template


@pytest.mark.parametrize("template", list(JINJA_BOMBS.values())[:3], ids=list(JINJA_BOMBS)[:3])
def test_hostile_jinja_through_a_model_is_refused_fast(template: str) -> None:
    chat = JinjaChatTemplate(template)
    error = _refused_fast(lambda: chat.render(HI))
    assert isinstance(error, RenderLimitExceeded)
    # Remembered: the same template is refused at once the next time.
    start = time.monotonic()
    with pytest.raises(RenderLimitExceeded, match="two-message chat"):
        chat.render(HI)
    assert time.monotonic() - start < 0.5


def test_limits_name_what_was_exceeded() -> None:
    steps = _refused_fast(lambda: render_chat_template(FAN_OUT, HI))
    assert isinstance(steps, RenderLimitExceeded) and steps.limit == "steps"
    assert "exceeded" in str(steps) and "steps" in str(steps)
    value = _refused_fast(lambda: render_chat_template(JINJA_BOMBS["replace in a loop"], HI))
    assert isinstance(value, RenderLimitExceeded) and value.limit == "value"
    assert "replace" in str(value)
    depth = _refused_fast(lambda: render_chat_template(JINJA_BOMBS["recursion"], HI))
    assert isinstance(depth, RenderLimitExceeded) and depth.limit == "depth"
    output = _refused_fast(lambda: render_chat_template(JINJA_BOMBS["output flood"], HI))
    assert isinstance(output, RenderLimitExceeded) and output.limit == "output"


GO_BOMBS = {
    # The attack: 50 characters that print a million-character string 32 times.
    "printf override": '{{range 32}}{{printf "%1000000d" 1}}{{end}}',
    "doubling a string": (
        '{{ $s := "ab" }}{{ range 40 }}{{ $s = printf "%s%s" $s $s }}{{ end }}{{ $s }}'
    ),
    "printf with many wide verbs": '{{ printf "' + "%1000000d" * 40 + '" 1 1 1 1 1 1 1 1 1 1 1 1 '
    "1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 }}",
    "print of a long string, repeated": (
        '{{ $s := printf "%1000000d" 1 }}{{ print $s $s $s $s $s $s $s $s $s $s $s $s $s $s $s '
        "$s $s $s }}"
    ),
    "deep template recursion": '{{define "a"}}{{template "a" .}}{{end}}{{template "a" .}}',
    "template fan-out": (
        '{{define "a"}}{{if lt (len $) 99}}{{template "a" (print $ "x")}}'
        '{{template "a" (print $ "y")}}{{end}}{{end}}{{template "a" ""}}'
    ),
    "huge range": "{{range 1000000000}}{{end}}",
    "nested ranges": "{{range 100000}}{{range 100000}}{{end}}{{end}}",
    "conditions in a range": "{{range 1000000000}}{{if 0}}{{end}}{{end}}",
    "js escaping in a loop": (
        '{{ $s := printf "%1000000d" 1 }}{{range 100}}{{ $t := js $s }}{{end}}'
    ),
    "slicing a long string in a loop": (
        '{{ $s := printf "%1000000d" 1 }}{{range 100000}}{{ $t := slice $s 0 1 }}{{end}}'
    ),
}


@pytest.mark.parametrize("template", GO_BOMBS.values(), ids=GO_BOMBS.keys())
def test_hostile_go_templates_are_refused_fast(template: str) -> None:
    parsed = Template.parse(template)
    error = _refused_fast(lambda: parsed.execute({}))
    assert isinstance(error, RenderLimitExceeded)
    assert str(error).startswith("template: ")


def test_the_override_attack_gets_a_template_error_not_a_prompt() -> None:
    async def words(text: str) -> int:  # what the worker would have been sent to tokenize
        raise AssertionError(f"a {len(text)}-character prompt reached the tokenizer")

    override = GO_BOMBS["printf override"]
    assert len(override) < 50
    error = _refused_fast(lambda: asyncio.run(build_generate_prompt(
        PromptTemplate.default(), prompt="hi", template_override=override, num_ctx=4096,
        count_tokens=words)))  # fmt: skip
    assert f"exceeds {MAX_RENDER_OUTPUT} characters" in str(error)


def test_bad_printf_numbers_are_go_errors_not_crashes() -> None:
    huge = "9" * 5000  # int() refuses more than 4300 digits

    def printf(fmt: str) -> str:
        return Template.parse('{{ printf "' + fmt + '" 1 }}', append_response=False).execute({})

    assert printf("%" + huge + "d") == "%!(BADWIDTH)1"
    assert printf("%." + huge + "d") == "%!(BADPREC)1"
    assert printf("%[" + huge + "]d") == "%!d(BADINDEX)"


def test_legacy_templates_share_one_budget_across_turns() -> None:
    # A template without .Messages runs once per exchange: a thousand exchanges must not buy
    # a thousand budgets.
    slow = Template.parse("{{ range 150000 }}{{ end }}{{ .Prompt }}{{ .Response }}")
    messages = []
    for i in range(100):
        messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(RenderLimitExceeded, match="steps"):
        render_prompt(slow, messages=messages)
    assert render_prompt(slow, messages=messages[:2]) == "q0a"


REAL_TEMPLATE_SIZE = 333  # exchanges: user, assistant with a tool call, tool result


def test_real_templates_with_long_chats_and_many_tools_render() -> None:
    """The bounds are far above what real templates need: a thousand messages and fifty tools
    through the SmolLM2 GGUF template and a Go template with tools."""
    tools = [{"type": "function", "function": {
        "name": f"tool{i}", "description": "Does a thing. " * 5,
        "parameters": {"type": "object", "required": ["a"], "properties": {
            "a": {"type": "string", "description": "x"},
            "b": {"type": "integer", "enum": [1, 2, 3]}}}}} for i in range(50)]  # fmt: skip
    messages: list[dict[str, Any]] = [{"role": "system", "content": "sys"}]
    for _ in range(REAL_TEMPLATE_SIZE):
        messages += [
            {"role": "user", "content": "hello there " * 5},
            {"role": "assistant", "content": "answer " * 5, "tool_calls": [
                {"function": {"name": "tool1", "arguments": {"a": "x"}}}]},
            {"role": "tool", "content": "result", "tool_name": "tool1"},
        ]  # fmt: skip
    golden = Path(__file__).parent.parent / "golden" / "templates"
    smollm = JinjaChatTemplate((golden / "smollm2-135m-instruct.jinja").read_text())
    assert smollm.render(messages, tools=tools).count("<|im_start|>") > 1000
    go = Template.parse(
        "{{ if .Tools }}{{ range .Tools }}{{ json . }}\n{{ end }}{{ end }}"
        "{{ range $i, $m := .Messages }}{{ $m.Role }}: {{ $m.Content }}"
        "{{ range $m.ToolCalls }}{{ .Function.Name }}({{ json .Function.Arguments }}){{ end }}\n"
        "{{ end }}"
    )
    assert render_prompt(go, messages=messages, tools=tools).count("\n") > 1000


# -- off the event loop ----------------------------------------------------------------------


def test_rendering_runs_off_the_event_loop() -> None:
    """While a hostile template renders (and is refused), the loop keeps running."""

    async def scenario() -> tuple[float, int, BaseException | None]:
        ticks = 0
        longest = 0.0
        done = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal ticks, longest
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                longest, last, ticks = max(longest, now - last), now, ticks + 1

        async def words(text: str) -> int:
            return len(text.split())

        beat = asyncio.create_task(heartbeat())
        error: BaseException | None = None
        try:
            fresh = FAN_OUT + "{# not rendered before: no remembered refusal #}"
            await build_chat_prompt(
                PromptTemplate.from_jinja(JinjaChatTemplate(fresh)), HI,
                system_default=None, num_ctx=4096, count_tokens=words)  # fmt: skip
        except TemplateError as exc:
            error = exc
        done.set()
        await beat
        return longest, ticks, error

    longest, ticks, error = asyncio.run(scenario())
    assert isinstance(error, RenderLimitExceeded)
    assert ticks > 20  # the render took a while, and the loop ran all along
    assert longest < 0.5, f"the event loop was blocked for {longest:.2f} s"


def test_renders_use_the_render_threads() -> None:
    seen: list[str] = []

    class Recording(PromptTemplate):
        def render(self, *args: Any, **kwargs: Any) -> str:
            seen.append(threading.current_thread().name)
            return super().render(*args, **kwargs)

    async def words(text: str) -> int:
        return len(text.split())

    template = Recording(go=Template.parse("{{ range .Messages }}{{ .Content }} {{ end }}"))
    asyncio.run(build_chat_prompt(template, HI, system_default=None, num_ctx=100,
                                  count_tokens=words))  # fmt: skip
    assert seen and all(name.startswith("pollama-render") for name in seen)


# -- end to end ------------------------------------------------------------------------------


def _create(server: RunningServer, gguf: Path, name: str) -> None:
    data = gguf.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post(f"/api/blobs/{digest}", content=data).status_code == 201
        created = client.post("/api/create", json={
            "model": name, "files": {gguf.name: digest}, "stream": False})  # fmt: skip
        assert created.status_code == 200, created.text


@pytest.mark.slow
def test_hostile_chat_template_leaves_the_server_answering(
    server: RunningServer, tmp_path: Path
) -> None:
    """A real server, a model whose GGUF chat template fans out: the chat is a 400 that says
    why, and ``/healthz`` answers within a second all along."""
    _create(server, write_tiny_model(tmp_path / "fanout.gguf", chat_template=FAN_OUT), "fanout")
    answer: dict[str, Any] = {}

    def chat() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            response = client.post("/api/chat", json={
                "model": "fanout", "stream": False, "options": {"num_predict": 1},
                "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
            answer.update(status=response.status_code, body=response.json())

    worker = threading.Thread(target=chat)
    worker.start()
    slowest = 0.0
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while worker.is_alive():
            start = time.monotonic()
            assert client.get("/healthz").status_code == 200
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.05)
    worker.join()
    assert slowest < 1.0, f"/healthz took {slowest:.2f} s while the template rendered"
    assert answer["status"] == 400, answer
    message = answer["body"]["error"]
    assert "chat template" in message and "steps" in message, message
