"""Per-model presets: how the server loads one model, set by its operator in ``pollama.toml``.

A preset is a ``[models."<name>"]`` table::

    [models."qwen2.5-coder:1.5b"]
    num_ctx = 16384
    num_parallel = 2
    keep_alive = "pinned"      # or "30m", 600, -1 (forever), 0
    flash_attention = true
    kv_cache_type = "q8_0"
    num_gpu = 99
    tensor_split = [3, 1]      # shares of the offloaded layers per device (README.md#rpc)

What a preset sets sits between the server-wide settings and the request: a request's own
``options`` and ``keep_alive`` still win, the Modelfile's ``PARAMETER``s give way to it
(README, "Configuration file"). ``keep_alive = "pinned"`` keeps the model loaded for good:
no expiry, never evicted to make room for another, loaded when the server starts, and a
request's ``keep_alive`` cannot unpin it (``pollama stop`` still unloads it).

The names stay as written: matching them to models (``smollm2`` is ``smollm2:latest``) is the
inference layer's job, which knows model names; this module only checks the values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from pollama.format import NANOSECONDS_PER_SECOND, parse_go_duration_ns

__all__ = ["KV_CACHE_TYPES", "ModelPreset", "PresetProblem", "parse_preset"]

KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")
"""The KV cache types llama.cpp takes here (``OLLAMA_KV_CACHE_TYPE``'s values)."""

# num_ctx and num_parallel have ceilings so that a preset cannot ask the worker for an
# allocation no machine has (the request path clamps its own options the same way).
_MAX_NUM_CTX = 1 << 20
_MAX_NUM_PARALLEL = 64
_MAX_NUM_GPU = 1 << 16


class PresetProblem(ValueError):
    """A value in a preset that is not what its key takes; the message says what is."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class ModelPreset:
    """One model's preset; ``None`` leaves a value to the Modelfile, request and settings.

    ``keep_alive`` is in seconds (``math.inf``: forever); ``pinned`` implies ``inf``."""

    num_ctx: int | None = None
    num_parallel: int | None = None
    keep_alive: float | None = None
    pinned: bool = False
    flash_attention: bool | None = None
    kv_cache_type: str | None = None
    num_gpu: int | None = None
    # llama.cpp's --tensor-split: each offload device's share of the offloaded layers, in
    # its order (the RPC servers' devices first, then local GPUs); () leaves it to the plan.
    tensor_split: tuple[float, ...] = ()

    def options(self) -> dict[str, Any]:
        """The request-option layer this preset puts under a request's own options."""
        out: dict[str, Any] = {}
        if self.num_ctx is not None:
            out["num_ctx"] = self.num_ctx
        if self.num_gpu is not None:
            out["num_gpu"] = self.num_gpu
        return out

    def describe(self) -> str:
        """``num_ctx=16384 keep_alive=pinned``: the set values, for logs and --print-config."""
        parts = []
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "pinned" or value is None or value == ():
                continue
            if item.name == "keep_alive":
                value = "pinned" if self.pinned else ("forever" if math.isinf(value) else value)
            parts.append(f"{item.name}={value}")
        return " ".join(parts)


def _int_in(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PresetProblem(key, f"{key} takes a whole number, not {value!r}")
        if not low <= value <= high:
            raise PresetProblem(key, f"{key} must be between {low} and {high}, not {value}")
        return value

    return parse


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PresetProblem(key, f"{key} takes true or false, not {value!r}")
    return value


def _kv_cache_type(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in KV_CACHE_TYPES:
        raise PresetProblem(key, f"{key} takes one of {', '.join(KV_CACHE_TYPES)}, not {value!r}")
    return value.lower()


def _shares(key: str, value: Any) -> tuple[float, ...]:
    """A list of non-negative numbers, not all zero, one per device (at most llama.cpp's
    ``LLAMA_MAX_DEVICES``, 16)."""
    if not isinstance(value, list) or not value or len(value) > 16:
        raise PresetProblem(key, f"{key} takes a list of 1 to 16 numbers, not {value!r}")
    shares = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise PresetProblem(key, f"{key} takes numbers, not {item!r}")
        if not 0 <= item < math.inf:
            raise PresetProblem(key, f"{key} takes non-negative numbers, not {item!r}")
        shares.append(float(item))
    if not any(shares):
        raise PresetProblem(key, f"{key} needs a share above 0")
    return tuple(shares)


def _keep_alive(key: str, value: Any) -> float | str:
    """Seconds (``inf``: forever), or ``"pinned"``; a number is seconds, a negative one
    forever, as Ollama's ``keep_alive``; a string is a Go duration (``"5m"``)."""
    if isinstance(value, str) and value.strip().lower() == "pinned":
        return "pinned"
    if isinstance(value, bool):
        raise PresetProblem(key, f"{key} takes a duration ('5m'), seconds or 'pinned'")
    seconds: float
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_go_duration_ns(value.strip()) / NANOSECONDS_PER_SECOND
        except ValueError:
            raise PresetProblem(
                key, f"{key} takes a duration ('5m', '1h30m'), seconds or 'pinned', not {value!r}"
            ) from None
    else:
        raise PresetProblem(key, f"{key} takes a duration ('5m'), seconds or 'pinned'")
    if math.isnan(seconds):
        raise PresetProblem(key, f"{key} is not a number")
    return math.inf if seconds < 0 else seconds


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "num_ctx": _int_in(4, _MAX_NUM_CTX),
    "num_parallel": _int_in(1, _MAX_NUM_PARALLEL),
    "keep_alive": _keep_alive,
    "flash_attention": _bool,
    "kv_cache_type": _kv_cache_type,
    "num_gpu": _int_in(-1, _MAX_NUM_GPU),
    "tensor_split": _shares,
}


def parse_preset(table: Mapping[str, Any]) -> tuple[ModelPreset, list[str]]:
    """The preset a ``[models."name"]`` table gives, and the keys it does not know (a
    warning, not an error: a newer file read by an older server keeps working). A known key
    with a bad value raises :class:`PresetProblem`."""
    values: dict[str, Any] = {}
    unknown = []
    for key, value in table.items():
        parser = _PARSERS.get(key)
        if parser is None:
            unknown.append(key)
            continue
        values[key] = parser(key, value)
    if values.get("keep_alive") == "pinned":
        values["keep_alive"] = math.inf
        values["pinned"] = True
    return ModelPreset(**values), unknown
