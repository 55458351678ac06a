"""Structured output on the server side: checking ``format``, and schemas for forced tool calls.

The worker constrains sampling (``CompletionRequest.format``: None, ``"json"`` or a JSON
Schema dict); this module decides what reaches it. :func:`normalize_format` accepts
Ollama's values (absent, ``""``, ``null``, ``"json"``, a schema object) and refuses the
rest with Ollama's message ``invalid format: ...`` — as a 400 rather than Ollama's 500, since
the caller can fix it. A schema object is checked for structure before any model is loaded,
so a typo gets an error that names the part of the schema at fault (a JSON pointer) instead
of a failure halfway through generation. What is well-formed but beyond what the worker's
grammar engine supports is the worker's to refuse.

:func:`tool_call_schema` is the schema a forced tool call (``tool_choice`` ``required`` or
a named function) is generated under: ``{"name": <one of the tools>, "arguments": {...}}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pollama.errors import InvalidRequest

__all__ = ["normalize_format", "tool_call_schema"]

_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_SUBSCHEMA = ("additionalProperties", "not", "if", "then", "else", "contains",
              "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
           "minContains", "maxContains")
_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _go_quote_json(value: Any) -> str:
    """Go's ``%q`` of the raw JSON bytes, as Ollama prints a bad ``format``."""
    return json.dumps(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


MAX_SCHEMA_CHARS = 256 << 10
"""The largest ``format`` schema, as compact JSON. The grammar engine's work grows with the
schema (a 1 MB ``const`` took seconds per mask); real schemas, tools' included, are a few
kilobytes."""


def normalize_format(value: Any) -> str | dict[str, Any] | None:
    """``None``, ``"json"`` or a checked schema dict; ``InvalidRequest`` for anything else."""
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    if isinstance(value, dict):
        size = len(json.dumps(value, separators=(",", ":")))
        if size > MAX_SCHEMA_CHARS:
            raise InvalidRequest(
                f"the JSON schema in format is {size} characters; at most "
                f"{MAX_SCHEMA_CHARS} are accepted"
            )
        _check_schema(value, value, "")
        return value
    raise InvalidRequest(
        f'invalid format: {_go_quote_json(value)}; expected "json" or a valid JSON Schema object'
    )


def _fail(path: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"invalid JSON schema in format at '{path or '/'}': {problem}")


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _resolve(root: Mapping[str, Any], ref: str) -> bool:
    node: Any = root
    for part in ref[1:].split("/")[1:] if ref.startswith("#/") else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _check_schema(schema: Any, root: Mapping[str, Any], path: str) -> None:
    """Structural checks of one (sub)schema; raises naming the JSON pointer at fault.

    Its own keywords are checked first, then its subschemas in keyword order, so that of
    several faults the one reported stays the same."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise _fail(path, f"a schema must be an object or a boolean, not {json.dumps(schema)}")
    _check_keywords(schema, path)
    _check_ref(schema.get("$ref"), root, path)
    for sub, sub_path in _subschemas(schema, path):
        _check_schema(sub, root, sub_path)


def _check_keywords(schema: Mapping[str, Any], path: str) -> None:
    """The keywords whose values are not schemas: type, required, enum, counts, numbers,
    pattern."""
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        bad = [k for k in kinds if not isinstance(k, str) or k not in _TYPES]
        if bad or not kinds:
            raise _fail(f"{path}/type", f"unknown type {json.dumps(bad[0] if bad else kind)} "
                        f"(expected one of {', '.join(sorted(_TYPES))})")
    required = schema.get("required")
    if required is not None and (
        not isinstance(required, list) or not all(isinstance(r, str) for r in required)
    ):
        raise _fail(f"{path}/required", "must be a list of property names")
    enum = schema.get("enum")
    if enum is not None and (not isinstance(enum, list) or not enum):
        raise _fail(f"{path}/enum", "must be a non-empty list")
    for key in _COUNTS:
        value = schema.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise _fail(f"{path}/{key}", "must be a non-negative integer")
    for key in _NUMBERS:
        value = schema.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _fail(f"{path}/{key}", "must be a number")
    pattern = schema.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise _fail(f"{path}/pattern", "must be a string")


def _check_ref(ref: Any, root: Mapping[str, Any], path: str) -> None:
    """A ``$ref`` must be local and point at something in the root schema."""
    if ref is None:
        return
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise _fail(f"{path}/$ref", f"only local references (#/...) are supported, "
                    f"not {json.dumps(ref)}")
    if not _resolve(root, ref):
        raise _fail(f"{path}/$ref", f"reference {json.dumps(ref)} points nowhere")


def _subschemas(schema: Mapping[str, Any], path: str) -> Iterator[tuple[Any, str]]:
    """A schema's subschemas with their JSON pointers, in keyword order. Lazy: a keyword
    whose value is not the list or object of schemas it must be fails only once the
    subschemas before it were checked."""
    for key in _SUBSCHEMA:
        if key in schema:
            yield schema[key], f"{path}/{key}"
    for key in _SCHEMA_LISTS:
        if key in schema:
            items = schema[key]
            if not isinstance(items, list) or not items:
                raise _fail(f"{path}/{key}", "must be a non-empty list of schemas")
            for i, sub in enumerate(items):
                yield sub, f"{path}/{key}/{i}"
    for key in _SCHEMA_MAPS:
        if key in schema:
            subs = schema[key]
            if not isinstance(subs, Mapping):
                raise _fail(f"{path}/{key}", "must be an object of schemas")
            for name, sub in subs.items():
                yield sub, f"{path}/{key}/{_escape(str(name))}"
    if "items" in schema:
        items = schema["items"]
        if isinstance(items, list):  # draft-04 tuple form
            for i, sub in enumerate(items):
                yield sub, f"{path}/items/{i}"
        else:
            yield items, f"{path}/items"


def _parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool.get("function") or {}
    params = function.get("parameters") if isinstance(function, Mapping) else None
    # A local $ref would point elsewhere once embedded in the call's schema.
    if isinstance(params, dict) and params and '"$ref"' not in json.dumps(params):
        try:
            _check_schema(params, params, "")
        except InvalidRequest:
            return {"type": "object"}
        return params
    return {"type": "object"}


def tool_call_schema(tools: Sequence[Mapping[str, Any]], only: str | None = None) -> dict[str, Any]:
    """The schema of one call to ``only`` (or to any of ``tools``): name, then arguments."""
    options = []
    for tool in tools:
        function = tool.get("function") or {}
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name or (only is not None and name != only):
            continue
        options.append(
            {
                "type": "object",
                "properties": {"name": {"enum": [name]}, "arguments": _parameters(tool)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if len(options) == 1:
        return options[0]
    return {"anyOf": options}
