"""Named templates as package data and Ollama's chat-template detection (``template.Named``)."""

from __future__ import annotations

import json
import pathlib

import pytest

from pollama.template import (
    Template,
    detect_named_template,
    named_template,
    named_templates,
    render_prompt,
)

GOLDEN = pathlib.Path(__file__).parent / "golden" / "templates"

# Ollama's template/testdata/templates.jsonl: real GGUF chat templates and the name each maps to.
KNOWN = [
    (name, jinja)
    for line in (GOLDEN / "templates.jsonl").read_text().splitlines()
    for name, jinja in json.loads(line).items()
]


@pytest.mark.parametrize(
    ("name", "jinja"), KNOWN, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KNOWN)]
)
def test_known_chat_templates_are_detected(name: str, jinja: str) -> None:
    found = detect_named_template(jinja)
    assert found is not None
    assert found.name == name
    assert Template.parse(found.template).root.nodes


def test_smollm2_chat_template_is_chatml() -> None:
    jinja = (GOLDEN / "smollm2-135m-instruct.jinja").read_text()
    found = detect_named_template(jinja)
    assert found is not None
    assert found.name == "chatml"
    assert found.stop == ("<|im_start|>", "<|im_end|>")
    assert found.parameters == {"stop": ["<|im_start|>", "<|im_end|>"]}
    assert "<|im_start|>" in found.chat_template
    prompt = render_prompt(
        Template.parse(found.template),
        messages=[
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
        ],
    )
    assert prompt == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_detection_threshold_is_a_distance_below_100() -> None:
    shortest = min((jinja for _, jinja in KNOWN), key=len)
    name = detect_named_template(shortest)
    assert name is not None
    assert detect_named_template(shortest + "#" * 99) is not None
    assert detect_named_template(shortest + "#" * 100) is None


def test_unrelated_or_empty_templates_are_not_detected() -> None:
    assert detect_named_template("") is None
    assert detect_named_template("{% for m in messages %}" + "x" * 500 + "{% endfor %}") is None


def test_params_layer_bytes_match_ollama_encoding() -> None:
    chatml = named_template("chatml")
    assert chatml is not None
    assert chatml.params_json() == (
        b'{"stop":["\\u003c|im_start|\\u003e","\\u003c|im_end|\\u003e"]}\n'
    )


def test_only_stop_parameters_are_kept() -> None:
    gemma3 = named_template("gemma3-instruct")
    assert gemma3 is not None
    assert gemma3.parameters == {"stop": ["<end_of_turn>"]}  # temperature is dropped, as in Ollama


def test_every_named_template_is_shipped_and_parses() -> None:
    names = named_templates()
    assert len(names) == 20 and "vicuna" in names  # vicuna is not in the index
    index = json.loads(
        (pathlib.Path(__file__).parents[1] / "src/pollama/template/named/index.json").read_text()
    )
    assert {e["name"] for e in index} <= set(names)
    for name in names:
        named = named_template(name)
        assert named is not None and named.name == name
        assert "\r\n" not in named.template
        Template.parse(named.template)


@pytest.mark.parametrize("name", ["", "nope", "../index", "index.json", ".hidden"])
def test_unknown_names_are_none(name: str) -> None:
    assert named_template(name) is None
