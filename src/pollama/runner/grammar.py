"""Structured output in the worker: ``format`` becomes an llguidance grammar, and each
constrained request keeps one matcher that decides which tokens may come next.

``format`` is None, ``"json"`` (any JSON object, Ollama's JSON mode) or a JSON Schema dict
already checked for structure by the server (``inference/structured.py``). :class:`Grammars`
holds what is built once per model (llguidance's view of the vocabulary, ~0.3 s, and the JSON
effect of every token); :meth:`Grammars.compile` makes one :class:`Constraint` per request in
about a millisecond, or raises :class:`~pollama.errors.InvalidRequest` naming what llguidance
cannot do (``Unimplemented keys: ["if", "then"]``, a look-around in a ``pattern``...).

How a schema is read, and why:

* no whitespace outside strings (llguidance's ``whitespace_flexible`` off): a small model at a
  high temperature can otherwise spend its whole budget on blank lines;
* an object schema with ``properties`` and no ``additionalProperties`` takes no other
  properties, as llama.cpp's schema converter (and so Ollama) reads it; llguidance alone would
  allow any extra key, which a small model uses to ramble; ``allOf`` branches are left alone,
  since closing each branch would forbid the properties of the others;
* ``oneOf`` is read as ``anyOf`` (llama.cpp does the same; llguidance refuses most ``oneOf``
  otherwise); a schema's own ``x-guidance`` settings are dropped, so these rules always hold;
* an integer without bounds has at most 16 digits (``|n| < 10**16``), as llama.cpp's
  converter writes integers (``[1-9] [0-9]{0,15}``): a small model otherwise writes digits
  until its budget runs out (seen with SmolLM2 at temperature 1: an ``age`` of 300 digits).
  A bound the schema sets itself is kept; the missing side gets the default.

What must stay true:

* Only tokens the matcher allows are fed to it: the engine checks every drawn token with
  :meth:`Constraint.allows` and otherwise draws from logits that :meth:`Constraint.mask`
  left at -inf for every refused token (and if a sampler still returns a refused one, takes
  :meth:`Constraint.best_allowed`). :meth:`Constraint.accept` returning False is a bug that
  fails the request. llguidance reports errors through return values and never aborts the
  process, unlike llama.cpp's grammar sampler: with no candidate left it throws a C++
  exception, which cannot cross ctypes, and the whole worker aborts.
* The end-of-generation tokens are llguidance's end tokens, so the mask allows them exactly
  when the output is complete; :attr:`Constraint.done` is true once nothing but an end can
  follow, and the engine then stops without sampling again.
* When the budget is about to run out (``num_predict`` or the context, :meth:`Constraint.
  must_close`), the constraint stops following the model and picks, among the allowed tokens,
  the ones that close the JSON soonest (:meth:`Constraint.closing_token`), so output cut by a
  limit still parses and validates whenever the schema can be finished in what is left.
  ``closing`` records that this happened, and the engine reports ``length``. What closing
  may need is estimated from the schema in the model's own tokens (a byte-level vocabulary
  needs several times more than SmolLM2's); a schema that needs more than the whole budget
  still ends cut, with ``length``.
* A :class:`Constraint` is used by one thread (the engine loop) after it is made; only
  :meth:`Grammars.compile` runs elsewhere (the worker's reader thread).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from typing import Any

import llguidance
import numpy as np
import numpy.typing as npt

from pollama.errors import InvalidRequest, brief

__all__ = ["Constraint", "Grammars", "prepare_schema"]

_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "coerce_one_of": True,
    "lenient": False,
}
# JSON scanner states between tokens: outside a string, inside one, just after a backslash.
_OUT, _IN, _ESC = 0, 1, 2
_JSON_SPECIAL = b'"\\{}[],:'
# Closing needs one token per open string and container, plus: after a comma in an object, a
# key, its colon and a value (this text, in the model's tokens, and one more), plus what the
# schema requires (:func:`_closing_estimate`).
_AFTER_COMMA = '"":""'
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_VALUED = ("additionalProperties", "contains", "not", "if", "then", "else",
                  "propertyNames", "unevaluatedProperties", "unevaluatedItems")


def prepare_schema(fmt: Any) -> dict[str, Any]:
    """The schema llguidance compiles for ``format`` (see the module docstring's rules)."""
    if fmt == "json":
        return {"type": "object"}
    if not isinstance(fmt, dict):
        raise InvalidRequest(f"invalid format: expected \"json\" or a JSON Schema object, "
                             f"not {type(fmt).__name__}")
    return _closed(copy.deepcopy(fmt), close=True)


_INTEGER_LIMIT = 10**16 - 1  # llama.cpp's integers: at most 16 digits


def _closed(schema: Any, *, close: bool) -> Any:
    """``schema`` with ``additionalProperties: false`` where it lists properties and says
    nothing of others, and default bounds on integers, recursively; ``x-guidance`` removed."""
    if not isinstance(schema, dict):
        return schema
    schema.pop("x-guidance", None)
    if close and "properties" in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    kind = schema.get("type")
    if kind == "integer" or (isinstance(kind, list) and kind == ["integer"]):
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            schema["minimum"] = -_INTEGER_LIMIT
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            schema["maximum"] = _INTEGER_LIMIT
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas") and isinstance(value, dict):
            for name, sub in value.items():
                value[name] = _closed(sub, close=True)
        elif key in ("anyOf", "oneOf", "prefixItems", "items") and isinstance(value, list):
            schema[key] = [_closed(sub, close=True) for sub in value]
        elif key == "allOf" and isinstance(value, list):
            schema[key] = [_closed(sub, close=False) for sub in value]
        elif key in ("items", "additionalProperties", "contains", "not", "if", "then",
                     "else", "propertyNames", "unevaluatedProperties", "unevaluatedItems"):
            schema[key] = _closed(value, close=True)
    return schema


def _closing_estimate(schema: Any, cost: Callable[[str], int]) -> int:
    """Tokens that writing what ``schema`` requires may take when closing starts before any
    of it, ``cost`` counting a text's tokens: each required property with its shortest
    value (the longest of an enum), each array's ``minItems`` items, the costliest branch of
    an ``anyOf``. An upper estimate: subschemas count whether the output needs them or not."""
    if not isinstance(schema, dict):
        return 0
    total = 0
    required, properties = schema.get("required"), schema.get("properties")
    for name in required if isinstance(required, list) else ():
        sub = properties.get(name) if isinstance(properties, dict) else None
        total += cost("," + json.dumps(name) + ":" + _value_text(sub))
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            total += sum(_closing_estimate(sub, cost) for sub in value.values())
        elif key in ("anyOf", "oneOf") and isinstance(value, list):
            total += max((_closing_estimate(sub, cost) for sub in value), default=0)
        elif key in ("allOf", "prefixItems") and isinstance(value, list):
            total += sum(_closing_estimate(sub, cost) for sub in value)
        elif key == "items" and isinstance(value, dict):
            min_items = schema.get("minItems")
            count = max(1, min_items if isinstance(min_items, int) else 0)
            total += count * (_closing_estimate(value, cost) + cost("," + _value_text(value)))
        elif key in _SCHEMA_VALUED:
            total += _closing_estimate(value, cost)
    return total


def _value_text(schema: Any) -> str:
    """About the longest value closing may write for ``schema`` (containers count as empty:
    what they require is counted on its own)."""
    if isinstance(schema, dict):
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return max((json.dumps(v) for v in schema["enum"]), key=len)
        if "const" in schema:
            return json.dumps(schema["const"])
    return '""'


class _JsonEffects:
    """What each token does to a JSON text's nesting, from each scanner state: the change of
    depth, the state after it, and whether it makes progress towards the end (closes a
    string or a container, or is a separator). Exact for JSON, which is all the grammars
    here produce; most tokens hold none of ``"\\{}[],:`` and keep the defaults."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        n = len(pieces)
        self.delta = np.zeros((3, n), dtype=np.int16)
        self.end = np.empty((3, n), dtype=np.uint8)
        self.end[_OUT], self.end[_IN], self.end[_ESC] = _OUT, _IN, _IN
        self.progress = np.zeros((3, n), dtype=bool)
        for token, piece in enumerate(pieces):
            if not piece:
                self.end[_ESC, token] = _ESC
                continue
            if len(piece.translate(None, _JSON_SPECIAL)) == len(piece):
                continue
            for start in (_OUT, _IN, _ESC):
                self.delta[start, token], self.end[start, token], self.progress[start, token] = (
                    _scan(piece, start)
                )


def _scan(piece: bytes, state: int) -> tuple[int, int, bool]:
    depth, progress = 0, False
    for byte in piece:
        if state == _ESC:
            state = _IN
        elif state == _IN:
            if byte == 0x5C:  # backslash
                state = _ESC
            elif byte == 0x22:  # the closing quote
                state, progress = _OUT, True
        elif byte == 0x22:
            state = _IN
        elif byte in b"{[":
            depth += 1
        elif byte in b"}]":
            depth, progress = depth - 1, True
        elif byte in b",:":
            progress = True
    return depth, state, progress


class Grammars:
    """What one model's constraints share: the llguidance tokenizer, the tokens' JSON
    effects, and the scratch buffers of the loop thread."""

    def __init__(self, tokenizer: llguidance.LLTokenizer) -> None:
        self.tokenizer = tokenizer
        self.n_vocab: int = tokenizer.vocab_size
        self.eos: list[int] = list(tokenizer.eos_tokens)
        pieces = [tokenizer.decode_bytes([t]) for t in range(self.n_vocab)]
        self.effects = _JsonEffects(pieces)
        self.n_words = (self.n_vocab + 31) // 32
        # Bits of one mask byte -> eight additive biases (0 allowed, -inf refused).
        bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
        self._bias_of_byte = np.where(bits == 1, np.float32(0), np.float32(-np.inf)).astype(
            np.float32
        )
        self._bias = np.empty((self.n_words * 4, 8), dtype=np.float32)
        self._base_reserve = self._cost(_AFTER_COMMA) + 1

    def compile(self, fmt: Any) -> Constraint:
        """A fresh constraint for ``format``; ``InvalidRequest`` if it cannot be compiled."""
        schema = prepare_schema(fmt)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidRequest(f"invalid JSON schema in format: {brief(str(exc))}") from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            problem = brief(matcher.get_error())
            raise InvalidRequest(f"unsupported JSON schema in format: {problem}")
        reserve = self._base_reserve + _closing_estimate(schema, self._cost)
        return Constraint(self, matcher, reserve)

    def _cost(self, text: str) -> int:
        return len(self.tokenizer.tokenize_str(text))

    def apply(self, words: npt.NDArray[np.int32], logits: npt.NDArray[np.float32]) -> None:
        """Refused tokens' logits to -inf, in place: one table lookup per mask byte and one
        add (about 30 us for 49k tokens, four times faster than unpacking bits)."""
        np.take(self._bias_of_byte, words.view(np.uint8), axis=0, out=self._bias)
        np.add(logits, self._bias.reshape(-1)[: len(logits)], out=logits)


class Constraint:
    """One request's grammar state: the matcher, the next token's mask when one was needed,
    and the JSON scanner state that closing under a running-out budget needs.

    The mask is computed lazily, at most once per token: checking the one token the sampler
    drew (:meth:`allows`) costs a few microseconds, while a mask walks llguidance's whole
    token trie, which each ``llama_decode`` has just pushed out of the caches with the
    model's weights (measured in the engine: ~170 us per mask against ~20 us in a tight
    loop). Most drawn tokens are allowed, so most steps never compute a mask."""

    def __init__(self, grammars: Grammars, matcher: llguidance.LLMatcher, reserve: int) -> None:
        self._g = grammars
        self._matcher = matcher
        self._words = np.zeros(grammars.n_words, dtype=np.int32)
        self._any = False
        self._fresh = False  # whether _words is the mask of the next token
        self.reserve = reserve
        self.depth = 0
        self.state = _OUT
        self.closing = False
        self.done = matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    def words(self) -> npt.NDArray[np.int32]:
        """The next token's mask, computed if it is not yet: one bit per token, 1 = allowed."""
        if not self._fresh:
            words = self._words
            self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            self._any = bool(words.any())
            self._fresh = True
        return self._words

    def allows(self, token: int) -> bool:
        """Whether ``token`` may come next: a bit of the mask if there is one, else the
        matcher's check of that one token."""
        if not 0 <= token < self._g.n_vocab:
            return False
        if self._fresh:
            return bool((int(self._words[token >> 5]) >> (token & 31)) & 1)
        return bool(self._matcher.validate_tokens([token]) == 1)

    def mask(self, logits: npt.NDArray[np.float32]) -> bool:
        """Set every refused token's logit to -inf; False (logits untouched) if nothing is
        allowed, which only a matcher in error can reach."""
        words = self.words()
        if not self._any:
            return False
        self._g.apply(words, logits)
        return True

    def best_allowed(self, logits: npt.NDArray[np.float32]) -> int:
        """The allowed token with the highest logit, -1 if none."""
        allowed = self._allowed()
        if len(allowed) == 0:
            return -1
        return int(allowed[int(np.argmax(logits[allowed]))])

    def accept(self, token: int) -> bool:
        """Feed the chosen token; False if the matcher refuses it (a bug, never expected:
        only allowed tokens are offered)."""
        self._fresh = False
        if not self._matcher.consume_token(token):
            return False
        if token < self._g.n_vocab:
            effects = self._g.effects
            self.depth += int(effects.delta[self.state, token])
            self.state = int(effects.end[self.state, token])
        self.done = self._matcher.is_stopped()
        return True

    # -- closing when the budget runs out ------------------------------------------------

    def must_close(self, left: int) -> bool:
        """Whether the ``left`` tokens still allowed (this one included) are about what
        closing takes: the open strings and containers plus the reserve for required
        properties. Once true it stays true."""
        if not self.closing:
            self.closing = left <= self.depth + (self.state != _OUT) + self.reserve
        return self.closing

    def closing_token(self, logits: npt.NDArray[np.float32]) -> int:
        """The allowed token that brings the end closest: an end token if the output is
        complete; else the least open strings and containers after it; then one that
        closes something or separates; then the model's preference. -1 if none is allowed."""
        allowed = self._allowed()
        if len(allowed) == 0:
            return -1
        ends = allowed[np.isin(allowed, self._g.eos)]
        if len(ends):
            return int(ends[0])
        effects = self._g.effects
        state = self.state
        cost = effects.delta[state, allowed] + (effects.end[state, allowed] != _OUT)
        best = allowed[cost == cost.min()]
        progress = effects.progress[state, best]
        if progress.any():
            best = best[progress]
        return int(best[int(np.argmax(logits[best]))])

    def _allowed(self) -> npt.NDArray[np.intp]:
        words = self.words()
        if not self._any:
            return np.empty(0, dtype=np.intp)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little", count=self._g.n_vocab)
        return np.flatnonzero(bits)
