"""The data model templates run on, and how Go prints and JSON-encodes it.

Templates only ever see plain data: ``None`` (Go's nil), ``bool``, ``int``, ``float``
(``float64``), ``str``, ``bytes``, lists/tuples (``[]interface {}``), mappings with string keys
(``map[string]interface {}``), and three small types that stand in for the Go types Ollama hands
its templates:

* ``GoStruct``: a struct with fields in declaration order, optional JSON tags (name, omitempty)
  and an optional ``String()`` that returns its JSON, like Ollama's ``templateTool``;
* ``GoList`` / ``GoMap``: a typed slice or map that can be *nil* (printing ``[]``/``map[]`` but
  JSON ``null``) and can have a JSON ``String()`` (``templateTools``, ``templateArgs``,
  ``templateProperties``);
* ``PropertyType``: the JSON-schema ``type`` of a tool property, a list of type names that
  prints as ``string`` or ``[string null]`` and encodes as a string or an array.

Nothing else is reachable: field access is a mapping lookup or a ``GoStruct`` field, never
``getattr``, so a template cannot touch Python objects (the sandbox is by construction).

``format_value`` is Go's ``fmt`` ``%v``; ``go_json`` is ``encoding/json.Marshal`` (sorted map
keys, HTML-safe escapes, Go's float formatting). Both matter because Ollama's prompts embed
tools and arguments printed exactly this way.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..format import go_float

JsonField = tuple[str, str, bool]
"""A struct field's (Go name, JSON name, omitempty)."""


class GoStruct:
    """A Go struct value; ``fields`` maps Go field names to values, in declaration order."""

    __slots__ = ("type_name", "fields", "json_fields", "stringer")

    def __init__(
        self,
        type_name: str,
        fields: dict[str, Any],
        *,
        json_fields: Sequence[JsonField] | None = None,
        stringer: bool = False,
    ) -> None:
        self.type_name = type_name
        self.fields = fields
        self.json_fields: tuple[JsonField, ...] = (
            tuple(json_fields)
            if json_fields is not None
            else tuple((name, name, False) for name in fields)
        )
        self.stringer = stringer

    def __repr__(self) -> str:
        return f"GoStruct({self.type_name!r}, {self.fields!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, GoStruct)
            and other.type_name == self.type_name
            and other.fields == self.fields
        )

    __hash__ = None  # type: ignore[assignment]


class GoList(list[Any]):
    """A typed Go slice. ``nil`` marks a nil slice; ``stringer`` prints it as its JSON."""

    def __init__(
        self,
        items: Iterable[Any] = (),
        *,
        type_name: str = "[]interface {}",
        nil: bool = False,
        stringer: bool = False,
    ) -> None:
        super().__init__(items)
        self.type_name = type_name
        self.nil = nil and not self
        self.stringer = stringer

    def like(self, items: Iterable[Any]) -> GoList:
        """A slice of the same Go type holding ``items`` (for ``slice``)."""
        return GoList(items, type_name=self.type_name, stringer=self.stringer)


class GoMap(dict[str, Any]):
    """A typed Go map. ``nil_text`` is what its ``String()`` returns when nil (if it has one).

    ``ordered`` keeps insertion order in JSON (Ollama's ordered property maps); ordinary Go
    maps encode and print with sorted keys.
    """

    def __init__(
        self,
        items: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
        *,
        type_name: str = "map[string]interface {}",
        nil: bool = False,
        stringer: bool = False,
        nil_text: str | None = None,
        ordered: bool = False,
    ) -> None:
        super().__init__(items)
        self.type_name = type_name
        self.nil = nil and not self
        self.stringer = stringer
        self.nil_text = nil_text
        self.ordered = ordered


class PropertyType(list[str]):
    """``api.PropertyType``: one or more JSON-schema type names."""

    def go_string(self) -> str:
        if not self:
            return ""
        if len(self) == 1:
            return self[0]
        return "[" + " ".join(self) + "]"


def type_name(v: Any) -> str:
    """The Go type name of a value, for ``%T`` and error messages."""
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, str):
        return "string"
    if isinstance(v, bytes):
        return "[]uint8"
    if isinstance(v, PropertyType):
        return "api.PropertyType"
    if isinstance(v, GoList | GoMap | GoStruct):
        return v.type_name
    if isinstance(v, list | tuple):
        return "[]interface {}"
    if isinstance(v, Mapping):
        return "map[string]interface {}"
    return "unsupported " + type(v).__name__


def is_supported(v: Any) -> bool:
    """Whether a value belongs to the data model (checked where values enter templates)."""
    return v is None or isinstance(
        v, bool | int | float | str | bytes | list | tuple | Mapping | GoStruct
    )


def has_string_method(v: Any) -> bool:
    """Whether the value's Go type implements ``fmt.Stringer``."""
    return isinstance(v, PropertyType) or (isinstance(v, GoList | GoMap | GoStruct) and v.stringer)


def string_method(v: Any) -> str:
    """Call ``String()`` on a Stringer value."""
    if isinstance(v, PropertyType):
        return v.go_string()
    if isinstance(v, GoMap) and v.nil and v.nil_text is not None:
        return v.nil_text
    return go_json(v)


def is_true(v: Any) -> bool | None:
    """Go's truth (``if``/``with``/``and``/``or``/``not``); None when the value has none."""
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float):
        return v != 0
    if isinstance(v, str | bytes | list | tuple | Mapping):
        return len(v) > 0
    if isinstance(v, GoStruct):
        return True
    return None


def _key_order(key: Any) -> tuple[int, Any]:
    """Go's ``fmtsort`` order for map keys: numbers numerically, strings bytewise.

    Keys of other types (never produced by JSON) sort last by type name, so sorting never
    calls a method of an arbitrary object.
    """
    if isinstance(key, bool):
        return (2, int(key))
    if isinstance(key, int | float):
        return (0, key)
    if isinstance(key, str):
        return (1, key)
    return (3, type(key).__name__)


def sorted_keys(m: Mapping[Any, Any]) -> list[Any]:
    """The keys of a map in the order Go's ``range`` and ``fmt`` visit them."""
    return sorted(m.keys(), key=_key_order)


def key_text(key: Any) -> str:
    """A map key as text (Go prints and JSON-encodes string and number keys)."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool | int | float):
        return format_value(key)
    raise ValueError(f"json: unsupported map key type {type_name(key)}")


# -- fmt -----------------------------------------------------------------------------------


def _digits(f: float) -> tuple[str, int]:
    """Shortest round-trip decimal digits of ``abs(f)`` and the decimal point position.

    The value is ``0.DIGITS × 10**dp``; zero is ``("0", 1)``.
    """
    r = repr(abs(f))
    mant, _, exp_text = r.partition("e")
    exp = int(exp_text) if exp_text else 0
    whole, _, frac = mant.partition(".")
    digits = whole + frac
    dp = len(whole) + exp
    stripped = digits.lstrip("0")
    dp -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    if not digits:
        return "0", 1
    return digits, dp


def _exp_suffix(exp: int, letter: str = "e") -> str:
    sign = "-" if exp < 0 else "+"
    return f"{letter}{sign}{abs(exp):02d}"


def _fixed(digits: str, dp: int) -> str:
    if dp <= 0:
        return "0." + "0" * (-dp) + digits
    if dp >= len(digits):
        return digits + "0" * (dp - len(digits))
    return digits[:dp] + "." + digits[dp:]


def _sci(digits: str, dp: int, letter: str = "e") -> str:
    mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return mant + _exp_suffix(dp - 1, letter)


def format_float_g(f: float, upper: bool = False) -> str:
    """``strconv.FormatFloat(f, 'g', -1, 64)``: what ``%v`` and ``%g`` print for a float64."""
    return go_float(f, upper)


def format_float_json(f: float) -> str:
    """``encoding/json``'s float64 encoding; raises ``ValueError`` for NaN and infinities."""
    if math.isnan(f) or math.isinf(f):
        raise ValueError(f"json: unsupported value: {format_float_g(f)}")
    if f == 0:
        return "-0" if math.copysign(1.0, f) < 0 else "0"
    sign = "-" if f < 0 else ""
    digits, dp = _digits(f)
    a = abs(f)
    if a < 1e-6 or a >= 1e21:
        text = _sci(digits, dp)
        # Go trims one leading zero of a negative exponent: e-07 -> e-7.
        if len(text) >= 4 and text[-4] == "e" and text[-3] == "-" and text[-2] == "0":
            text = text[:-2] + text[-1]
        return sign + text
    return sign + _fixed(digits, dp)


def format_value(v: Any, plus: bool = False) -> str:
    """Go's ``fmt.Sprint(v)`` (the ``%v`` verb); ``plus`` is ``%+v`` (struct field names)."""
    if v is None:
        return "<nil>"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if has_string_method(v):
        return string_method(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return format_float_g(v)
    if isinstance(v, bytes):
        return "[" + " ".join(str(b) for b in v) + "]"
    if isinstance(v, GoStruct):
        parts = []
        for name, value in v.fields.items():
            text = format_value(value, plus)
            parts.append(f"{name}:{text}" if plus else text)
        return "{" + " ".join(parts) + "}"
    if isinstance(v, list | tuple):
        return "[" + " ".join(format_value(e, plus) for e in v) + "]"
    if isinstance(v, Mapping):
        inner = " ".join(f"{format_value(k)}:{format_value(v[k], plus)}" for k in sorted_keys(v))
        return "map[" + inner + "]"
    return f"%!v({type_name(v)})"


# -- encoding/json -------------------------------------------------------------------------

_JSON_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",
    "\f": "\\f",
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def json_string(s: str) -> str:
    """A JSON string literal exactly as Go's ``json.Marshal`` writes it (HTML-safe)."""
    out = ['"']
    for ch in s:
        esc = _JSON_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        elif "\ud800" <= ch <= "\udfff":
            out.append("\ufffd")  # a lone surrogate is invalid UTF-8 in Go
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _is_empty_json(v: Any) -> bool:
    """Go's ``omitempty`` test: false, 0, "", nil, and empty slices/maps are omitted."""
    if v is None:
        return True
    if isinstance(v, bool):
        return not v
    if isinstance(v, int | float):
        return v == 0
    if isinstance(v, str | bytes | list | tuple | Mapping):
        return len(v) == 0
    return False


def _encode(v: Any, out: list[str], depth: int) -> None:
    if depth > 1000:
        raise ValueError("json: unsupported value: encountered a cycle")
    if v is None:
        out.append("null")
    elif isinstance(v, bool):
        out.append("true" if v else "false")
    elif isinstance(v, int):
        out.append(str(v))
    elif isinstance(v, float):
        out.append(format_float_json(v))
    elif isinstance(v, str):
        out.append(json_string(v))
    elif isinstance(v, bytes):
        out.append('"' + base64.b64encode(v).decode("ascii") + '"')
    elif isinstance(v, PropertyType):
        if len(v) == 1:
            out.append(json_string(v[0]))
        else:
            _encode_list(list(v), out, depth)
    elif isinstance(v, GoStruct):
        out.append("{")
        first = True
        for go_name, json_name, omitempty in v.json_fields:
            value = v.fields.get(go_name)
            if omitempty and _is_empty_json(value):
                continue
            if not first:
                out.append(",")
            first = False
            out.append(json_string(json_name))
            out.append(":")
            _encode(value, out, depth + 1)
        out.append("}")
    elif isinstance(v, list | tuple):
        if isinstance(v, GoList) and v.nil:
            out.append("null")
        else:
            _encode_list(v, out, depth)
    elif isinstance(v, Mapping):
        if isinstance(v, GoMap) and v.nil:
            out.append("null")
            return
        keys = list(v.keys()) if isinstance(v, GoMap) and v.ordered else sorted_keys(v)
        out.append("{")
        for i, key in enumerate(keys):
            if i:
                out.append(",")
            out.append(json_string(key_text(key)))
            out.append(":")
            _encode(v[key], out, depth + 1)
        out.append("}")
    else:
        raise ValueError(f"json: unsupported type: {type_name(v)}")


def _encode_list(v: Sequence[Any], out: list[str], depth: int) -> None:
    out.append("[")
    for i, e in enumerate(v):
        if i:
            out.append(",")
        _encode(e, out, depth + 1)
    out.append("]")


def go_json(v: Any) -> str:
    """``json.Marshal(v)`` as text; "" when Go's marshal would fail (NaN, ±Inf).

    Ollama ignores marshal errors in its template helpers, which yields an empty string.
    """
    out: list[str] = []
    try:
        _encode(v, out, 0)
    except ValueError:
        return ""
    return "".join(out)
