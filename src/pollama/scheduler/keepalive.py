"""``keep_alive``: how long a model stays loaded after its last request
(docs/ollama-behaviour.md#keep-alive).

Durations are float seconds; :data:`pollama.config.FOREVER_SECONDS` (``math.inf``) means
"never unload", which is what Ollama stores as ``time.Duration(math.MaxInt64)`` (about 292
years). Anything that long or longer, and anything negative, is forever here too.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from pollama.config import FOREVER_SECONDS
from pollama.errors import InvalidRequest
from pollama.format import NANOSECONDS_PER_SECOND, parse_go_duration_ns

__all__ = ["FOREVER_DELTA", "expiry_datetime", "normalize_keep_alive", "parse_keep_alive"]

_MAX_DURATION_NS = 2**63 - 1
FOREVER_DELTA = timedelta(seconds=_MAX_DURATION_NS // NANOSECONDS_PER_SECOND)
"""How far in the future a never-expiring model's ``expires_at`` is: Go's MaxInt64
duration, which ``ollama ps`` shows as ``Forever`` (anything over 20 years away)."""


def _go_type_name(value: Any) -> str:
    """The name Go's ``reflect.TypeOf`` prints for a decoded JSON value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "map[string]interface {}"
    if isinstance(value, list):
        return "[]interface {}"
    return type(value).__name__


def normalize_keep_alive(seconds: float) -> float:
    """Negative values, and values of Go's MaxInt64 nanoseconds or more, become forever
    (``math.inf``)."""
    if seconds < 0 or seconds * NANOSECONDS_PER_SECOND >= _MAX_DURATION_NS:
        return FOREVER_SECONDS
    return float(seconds)


def parse_keep_alive(value: Any) -> float | None:
    """A request's ``keep_alive`` in seconds, by Go's ``api.Duration.UnmarshalJSON``.

    * ``None`` (absent or JSON null): ``None``, meaning "keep the runner's current value"
      (``OLLAMA_KEEP_ALIVE`` when it loads);
    * a JSON number: seconds, fractions allowed; negative means forever;
    * a string: a Go duration (``"5m"``, ``"1h30m"``, ``"-1s"``); negative means forever.
      A string without a unit (``"3600"``) is refused, as Ollama refuses it;
    * anything else (``true``, an object, a list): refused.

    Raises :class:`InvalidRequest` (400) with Go's error text.
    """
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond float range: forever either way
            return FOREVER_SECONDS
        if math.isnan(seconds):
            raise InvalidRequest("invalid keep_alive: NaN is not a duration")
        return normalize_keep_alive(seconds)
    if isinstance(value, str):
        try:
            nanoseconds = parse_go_duration_ns(value)
        except ValueError as exc:
            raise InvalidRequest(
                f"invalid keep_alive: {exc} (use a duration such as \"5m\" or \"1h30m\", "
                "or a number of seconds)"
            ) from exc
        if nanoseconds < 0:
            return FOREVER_SECONDS
        return normalize_keep_alive(nanoseconds / NANOSECONDS_PER_SECOND)
    raise InvalidRequest(f"invalid keep_alive: Unsupported type: '{_go_type_name(value)}'")


def expiry_datetime(now: datetime, seconds: float) -> datetime:
    """``now + seconds`` as a date; forever is :data:`FOREVER_DELTA` away."""
    if math.isinf(seconds) or seconds * NANOSECONDS_PER_SECOND >= _MAX_DURATION_NS:
        return now + FOREVER_DELTA
    return now + timedelta(seconds=max(seconds, 0.0))
