"""Human-readable formatting, byte-for-byte as Ollama's Go code prints it.

Users (and scripts that scrape ``ollama list``) see these strings, so each function mirrors a
Go function exactly, named in its docstring: ``format.HumanBytes``, ``format.HumanNumber``,
``format.HumanTime``, ``time.Duration.String``, ``time.ParseDuration``,
``fmt.Sprintf("%#v")`` and ``time.RFC3339Nano``. Where Go's integer division truncates
toward zero or ``math.Round`` rounds half away from zero, the code here does the same, not
Python's floor division or banker's rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

__all__ = [
    "NANOSECONDS_PER_SECOND",
    "go_duration",
    "go_duration_from_seconds",
    "go_float",
    "go_quote",
    "go_value",
    "human_bytes",
    "human_number",
    "human_time",
    "parse_go_duration",
    "parse_go_duration_ns",
    "parse_rfc3339",
    "rfc3339_local",
    "rfc3339_utc",
]

NANOSECONDS_PER_SECOND = 1_000_000_000
_MAX_INT64 = 2**63 - 1


# -- sizes and counts ------------------------------------------------------------------------


_BYTE_UNITS = ((10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "KB"))


def human_bytes(n: int) -> str:
    """SI (1000-based) size: ``999 B``, ``1.5 KB``, ``4.7 GB``, ``12 GB`` (Go HumanBytes).

    At 10 or more units the value is truncated to an integer; below that one decimal is
    shown unless the value is whole.
    """
    scale = next((s for s in _BYTE_UNITS if n >= s[0]), None)
    if scale is None:
        return f"{n} B"
    value, unit = n / scale[0], scale[1]
    if value >= 10 or value == math.trunc(value):
        return f"{int(value)} {unit}"
    return f"{value:.1f} {unit}"


def human_number(n: int) -> str:
    """Parameter counts as Ollama shows them: ``8B``, ``7.6B``, ``137M``, ``22.71M``, ``10K``
    (Go HumanNumber: one decimal for billions, two for millions, none for thousands)."""
    if n >= 10**9:
        value = n / 10**9
        return f"{value:.0f}B" if value == math.floor(value) else f"{value:.1f}B"
    if n >= 10**6:
        value = n / 10**6
        return f"{value:.0f}M" if value == math.floor(value) else f"{value:.2f}M"
    if n >= 10**3:
        return f"{n / 10**3:.0f}K"
    return str(n)


# -- relative times --------------------------------------------------------------------------


def _go_round(x: float) -> int:
    """Go math.Round: half away from zero."""
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def _go_div(a: int, b: int) -> int:
    """Go integer division: truncates toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _human_duration(seconds_f: float) -> str:
    seconds = int(seconds_f)
    if seconds < 1:
        return "Less than a second"
    if seconds == 1:
        return "1 second"
    if seconds < 60:
        return f"{seconds} seconds"
    minutes = int(seconds_f / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = _go_round(seconds_f / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds_f / 3600) // 24 // 365} years"


def _is_go_zero_time(t: datetime) -> bool:
    """Go's zero time.Time is 0001-01-01T00:00:00Z; JSON clients decode it to this."""
    if t.tzinfo is None:
        return t == datetime(1, 1, 1)
    try:
        return t.astimezone(UTC).replace(tzinfo=None) == datetime(1, 1, 1)
    except OverflowError:  # an aware time before year 1 in UTC: not the zero instant
        return False


def human_time(t: datetime | None, now: datetime | None = None, zero: str = "Never") -> str:
    """``4 days ago``, ``About a minute ago``, ``2 hours from now`` or ``Forever`` (Go HumanTime).

    ``None`` and Go's zero time give ``zero``. Times more than 20 years ahead are
    ``Forever`` (how ``ollama ps`` shows an infinite keep-alive). Naive datetimes are taken
    as local time. ``now`` is injectable for tests.
    """
    if t is None or _is_go_zero_time(t):
        return zero
    current = now if now is not None else datetime.now(UTC)
    delta = (_aware(current) - _aware(t)).total_seconds()
    if _go_div(_go_div(int(delta / 3600), 24), 365) < -20:
        return "Forever"
    if delta < 0:
        return _human_duration(-delta) + " from now"
    return _human_duration(delta) + " ago"


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.astimezone()


# -- Go durations ----------------------------------------------------------------------------


def _fmt_frac(v: int, prec: int) -> tuple[str, int]:
    """Go fmtFrac: the fraction of v/10**prec without trailing zeros, and v // 10**prec."""
    digits = []
    printed = False
    for _ in range(prec):
        digit = v % 10
        printed = printed or digit != 0
        if printed:
            digits.append(str(digit))
        v //= 10
    frac = "." + "".join(reversed(digits)) if printed else ""
    return frac, v


def go_duration(ns: int) -> str:
    """Go ``time.Duration(ns).String()``: ``0s``, ``812.5ms``, ``3.123456789s``, ``1m2.5s``,
    ``1h0m0s``, ``1.5µs``. The argument is integer nanoseconds, as in the API's durations."""
    ns = int(ns)
    if ns == 0:
        return "0s"
    neg = ns < 0
    u = -ns if neg else ns
    if u < NANOSECONDS_PER_SECOND:
        if u < 1_000:
            text = f"{u}ns"
        elif u < 1_000_000:
            frac, whole = _fmt_frac(u, 3)
            text = f"{whole}{frac}µs"
        else:
            frac, whole = _fmt_frac(u, 6)
            text = f"{whole}{frac}ms"
    else:
        frac, secs = _fmt_frac(u, 9)
        text = f"{secs % 60}{frac}s"
        minutes = secs // 60
        if minutes > 0:
            text = f"{minutes % 60}m{text}"
            hours = minutes // 60
            if hours > 0:
                text = f"{hours}h{text}"
    return "-" + text if neg else text


def go_duration_from_seconds(seconds: float) -> str:
    """:func:`go_duration` of a float number of seconds, converted the way Go converts
    ``time.Duration(s * float64(time.Second))`` (truncating toward zero)."""
    return go_duration(int(seconds * NANOSECONDS_PER_SECOND))


_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek small letter mu
    "ms": 1_000_000,
    "s": NANOSECONDS_PER_SECOND,
    "m": 60 * NANOSECONDS_PER_SECOND,
    "h": 3600 * NANOSECONDS_PER_SECOND,
}


# Longer than this codebase's ~60 lines on purpose: a port of Go's ``time.ParseDuration``,
# kept in its shape so that it can be read against the original.
def parse_go_duration_ns(text: str) -> int:
    """Go ``time.ParseDuration``, returning integer nanoseconds.

    Accepts ``[-+]?([0-9]*(\\.[0-9]*)?[a-z]+)+`` with the units ns, us, µs, ms, s, m, h,
    and the bare string ``0``. Raises ``ValueError`` with Go's message otherwise: a
    unit-less number such as ``"3600"`` is an error, exactly as in Ollama.
    """
    quoted = _time_quote(text)
    s = text
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0
    while s:
        if not (s[0] == "." or "0" <= s[0] <= "9"):
            raise ValueError(f"time: invalid duration {quoted}")
        i = 0
        while i < len(s) and "0" <= s[i] <= "9":
            i += 1
        pre = i > 0
        whole = int(s[:i]) if pre else 0
        if whole > 2**63:
            raise ValueError(f"time: invalid duration {quoted}")
        s = s[i:]
        frac_digits = ""
        post = False
        if s.startswith("."):
            s = s[1:]
            i = 0
            while i < len(s) and "0" <= s[i] <= "9":
                i += 1
            frac_digits, s = s[:i], s[i:]
            post = i > 0
        if not pre and not post:
            raise ValueError(f"time: invalid duration {quoted}")
        i = 0
        while i < len(s) and not (s[i] == "." or "0" <= s[i] <= "9"):
            i += 1
        if i == 0:
            raise ValueError(f"time: missing unit in duration {quoted}")
        unit_text, s = s[:i], s[i:]
        unit = _UNITS_NS.get(unit_text)
        if unit is None:
            raise ValueError(f"time: unknown unit {_time_quote(unit_text)} in duration {quoted}")
        if whole > 2**63 // unit:
            raise ValueError(f"time: invalid duration {quoted}")
        value = whole * unit
        fraction, scale = _leading_fraction(frac_digits)
        if fraction > 0:
            # Go does this in float64 too; it is nanosecond-exact for every unit up to hours.
            value += int(float(fraction) * (float(unit) / scale))
            if value > 2**63:
                raise ValueError(f"time: invalid duration {quoted}")
        total += value
        if total > 2**63:
            raise ValueError(f"time: invalid duration {quoted}")
    if neg:
        return -total
    if total > _MAX_INT64:
        raise ValueError(f"time: invalid duration {quoted}")
    return total


def _time_quote(text: str) -> str:
    """Go's ``time.quote`` for error messages: ``"`` and ``\\`` backslashed, and every
    UTF-8 byte of a non-ASCII or control character written as ``\\xNN``."""
    out = ['"']
    for ch in text:
        if ord(ch) >= 0x80 or ch < " ":
            out += [f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogatepass")]
        else:
            out.append("\\" + ch if ch in '"\\' else ch)
    out.append('"')
    return "".join(out)


def _leading_fraction(digits: str) -> tuple[int, float]:
    """Go leadingFraction: stop accumulating precision before uint64 overflow."""
    x, scale = 0, 1.0
    for ch in digits:
        if x > _MAX_INT64 // 10:
            break
        y = x * 10 + int(ch)
        if y > 2**63:
            break
        x, scale = y, scale * 10
    return x, scale


def parse_go_duration(text: str) -> float:
    """Go ``time.ParseDuration`` in seconds (float); see :func:`parse_go_duration_ns`."""
    return parse_go_duration_ns(text) / NANOSECONDS_PER_SECOND


# -- Go %#v ----------------------------------------------------------------------------------


def go_quote(text: str, ascii_only: bool = False) -> str:
    """Go ``strconv.Quote`` (``QuoteToASCII`` when ``ascii_only``): double-quoted,
    ``\\"``/``\\\\`` escaped, ``\\n``-style escapes for the C escapes, ``\\xNN`` for other
    control bytes, ``\\uNNNN``/``\\UNNNNNNNN`` for other non-printable runes; printable Unicode
    is kept as is. This is the one Go quoting in the project (templates, show, the REPL)."""
    out = ['"']
    for ch in text:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            ch = "\ufffd"  # Go strings cannot hold surrogates; decoding yields U+FFFD
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
        elif ch.isprintable() and not (ascii_only and code >= 0x80):
            out.append(ch)  # Go IsPrint: letters, marks, numbers, punctuation, symbols, ' '
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


_C_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def go_float(value: float, upper: bool = False) -> str:
    """Go ``%v`` of a float64, i.e. ``strconv.FormatFloat(v, 'g', -1, 64)``.

    The shortest digits that round-trip, in ``%e`` form when the decimal exponent is below
    -4 or at least 6 (Go fixes 6 for the shortest form), else plain: ``4096``, ``0.7``,
    ``1e+06``, ``1.5e-05``, ``123456``. ``repr`` yields the same shortest digits as Go's Ryu.
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0"
    decimal = Decimal(repr(abs(value))).normalize()
    _, digit_tuple, exponent = decimal.as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple))
    point = len(digits) + exponent  # Go's digs.dp: where the decimal point sits
    exp = point - 1
    if exp < -4 or exp >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        letter = "E" if upper else "e"  # %G
        return f"{sign}{mantissa}{letter}{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{sign}{digits}{'0' * (point - len(digits))}"
    return f"{sign}{digits[:point]}.{digits[point:]}"


def go_value(value: object) -> str:
    """Go ``fmt.Sprintf("%#v", v)`` for a JSON-decoded value, as ``ollama show`` prints
    parameters: strings Go-quoted, numbers as float64 (JSON numbers are float64 in Go, so
    ``4096`` and ``0.7`` print bare, ``1e+06`` in exponent form), ``true``/``false``. Lists
    and maps (which ``show`` never passes whole) print as Go's ``[]interface {}{...}`` and
    ``map[string]interface {}{...}`` with sorted keys; null is ``<nil>`` on its own and
    ``interface {}(nil)`` inside a list or map, as Go prints a nil ``any``."""
    if value is None:
        return "<nil>"
    return _go_value(value)


def _go_value(value: object) -> str:
    if value is None:
        return "interface {}(nil)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return go_float(float(value))
    if isinstance(value, str):
        return go_quote(value)
    if isinstance(value, Mapping):
        items = ", ".join(
            f"{go_quote(str(k))}:{_go_value(v)}" for k, v in sorted(value.items(), key=str)
        )
        return f"map[string]interface {{}}{{{items}}}"
    if isinstance(value, Sequence):
        return "[]interface {}{" + ", ".join(_go_value(v) for v in value) + "}"
    return go_quote(str(value))


# -- timestamps ------------------------------------------------------------------------------


def _split_ns(t: datetime | int) -> tuple[int, int]:
    """(whole seconds since the epoch, nanoseconds within the second) of ``t``.

    An int is nanoseconds since the epoch (``os.stat().st_mtime_ns``); a naive datetime is
    local time, as everywhere in Python.
    """
    if isinstance(t, datetime):
        aware = _aware(t)
        delta = aware - datetime(1970, 1, 1, tzinfo=UTC)
        seconds = delta.days * 86400 + delta.seconds
        return seconds, delta.microseconds * 1000
    seconds, nanos = divmod(int(t), NANOSECONDS_PER_SECOND)
    return seconds, nanos


def _format_rfc3339(base: datetime, nanos: int) -> str:
    text = (
        f"{base.year:04d}-{base.month:02d}-{base.day:02d}"
        f"T{base.hour:02d}:{base.minute:02d}:{base.second:02d}"
    )
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    offset = base.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    if minutes == 0:
        return text + "Z"
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return f"{text}{sign}{hours:02d}:{mins:02d}"


def rfc3339_utc(t: datetime | int) -> str:
    """Go ``t.UTC().Format(time.RFC3339Nano)``: ``2024-09-12T21:17:29.110811Z``.

    Fractional seconds keep up to nanoseconds with trailing zeros trimmed (no dot when
    whole). ``t`` is a datetime or integer nanoseconds since the epoch.
    """
    seconds, nanos = _split_ns(t)
    base = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    return _format_rfc3339(base, nanos)


def rfc3339_local(t: datetime | int) -> str:
    """Go ``t.Local().Format(time.RFC3339Nano)``: ``2025-05-10T08:06:48.639712648-07:00``.

    Uses the process's local zone (``TZ``); a zero offset prints ``Z`` as Go does. Pass
    ``st_mtime_ns`` to keep the file time's nanoseconds.
    """
    seconds, nanos = _split_ns(t)
    base = datetime.fromtimestamp(seconds, UTC).astimezone()
    return _format_rfc3339(base, nanos)


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp as Ollama writes it (``Z`` or an offset, up to nine
    fractional digits; digits past microseconds are dropped). Raises ``ValueError``."""
    return datetime.fromisoformat(text)
