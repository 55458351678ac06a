"""The grammar module (``runner/grammar.py``) on the real SmolLM2 vocabulary: schema rules,
masks, and closing a JSON text when the budget runs out.

The model is loaded in this process through ``runner/llama.py`` (vocabulary and weights
mapped, no context: about half a second), only to build llguidance's tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import numpy as np
import pytest

from pollama.default_model import default_gguf_path
from pollama.errors import InvalidRequest
from pollama.runner.grammar import Constraint, Grammars, prepare_schema

CAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "color": {"enum": ["black", "white", "orange"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
            "required": ["name", "city"],
        },
    },
    "required": ["name", "age", "color", "tags", "owner"],
}
ORDERS = {  # arrays with a minimum of objects with required properties, a long enum value
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "label": {"type": "string", "minLength": 2},
                    "flags": {"type": "array", "items": {"type": "boolean"}},
                },
                "required": ["id", "label"],
            },
        },
        "kind": {"enum": ["alpha", "beta-longer-name"]},
        "score": {"type": "number"},
    },
    "required": ["items", "kind"],
}


@pytest.fixture(scope="module")
def grammars() -> Iterator[Grammars]:
    from pollama.runner import llama

    sink = llama.LogSink()  # llama.cpp's loading chatter off stdout
    llama.backend_init()
    model = llama.Model(str(default_gguf_path()))
    try:
        yield Grammars(llama.guidance_tokenizer(model))
    finally:
        model.close()
        sink.close()


def feed(c: Constraint, g: Grammars, text: str) -> None:
    for token in g.tokenizer.tokenize_str(text):
        assert c.allows(token)
        assert c.accept(token), c.error


def pieces(g: Grammars, tokens: np.ndarray) -> set[bytes]:
    return {g.tokenizer.decode_bytes([int(t)]) for t in tokens}


# -- schema rules (no vocabulary needed) ---------------------------------------------------


def test_json_mode_is_any_object_and_schemas_close_their_objects() -> None:
    assert prepare_schema("json") == {"type": "object"}
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}},
        "$defs": {"d": {"properties": {"x": {}}, "additionalProperties": True}},
        "items": {"properties": {"y": {}}},
        "allOf": [{"properties": {"p": {}}}, {"properties": {"q": {}}}],
        "x-guidance": {"whitespace_flexible": True},
    }
    prepared = prepare_schema(schema)
    assert prepared["additionalProperties"] is False
    assert prepared["properties"]["a"]["additionalProperties"] is False
    assert prepared["$defs"]["d"]["additionalProperties"] is True  # said so: kept
    assert prepared["items"]["additionalProperties"] is False
    assert all("additionalProperties" not in branch for branch in prepared["allOf"])
    assert "x-guidance" not in prepared
    assert "additionalProperties" not in schema and "x-guidance" in schema  # not modified


def test_unsupported_schemas_name_the_problem(grammars: Grammars) -> None:
    cases = [
        ({"type": "object", "if": {"type": "object"}, "then": {}}, '"if"'),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ]
    for schema, needle in cases:
        with pytest.raises(InvalidRequest) as caught:
            grammars.compile(schema)
        assert "unsupported JSON schema in format" in str(caught.value)
        assert needle in str(caught.value)
    with pytest.raises(InvalidRequest):
        grammars.compile(["not", "a", "schema"])


# -- masks ---------------------------------------------------------------------------------


def test_json_mode_mask_allows_only_an_object_start_and_ends_after_it(grammars: Grammars) -> None:
    g = grammars
    c = g.compile("json")
    logits = np.zeros(g.n_vocab, dtype=np.float32)
    assert c.mask(logits)
    allowed = np.flatnonzero(np.isfinite(logits))
    assert allowed.size and all(p.startswith(b"{") for p in pieces(g, allowed))
    assert not set(g.eos) & set(allowed.tolist())  # nothing is complete yet
    assert not c.allows(g.tokenizer.tokenize_str(" ")[0])  # no whitespace outside strings
    feed(c, g, '{"a":[1,"x}"]')
    assert not c.done and c.depth == 1
    feed(c, g, "}")
    assert c.done and c.depth == 0
    logits = np.zeros(g.n_vocab, dtype=np.float32)
    assert c.mask(logits)
    assert set(np.flatnonzero(np.isfinite(logits)).tolist()) == set(g.eos)


def test_mask_keeps_allowed_logits_and_refuses_the_rest(grammars: Grammars) -> None:
    g = grammars
    c = g.compile(CAT)
    feed(c, g, '{"name":"Tom","age":3,"color":"')
    logits = np.random.default_rng(0).standard_normal(g.n_vocab).astype(np.float32)
    before = logits.copy()
    assert c.mask(logits)
    allowed = np.flatnonzero(np.isfinite(logits))
    assert np.array_equal(logits[allowed], before[allowed])
    assert set(allowed.tolist()) == {t for t in allowed.tolist() if c.allows(t)}
    texts = pieces(g, allowed)
    assert b"black" in texts or b"bl" in texts or b"b" in texts
    assert all(not p.startswith(b"red") for p in texts)
    assert c.best_allowed(before) in set(allowed.tolist())


def test_a_schema_without_additional_properties_refuses_extra_keys(grammars: Grammars) -> None:
    g = grammars
    c = g.compile({"type": "object", "properties": {"a": {"type": "integer"}}})
    feed(c, g, '{"a":1')
    logits = np.zeros(g.n_vocab, dtype=np.float32)
    c.mask(logits)
    digits = {str(d).encode() for d in range(10)}
    assert pieces(g, np.flatnonzero(np.isfinite(logits))) <= digits | {b"}"}


# -- closing under a running-out budget ------------------------------------------------------


def random_walk(g: Grammars, fmt: Any, steps: int, seed: int) -> tuple[str, int, int]:
    """``steps`` tokens drawn at random from what the grammar allows (the worst model: no
    preference at all; half the draws among tokens that open or close a string or a
    container, so that the walk nests and leaves strings), then closing. Returns the text,
    the tokens closing took and the budget :meth:`Constraint.must_close` asked for when it
    began."""
    rng = np.random.default_rng(seed)
    effects = g.effects
    c = g.compile(fmt)
    tokens: list[int] = []
    for _ in range(steps):
        if c.done:
            break
        logits = np.zeros(g.n_vocab, dtype=np.float32)
        assert c.mask(logits)
        allowed = np.flatnonzero(np.isfinite(logits))
        allowed = allowed[~np.isin(allowed, g.eos)]
        if not allowed.size:
            break
        opening = (effects.delta[c.state, allowed] > 0) | (effects.end[c.state, allowed] > c.state)
        closing = (effects.delta[c.state, allowed] < 0) | (effects.end[c.state, allowed] < c.state)
        draw = rng.random()
        if draw < 0.3 and opening.any():
            allowed = allowed[opening]
        elif draw < 0.5 and closing.any():
            allowed = allowed[closing]
        token = int(rng.choice(allowed))
        assert c.accept(token), c.error
        tokens.append(token)
    budget = c.depth + (c.state != 0) + c.reserve
    assert not c.must_close(budget + 1) and c.must_close(budget) and c.closing
    closing = 0
    while not c.done:
        closing += 1
        assert closing <= 200, g.tokenizer.decode_str(tokens)
        token = c.closing_token(rng.standard_normal(g.n_vocab).astype(np.float32))
        assert token >= 0 and c.allows(token)
        if token in g.eos:
            break
        assert c.accept(token), c.error
        tokens.append(token)
    return g.tokenizer.decode_str(tokens), closing, budget


@pytest.mark.parametrize("fmt", ["json", CAT, ORDERS], ids=["json", "cat", "orders"])
def test_closing_after_any_prefix_gives_valid_json_within_its_budget(
    grammars: Grammars, fmt: Any
) -> None:
    schema = {"type": "object"} if fmt == "json" else fmt
    open_at_closing = 0
    for seed in range(24):
        text, closing, budget = random_walk(grammars, fmt, steps=3 + 4 * seed, seed=seed)
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert closing <= budget, (text, closing, budget)
        open_at_closing += budget > grammars.compile(fmt).reserve + 1
    assert open_at_closing >= 6  # closing did start inside nested levels


def test_closing_budget_covers_the_open_levels(grammars: Grammars) -> None:
    g = grammars
    c = g.compile("json")
    feed(c, g, '{"a":{"b":[{"c":"some text')
    assert (c.depth, c.state) == (4, 1)
    assert not c.must_close(20)
    assert c.must_close(4 + 1 + c.reserve)


def test_integers_without_bounds_have_at_most_16_digits(grammars: Grammars) -> None:
    """As llama.cpp's converter writes them: a small model cannot spend its budget on one
    number. Bounds the schema gives are kept."""

    def takes(schema: dict[str, Any], text: str) -> bool:
        c = grammars.compile({"type": "object", "properties": {"n": schema}})
        for token in grammars.tokenizer.tokenize_str(text):
            if not (c.allows(token) and c.accept(token)):
                return False
        return True

    free = {"type": "integer"}
    assert takes(free, '{"n":' + "9" * 16) and takes(free, '{"n":-' + "9" * 16)
    assert not takes(free, '{"n":' + "1" * 17) and not takes(free, '{"n":-' + "1" * 17)
    assert prepare_schema({"type": "integer", "maximum": 10**18})["maximum"] == 10**18
    wide = {"type": "integer", "maximum": 10**18}
    assert takes(wide, '{"n":' + "1" * 18) and not takes(wide, '{"n":-' + "1" * 17)
    assert prepare_schema({"type": "integer", "exclusiveMinimum": 0}).get("minimum") is None
