"""Go's ``fmt.Sprint``, ``fmt.Sprintln`` and ``fmt.Sprintf`` over the template data model.

Templates call these as ``print``, ``println`` and ``printf``. The common verbs (``%v %s %d %q
%x %f %e %g %t %c %T %%``), flags (``+ - # 0`` and space), width and precision (including
``*`` and ``[n]`` argument indexes) behave as in Go, and so do Go's in-band error strings
(``%!d(string=x)``, ``%!s(MISSING)``, ``%!(EXTRA int=1)``, ``%!(NOVERB)``), because a template
that misuses ``printf`` renders those strings in Ollama rather than failing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..format import go_quote
from ._budget import RenderLimitExceeded
from ._values import (
    GoStruct,
    format_float_g,
    format_value,
    has_string_method,
    sorted_keys,
    string_method,
    type_name,
)

_MAX_WIDTH = 1_000_000  # Go's fmt rejects larger widths and precisions (tooLarge)


def sprint(args: Sequence[Any]) -> str:
    """``fmt.Sprint``: a space between operands when neither side is a string."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if i > 0 and not isinstance(arg, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(format_value(arg))
    return "".join(out)


def sprintln(args: Sequence[Any]) -> str:
    """``fmt.Sprintln``: operands separated by spaces, then a newline."""
    return " ".join(format_value(a) for a in args) + "\n"


@dataclass(slots=True)
class _Spec:
    plus: bool = False
    minus: bool = False
    sharp: bool = False
    space: bool = False
    zero: bool = False
    width: int | None = None
    prec: int | None = None


def _pad(text: str, spec: _Spec, *, zero_ok: bool = True, signed: bool = False) -> str:
    """Pad to the width; zero padding goes after the sign of a ``signed`` number."""
    if spec.width is None or len(text) >= spec.width:
        return text
    fill = spec.width - len(text)
    if spec.minus:
        return text + " " * fill
    if spec.zero and zero_ok:
        if signed and text[:1] in ("+", "-", " "):
            return text[0] + "0" * fill + text[1:]
        return "0" * fill + text
    return " " * fill + text




def _quote_rune(code: int, ascii_only: bool) -> str:
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF or code < 0:
        code = 0xFFFD
    ch = chr(code)
    if ch == "'":
        return "'\\''"
    if ch == '"':
        return "'\"'"
    inner = go_quote(ch, ascii_only)[1:-1]
    return "'" + inner + "'"


def _bad_verb(verb: str, arg: Any) -> str:
    if arg is None:
        return f"%!{verb}(<nil>)"
    return f"%!{verb}({type_name(arg)}={format_value(arg)})"


def _fmt_int(v: int, verb: str, spec: _Spec) -> str:
    if verb == "c":
        return _pad(
            chr(v) if 0 <= v <= 0x10FFFF and not 0xD800 <= v <= 0xDFFF else "\ufffd",
            spec,
            zero_ok=False,
        )
    if verb == "q":
        return _pad(_quote_rune(v, spec.plus), spec, zero_ok=False)
    if verb == "U":
        text = f"U+{v:04X}" if v >= 0 else f"U+-{-v:04X}"
        if spec.sharp and 0 <= v <= 0x10FFFF and chr(v).isprintable():
            text += f" '{chr(v)}'"
        return _pad(text, spec, zero_ok=False)
    base = {"d": 10, "v": 10, "b": 2, "o": 8, "O": 8, "x": 16, "X": 16}.get(verb)
    if base is None:
        return _bad_verb(verb, v)
    neg = v < 0
    digits = format(abs(v), {2: "b", 8: "o", 10: "d", 16: "x"}[base])
    if verb == "X":
        digits = digits.upper()
    if spec.prec is not None:
        if spec.prec == 0 and v == 0:
            digits = ""
        digits = digits.rjust(spec.prec, "0")
    elif spec.zero and not spec.minus and spec.width is not None:
        room = spec.width - (1 if (neg or spec.plus or spec.space) else 0)
        prefix_len = 2 if (spec.sharp and base in (2, 16)) or verb == "O" else 0
        prefix_len += 1 if spec.sharp and base == 8 and verb == "o" else 0
        digits = digits.rjust(room - prefix_len, "0")
    prefix = ""
    if spec.sharp and verb in ("x", "X"):
        prefix = "0" + verb
    elif spec.sharp and verb == "b":
        prefix = "0b"
    elif spec.sharp and verb == "o" and not digits.startswith("0"):
        prefix = "0"
    if verb == "O":
        prefix = "0o"
    sign = "-" if neg else "+" if spec.plus else " " if spec.space else ""
    return _pad(sign + prefix + digits, spec, zero_ok=False)


def _fmt_float(v: float, verb: str, spec: _Spec) -> str:
    if verb not in "vgGeEfF":
        return _bad_verb(verb, v)
    if v != v or v in (float("inf"), float("-inf")):
        text = "NaN" if v != v else ("+Inf" if v > 0 else "-Inf")
        if text != "NaN" and text[0] == "+" and not spec.plus:
            text = text[1:]
        if spec.plus and text == "NaN":
            text = "+NaN"
        return _pad(text, spec, zero_ok=False)
    prec = spec.prec
    if verb in ("v", "g", "G") and prec is None:
        text = format_float_g(v, upper=verb == "G")
    elif verb in ("v", "g", "G"):
        text = format(v, f".{prec}{'G' if verb == 'G' else 'g'}")
    else:
        py = {"e": "e", "E": "E", "f": "f", "F": "f"}[verb]
        text = format(v, f".{6 if prec is None else prec}{py}")
    if not text.startswith("-") and spec.plus:
        text = "+" + text
    elif not text.startswith("-") and spec.space:
        text = " " + text
    return _pad(text, spec, signed=True)


def _fmt_str(s: str, verb: str, spec: _Spec) -> str:
    if verb in ("v", "s"):
        if spec.sharp and verb == "v":
            return _pad(go_quote(s), spec)
        if spec.prec is not None:
            s = s[: spec.prec]
        return _pad(s, spec)
    if verb == "q":
        if spec.prec is not None:
            s = s[: spec.prec]
        if spec.sharp and "`" not in s and all(c == "\t" or c.isprintable() for c in s):
            return _pad("`" + s + "`", spec)
        return _pad(go_quote(s, ascii_only=spec.plus), spec)
    if verb in ("x", "X"):
        data = s.encode("utf-8", "surrogatepass")
        if spec.prec is not None:
            data = data[: spec.prec]
        pieces = [format(b, "02x" if verb == "x" else "02X") for b in data]
        prefix = ("0" + verb) if spec.sharp else ""
        if spec.space:
            text = " ".join(prefix + p for p in pieces)
        else:
            text = prefix + "".join(pieces)
        return _pad(text, spec)
    return _bad_verb(verb, s)


def _fmt_arg(arg: Any, verb: str, spec: _Spec, depth: int = 0) -> str:
    if verb == "T":
        return _pad(type_name(arg), spec)
    if arg is None:
        if verb == "v":
            return _pad("<nil>", spec)
        return _bad_verb(verb, None)
    if isinstance(arg, bool):
        if verb in ("t", "v"):
            return _pad("true" if arg else "false", spec)
        return _bad_verb(verb, arg)
    if isinstance(arg, int):
        return _fmt_int(arg, verb, spec)
    if isinstance(arg, float):
        return _fmt_float(arg, verb, spec)
    if isinstance(arg, str):
        return _fmt_str(arg, verb, spec)
    if has_string_method(arg) and verb in "vsxXq" and not (spec.sharp and verb == "v"):
        return _fmt_str(string_method(arg), verb, spec)
    if isinstance(arg, bytes):
        if verb in ("s", "q", "x", "X"):
            return _fmt_str(arg.decode("utf-8", "replace"), verb, spec)
        return "[" + " ".join(_fmt_int(b, verb, spec) for b in arg) + "]"
    if depth > 100:
        return "<...>"
    if isinstance(arg, GoStruct):
        parts = []
        for name, value in arg.fields.items():
            text = _fmt_arg(value, verb, spec, depth + 1)
            parts.append(f"{name}:{text}" if spec.plus and verb == "v" else text)
        return "{" + " ".join(parts) + "}"
    if isinstance(arg, list | tuple):
        return "[" + " ".join(_fmt_arg(e, verb, spec, depth + 1) for e in arg) + "]"
    if isinstance(arg, Mapping):
        inner = " ".join(
            _fmt_arg(k, verb, spec, depth + 1) + ":" + _fmt_arg(arg[k], verb, spec, depth + 1)
            for k in sorted_keys(arg)
        )
        return "map[" + inner + "]"
    return _bad_verb(verb, arg)


_INDEX = re.compile(r"\[(\d+)\]")
_NUMBER = re.compile(r"\d+")


def _number(digits: str) -> int:
    """A width or precision; any number too long to be valid counts as too large."""
    return int(digits) if len(digits) <= 9 else _MAX_WIDTH + 1


# Longer than this codebase's ~60 lines on purpose: a port of Go's ``fmt.Sprintf`` state
# machine (``doPrintf``), kept in its shape so that it can be read against the original.
def sprintf(fmt: str, args: Sequence[Any], *, limit: int | None = None) -> str:
    """``fmt.Sprintf(fmt, args...)``; ``RenderLimitExceeded`` as soon as the result would be
    longer than ``limit`` characters (widths alone can make each verb a million long)."""
    out: list[str] = []
    size = 0

    def add(text: str) -> None:
        nonlocal size
        size += len(text)
        if limit is not None and size > limit:
            raise RenderLimitExceeded(
                f"the result of printf exceeds {limit} characters (the limit for one value)",
                "value",
            )
        out.append(text)

    arg_num = 0
    reordered = False
    i, end = 0, len(fmt)
    while i < end:
        nxt = fmt.find("%", i)
        if nxt < 0:
            add(fmt[i:])
            break
        add(fmt[i:nxt])
        i = nxt + 1
        spec = _Spec()
        while i < end and fmt[i] in "#0+- ":
            c = fmt[i]
            if c == "#":
                spec.sharp = True
            elif c == "0":
                spec.zero = not spec.minus
            elif c == "+":
                spec.plus = True
            elif c == "-":
                spec.minus, spec.zero = True, False
            else:
                spec.space = True
            i += 1
        good_arg = True
        after_index = False

        def arg_index(pos: int, current: int) -> tuple[int, int, bool, bool]:
            m = _INDEX.match(fmt, pos)
            if pos < end and fmt[pos] == "[":
                if m is None:
                    return current, pos + 1, False, False
                n = _number(m.group(1)) - 1
                if n < 0 or n >= len(args):
                    return current, m.end(), True, False
                return n, m.end(), True, True
            return current, pos, False, True

        arg_num, i, after_index, ok = arg_index(i, arg_num)
        good_arg = good_arg and ok
        reordered = reordered or after_index
        # width
        bad_width = False
        if i < end and fmt[i] == "*":
            i += 1
            if (
                arg_num < len(args)
                and isinstance(args[arg_num], int)
                and not isinstance(args[arg_num], bool)
            ):
                w = args[arg_num]
                if w < 0:
                    spec.minus, spec.zero, w = True, False, -w
                if w > _MAX_WIDTH:
                    bad_width = True
                else:
                    spec.width = w
            else:
                bad_width = True
            arg_num += 1
            after_index = False
        else:
            m = _NUMBER.match(fmt, i)
            if m:
                w = _number(m.group())
                i = m.end()
                if w > _MAX_WIDTH:
                    bad_width = True
                else:
                    spec.width = w
                if after_index:
                    good_arg = False
        if bad_width:
            add("%!(BADWIDTH)")
        # precision
        if i < end and fmt[i] == ".":
            i += 1
            if after_index:
                good_arg = False
            arg_num, i, after_index, ok = arg_index(i, arg_num)
            good_arg = good_arg and ok
            reordered = reordered or after_index
            if i < end and fmt[i] == "*":
                i += 1
                if (
                    arg_num < len(args)
                    and isinstance(args[arg_num], int)
                    and not isinstance(args[arg_num], bool)
                ):
                    p = args[arg_num]
                    if p < 0:
                        spec.prec = None
                    elif p > _MAX_WIDTH:
                        add("%!(BADPREC)")
                    else:
                        spec.prec = p
                else:
                    add("%!(BADPREC)")
                arg_num += 1
                after_index = False
            else:
                m = _NUMBER.match(fmt, i)
                p = _number(m.group()) if m else 0
                i = m.end() if m else i
                if p > _MAX_WIDTH:
                    add("%!(BADPREC)")
                else:
                    spec.prec = p
        if not after_index:
            arg_num, i, after_index, ok = arg_index(i, arg_num)
            good_arg = good_arg and ok
            reordered = reordered or after_index
        if i >= end:
            add("%!(NOVERB)")
            break
        verb = fmt[i]
        i += 1
        if verb == "%":
            add("%")
        elif not good_arg:
            add(f"%!{verb}(BADINDEX)")
        elif arg_num >= len(args):
            add(f"%!{verb}(MISSING)")
        elif verb == "w":
            add(_bad_verb(verb, args[arg_num]))
            arg_num += 1
        else:
            add(_fmt_arg(args[arg_num], verb, spec))
            arg_num += 1
    if not reordered and arg_num < len(args):
        extra = []
        for a in args[arg_num:]:
            extra.append("<nil>" if a is None else f"{type_name(a)}={format_value(a)}")
        add("%!(EXTRA " + ", ".join(extra) + ")")
    return "".join(out)
