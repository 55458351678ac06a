"""Template functions: Go's built-ins (``text/template/funcs.go``) and Ollama's extras.

Each function receives already-evaluated arguments and returns a value, or raises
``FuncError`` with Go's message (the executor reports it as ``error calling NAME: MESSAGE``).
``and``/``or`` are not here: they short-circuit, so the executor evaluates them itself.

``FUNCTIONS`` records each function's arity and which parameters are Go ``string``s, since Go
checks both before calling. The set of names is also what the parser accepts as identifiers.
"""

from __future__ import annotations

import datetime as _dt
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._budget import MAX_VALUE_CHARS
from ._printf import sprint, sprintf, sprintln
from ._values import (
    GoList,
    GoMap,
    GoStruct,
    format_value,
    go_json,
    is_true,
    type_name,
)


class FuncError(Exception):
    """A function failed; the message is Go's error text."""


@dataclass(frozen=True, slots=True)
class Func:
    """A callable plus the Go signature facts the executor checks."""

    call: Callable[..., Any]
    fixed: int  # number of fixed parameters
    variadic: bool
    string_params: frozenset[int] = frozenset()  # indexes of ``string`` parameters
    string_variadic: bool = False  # the variadic part is ``...string``


def _index_arg(index: Any, cap: int) -> int:
    if index is None:
        raise FuncError("cannot index slice/array with nil")
    if isinstance(index, bool) or not isinstance(index, int):
        raise FuncError(f"cannot index slice/array with type {type_name(index)}")
    if index < 0 or index > cap:
        raise FuncError(f"index out of range: {index}")
    return index


def _index(item: Any, *indexes: Any) -> Any:
    if item is None:
        raise FuncError("index of untyped nil")
    for index in indexes:
        if item is None:
            raise FuncError("index of nil pointer")
        if isinstance(item, str | bytes | list | tuple):
            seq: Sequence[Any] = item.encode("utf-8") if isinstance(item, str) else item
            x = _index_arg(index, len(seq))
            if x == len(seq):
                raise FuncError(f"index out of range: {x}")
            item = seq[x]
        elif isinstance(item, Mapping):
            if index is None:
                raise FuncError("value is nil; should be of type string")
            if not isinstance(index, str):
                raise FuncError(f"value has type {type_name(index)}; should be string")
            item = item.get(index)
        else:
            raise FuncError(f"can't index item of type {type_name(item)}")
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    if item is None:
        raise FuncError("slice of untyped nil")
    if len(indexes) > 3:
        raise FuncError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) == 3:
            raise FuncError("cannot 3-index slice a string")
        data = item.encode("utf-8")
        length = len(data)
    elif isinstance(item, list | tuple | bytes):
        length = len(item)
    else:
        raise FuncError(f"can't slice item of type {type_name(item)}")
    idx = [0, length, length]
    for i, index in enumerate(indexes):
        idx[i] = _index_arg(index, length)
    if idx[0] > idx[1]:
        raise FuncError(f"invalid slice index: {idx[0]} > {idx[1]}")
    if len(indexes) == 3 and idx[1] > idx[2]:
        raise FuncError(f"invalid slice index: {idx[1]} > {idx[2]}")
    if isinstance(item, str):
        return data[idx[0] : idx[1]].decode("utf-8", "replace")
    if isinstance(item, GoList):
        return item.like(item[idx[0] : idx[1]])
    return list(item[idx[0] : idx[1]]) if isinstance(item, tuple) else item[idx[0] : idx[1]]


def _len(item: Any) -> int:
    if item is None:
        raise FuncError("len of nil pointer")
    if isinstance(item, str):
        return len(item.encode("utf-8"))
    if isinstance(item, bytes | list | tuple | Mapping):
        return len(item)
    raise FuncError(f"len of type {type_name(item)}")


def _not(arg: Any) -> bool:
    return not is_true(arg)


_INVALID, _BOOL, _INT, _FLOAT, _STRING = range(5)


def _basic_kind(v: Any) -> int:
    if isinstance(v, bool):
        return _BOOL
    if isinstance(v, int):
        return _INT
    if isinstance(v, float):
        return _FLOAT
    if isinstance(v, str):
        return _STRING
    return _INVALID


def _is_nil(v: Any) -> bool:
    return v is None or (isinstance(v, GoList | GoMap) and v.nil)


def _eq(arg1: Any, *rest: Any) -> bool:
    if not rest:
        raise FuncError("missing argument for comparison")
    k1 = _basic_kind(arg1)
    for arg in rest:
        k2 = _basic_kind(arg)
        if k1 != k2:
            if arg1 is not None and arg is not None:
                raise FuncError("incompatible types for comparison")
            continue
        if k1 != _INVALID:
            if arg1 == arg:
                return True
            continue
        # Neither is a basic value: nil compares with anything nillable.
        if _is_nil(arg1) or _is_nil(arg):
            if _is_nil(arg1) == _is_nil(arg):
                return True
            continue
        if isinstance(arg, list | tuple | Mapping | bytes):
            raise FuncError(f"non-comparable type {format_value(arg)}: {type_name(arg)}")
        if isinstance(arg1, GoStruct) and isinstance(arg, GoStruct):
            if arg1.type_name != arg.type_name:
                raise FuncError("incompatible types for comparison")
            if arg1 is arg or arg1 == arg:
                return True
            continue
        raise FuncError("incompatible types for comparison")
    return False


def _ne(arg1: Any, arg2: Any) -> bool:
    return not _eq(arg1, arg2)


def _lt(arg1: Any, arg2: Any) -> bool:
    k1, k2 = _basic_kind(arg1), _basic_kind(arg2)
    if k1 == _INVALID or k2 == _INVALID:
        raise FuncError("invalid type for comparison")
    if k1 != k2:
        raise FuncError("incompatible types for comparison")
    if k1 == _BOOL:
        raise FuncError("invalid type for comparison")
    return bool(arg1 < arg2)


def _le(arg1: Any, arg2: Any) -> bool:
    return _lt(arg1, arg2) or _eq(arg1, arg2)


def _gt(arg1: Any, arg2: Any) -> bool:
    return not _le(arg1, arg2)


def _ge(arg1: Any, arg2: Any) -> bool:
    return not _lt(arg1, arg2)


def _eval_args(args: Sequence[Any]) -> str:
    """``evalArgs``: like ``fmt.Sprint`` but a nil argument prints as ``<no value>``."""
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return sprint(["<no value>" if a is None else a for a in args])


def _html(*args: Any) -> str:
    s = _eval_args(args)
    return (
        s.replace("&", "&amp;")
        .replace("'", "&#39;")
        .replace('"', "&#34;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("\0", "\ufffd")
    )


_JS_ESCAPES = {
    "\\": "\\\\",
    "'": "\\'",
    '"': '\\"',
    "<": "\\u003C",
    ">": "\\u003E",
    "&": "\\u0026",
    "=": "\\u003D",
}


def _js(*args: Any) -> str:
    out = []
    for ch in _eval_args(args):
        if ch in _JS_ESCAPES:
            out.append(_JS_ESCAPES[ch])
        elif ch < " ":
            out.append(f"\\u00{ord(ch):02X}")
        elif ord(ch) >= 0x80 and not ch.isprintable():
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return "".join(out)


def _urlquery(*args: Any) -> str:
    return urllib.parse.quote_plus(_eval_args(args), safe="")


def _call(fn: Any, *args: Any) -> Any:
    if fn is None:
        raise FuncError("call of nil")
    raise FuncError(f"non-function of type {type_name(fn)}")


def _print(*args: Any) -> str:
    return sprint(args)


def _println(*args: Any) -> str:
    return sprintln(args)


# -- Ollama's functions (template/template.go funcs) -------------------------------------


def _json(v: Any) -> str:
    return go_json(v)


_TS_TYPES = {
    "string": "string",
    "number": "number",
    "integer": "number",
    "boolean": "boolean",
    "array": "any[]",
    "object": "Record<string, any>",
    "null": "null",
}


def ts_type(prop: GoStruct) -> str:
    """``api.ToolProperty.ToTypeScriptType``."""
    any_of = prop.fields.get("AnyOf") or []
    if any_of:
        return " | ".join(ts_type(p) if isinstance(p, GoStruct) else "any" for p in any_of)
    types = prop.fields.get("Type") or []
    if not types:
        return "any"
    return " | ".join(_TS_TYPES.get(t, "any") for t in types)


def _to_typescript_type(v: Any) -> str:
    if isinstance(v, GoStruct) and v.type_name == "api.ToolProperty":
        return ts_type(v)
    return "any"


def make_functions(today: _dt.date, max_len: int = MAX_VALUE_CHARS) -> dict[str, Func]:
    """The function table for one execution; ``today`` feeds ``currentDate``/``yesterdayDate``,
    ``max_len`` is the longest string ``printf`` may build (it stops formatting there)."""

    def printf(fmt: str, *args: Any) -> str:
        return sprintf(fmt, args, limit=max_len)

    def current_date(*_args: str) -> str:
        return today.strftime("%Y-%m-%d")

    def yesterday_date(*_args: str) -> str:
        return (today - _dt.timedelta(days=1)).strftime("%Y-%m-%d")

    return {
        "and": Func(lambda *a: None, 1, True),  # evaluated by the executor (short-circuit)
        "or": Func(lambda *a: None, 1, True),
        "not": Func(_not, 1, False),
        "len": Func(_len, 1, False),
        "index": Func(_index, 1, True),
        "slice": Func(_slice, 1, True),
        "print": Func(_print, 0, True),
        "printf": Func(printf, 1, True, frozenset({0})),
        "println": Func(_println, 0, True),
        "html": Func(_html, 0, True),
        "js": Func(_js, 0, True),
        "urlquery": Func(_urlquery, 0, True),
        "call": Func(_call, 1, True),
        "eq": Func(_eq, 1, True),
        "ne": Func(_ne, 2, False),
        "lt": Func(_lt, 2, False),
        "le": Func(_le, 2, False),
        "gt": Func(_gt, 2, False),
        "ge": Func(_ge, 2, False),
        "json": Func(_json, 1, False),
        "currentDate": Func(current_date, 0, True, string_variadic=True),
        "yesterdayDate": Func(yesterday_date, 0, True, string_variadic=True),
        "toTypeScriptType": Func(_to_typescript_type, 1, False),
    }


FUNCTION_NAMES: frozenset[str] = frozenset(make_functions(_dt.date(2000, 1, 1)))
"""Every identifier the parser accepts as a function name."""
