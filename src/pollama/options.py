"""Model options: every option's name, type, default, range and whether it reloads the model.

This is Ollama's ``api.Options`` (``api/types.go``): the table of option names with their
types and defaults (``DefaultOptions``), the typed conversion of Modelfile ``PARAMETER``
strings (``FormatParams``) and the validation of a request's ``options`` object
(``Options.FromMap``). It is domain, not wire: the protocol front-ends, the Modelfile parser,
the store and the runner's types (``SamplingOptions`` and ``LoadSpec`` in ``runner/base.py``
take their defaults from :data:`DEFAULT_OPTIONS`) all read it, so it imports nothing but the
standard library and :mod:`pollama.errors` (the worker process imports it too).

Precedence, as in Ollama: ``DEFAULT_OPTIONS``, then the model's params layer (written from the
Modelfile), then the request's ``options``; :func:`merge_options` applies it.

Where we deliberately do better than Ollama: values that llama.cpp cannot use safely
(negative sizes, absurd context or batch sizes, thread counts, non-finite floats, integers
outside the C range) are rejected with a message that names the option and the allowed
range, instead of reaching the runner (CVE-2026-21869 was a heap overflow in llama.cpp's
server from a negative size that came straight from a request).

What must stay true:

* :data:`OPTIONS` is the only list of valid names and the only place a default is written;
  the Modelfile parser, the request validation, the error messages and the runner's types
  all read it.
* An option marked ``reload`` is a field of ``LoadSpec`` (so a change of it loads the model
  again: the scheduler reloads when the specs differ); every other option pollama uses is a
  field of ``SamplingOptions`` (``tests/test_options.py`` checks both).
* A value returned by :func:`format_params` or :func:`coerce_options` has the declared Python
  type (``int`` never ``bool``, ``float``, ``bool``, ``list[str]``) and lies within bounds.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from pollama.errors import InvalidOption

__all__ = [
    "DEFAULT_NUM_CTX",
    "DEFAULT_OPTIONS",
    "DEPRECATED_PARAMETERS",
    "DEPRECATED_REQUEST_OPTIONS",
    "MAX_CONTEXT",
    "MAX_STOPS",
    "MAX_STOP_CHARS",
    "OPTIONS",
    "OptionKind",
    "OptionSpec",
    "coerce_options",
    "default_options",
    "format_params",
    "go_parse_bool",
    "merge_options",
    "validate_parameters",
]

OptionKind = Literal["int", "float", "bool", "list[str]"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38

MAX_CONTEXT = 2**24
"""Largest accepted ``num_ctx``/``num_batch``: above every trained context length shipped today
(10M tokens), far below what would overflow llama.cpp's 32-bit sizes once multiplied by the
number of parallel sequences."""

DEFAULT_NUM_CTX = 4096
"""The context (per sequence) a model loads with when ``num_ctx`` is 0 (its default) and
``OLLAMA_CONTEXT_LENGTH`` is unset; it is then capped by the model's trained context. Ollama
picks 4k, 32k or 256k by the GPU's VRAM; pollama runs on the CPU and always starts from this."""


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One option: its JSON name, value type, Ollama's default and accepted range.

    A ``None`` default (``main_gpu``, ``use_mmap``) means "not set": llama.cpp's own choice.
    ``reload`` marks the options fixed when the model is loaded: changing one loads the model
    again.
    """

    name: str
    kind: OptionKind
    default: Any
    reload: bool = False
    minimum: int | None = None
    maximum: int | None = None


def _int(
    name: str,
    default: int | None,
    *,
    reload: bool = False,
    lo: int = INT32_MIN,
    hi: int = INT32_MAX,
) -> OptionSpec:
    return OptionSpec(name, "int", default, reload, lo, hi)


OPTIONS: Mapping[str, OptionSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            # load-time (api.Runner); the reload ones are LoadSpec's fields
            # num_ctx 0 means "the server default": OLLAMA_CONTEXT_LENGTH, else DEFAULT_NUM_CTX
            _int("num_ctx", 0, reload=True, lo=0, hi=MAX_CONTEXT),
            _int("num_batch", 512, reload=True, lo=1, hi=MAX_CONTEXT),
            # num_gpu and main_gpu decide where the layers go (scheduler/placement.py): num_gpu
            # becomes LoadSpec.gpu_layers (-1: as many as fit), so a change of it reloads too;
            # draft_num_predict bounds a draft of speculative decoding from the prompt's
            # n-grams (runner/ngram.py; 0: off), a runtime option here: no draft model to load.
            # Ollama's 4 is for a draft model; drafts that cost nothing to make pay best long
            # (the engine still drafts only where it pays and grows a draft as its request's
            # drafts are kept): 63, so that with the pending token a decode holds 64 rows; on
            # a CPU a row costs less the more rows a decode holds, and llama.cpp's kernels
            # take them 16 at a time, so a multiple of 16 costs least for its rows
            # (bench/spec_ceiling.py measures it)
            _int("num_gpu", -1, lo=-1),
            _int("main_gpu", None, reload=True, lo=0),  # None: the plan's choice
            OptionSpec("use_mmap", "bool", None, reload=True),
            _int("num_thread", 0, reload=True, lo=0, hi=4096),  # 0: the CPUs the worker may use
            _int("draft_num_predict", 63, lo=0, hi=1024),
            # draft_always: every copy found is drafted (up to draft_num_predict), whatever
            # the measured costs say, as llama-server's n-gram drafts are: the ceiling a
            # benchmark compares with, and a test's drafts on any machine
            OptionSpec("draft_always", "bool", False),
            # runtime (api.Options): SamplingOptions' fields
            _int("num_keep", 4, lo=-1),
            _int("seed", -1, lo=INT64_MIN, hi=INT64_MAX),  # -1: random
            # any value is accepted; the runner bounds it to 10 x num_ctx, as Ollama does
            _int("num_predict", -1, lo=INT64_MIN, hi=INT64_MAX),
            _int("top_k", 40),
            OptionSpec("top_p", "float", 0.9),
            OptionSpec("min_p", "float", 0.0),
            OptionSpec("typical_p", "float", 1.0),
            _int("repeat_last_n", 64, lo=-1),  # 0 disables, -1 means num_ctx
            OptionSpec("temperature", "float", 0.8),
            OptionSpec("repeat_penalty", "float", 1.0),
            OptionSpec("presence_penalty", "float", 0.0),
            OptionSpec("frequency_penalty", "float", 0.0),
            OptionSpec("stop", "list[str]", ()),
        )
    }
)
"""Every valid option, in Ollama's documentation order."""

DEPRECATED_PARAMETERS: frozenset[str] = frozenset(
    {
        "penalize_newline",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mlock",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
    }
)
"""Modelfile parameters Ollama still accepts, warns about and drops (``parser/parser.go``)."""

DEPRECATED_REQUEST_OPTIONS: frozenset[str] = DEPRECATED_PARAMETERS | {
    "numa",
    "embedding_only",
    "tfs_z",
}
"""Request options old clients (the ``ollama`` Python package) still send; ignored."""


def _default_value(spec: OptionSpec) -> Any:
    return list(spec.default) if spec.kind == "list[str]" else spec.default


DEFAULT_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {name: _default_value(spec) for name, spec in OPTIONS.items()}
)
"""Ollama's ``DefaultOptions()``, read-only. Use :func:`default_options` for a mutable copy."""


def default_options() -> dict[str, Any]:
    """A fresh, mutable copy of :data:`DEFAULT_OPTIONS` (the ``stop`` list is not shared)."""
    return {name: _default_value(spec) for name, spec in OPTIONS.items()}


def _valid_names() -> str:
    return ", ".join(OPTIONS)


# --- Modelfile PARAMETER strings (Go strconv rules) -------------------------------------------

_GO_INT = re.compile(r"[+-]?[0-9]+")
_GO_DEC_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_GO_HEX_FLOAT = re.compile(
    r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?[0-9]+"
)
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def go_parse_bool(text: str) -> bool | None:
    """Go ``strconv.ParseBool``; ``None`` when the text is not one of its spellings.

    The one parser of Go booleans: Modelfile ``PARAMETER`` values here, ``OLLAMA_*``
    variables in ``config.py`` (which then counts any other non-empty value as true)."""
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    return None


def _float32_shortest(value: float) -> float:
    """Round to float32 and back to the shortest decimal that names it, as Go's JSON does.

    Ollama stores ``float32`` values, so ``0.1`` is written ``0.1`` and ``0.123456789`` is
    written ``0.12345679`` in the params layer; doing the same keeps our params blobs
    byte-identical to Ollama's.
    """
    single = struct.unpack("<f", struct.pack("<f", value))[0]
    for digits in range(1, 10):
        candidate = float(f"{single:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", candidate))[0] == single:
            return candidate
    return single


def _parse_go_float32(text: str) -> float | None:
    """``strconv.ParseFloat(text, 32)``; ``None`` where Go errors, and for NaN/Inf."""
    if _GO_DEC_FLOAT.fullmatch(text):
        value = float(text)
    elif _GO_HEX_FLOAT.fullmatch(text):
        sign = -1.0 if text.startswith("-") else 1.0
        value = sign * float.fromhex(text.lstrip("+-"))
    else:
        return None  # also "inf"/"nan": valid Go, but not JSON and useless to a sampler
    try:
        struct.pack("<f", value)  # OverflowError exactly where Go returns ErrRange
    except OverflowError:
        return None
    if not math.isfinite(value):
        return None
    return _float32_shortest(value)


def _vals(values: Iterable[str]) -> str:
    """Go's ``%s`` of a ``[]string``: ``[a b]``."""
    return "[" + " ".join(values) + "]"


def format_params(params: Mapping[str, list[str]]) -> dict[str, Any]:
    """Type Modelfile ``PARAMETER`` values, as Ollama's ``api.FormatParams``.

    ``params`` maps a parameter name to its string values (several only for ``stop``; other
    options use the first). Raises :class:`InvalidOption` with Ollama's messages
    (``unknown parameter 'x'``, ``invalid float value [x]``, ``invalid int value [x]``,
    ``invalid bool value [x]``), the first one completed with the list of valid names, and
    for values outside the safe range.
    """
    out: dict[str, Any] = {}
    for name, values in params.items():
        spec = OPTIONS.get(name)
        if spec is None:
            hint = " (deprecated and no longer supported)" if name in DEPRECATED_PARAMETERS else ""
            raise InvalidOption(
                f"unknown parameter '{name}'{hint}; valid parameters are: {_valid_names()}"
            )
        values = list(values)
        if spec.kind == "list[str]":
            _check_stops(spec, values, noun="parameter")
            out[name] = values
            continue
        if not values:
            raise InvalidOption(f"missing value for parameter '{name}'")
        text = values[0]
        value: Any
        if spec.kind == "int":
            value = int(text) if _GO_INT.fullmatch(text) else None
            if value is None or not INT64_MIN <= value <= INT64_MAX:
                raise InvalidOption(f"invalid int value {_vals(values)}")
        elif spec.kind == "float":
            value = _parse_go_float32(text)
            if value is None:
                raise InvalidOption(f"invalid float value {_vals(values)}")
        else:
            value = go_parse_bool(text)
            if value is None:
                raise InvalidOption(f"invalid bool value {_vals(values)}")
        _check_range(spec, value, noun="parameter")
        out[name] = value
    return out


# --- request options (JSON) -------------------------------------------------------------------


MAX_STOPS = 64
MAX_STOP_CHARS = 512
"""Stop strings per request and characters per stop string. Every generated token is
matched against every stop string, so the list's size is a per-token cost; real lists
(a template's end markers, OpenAI's four) are far below both."""


def _check_stops(spec: OptionSpec, value: list[str], *, noun: str) -> None:
    if len(value) > MAX_STOPS:
        raise InvalidOption(
            f'{noun} "{spec.name}" may hold at most {MAX_STOPS} strings (got {len(value)})'
        )
    longest = max((len(stop) for stop in value), default=0)
    if longest > MAX_STOP_CHARS:
        raise InvalidOption(
            f'{noun} "{spec.name}" strings may be at most {MAX_STOP_CHARS} characters '
            f"(got one of {longest})"
        )


def _check_range(spec: OptionSpec, value: Any, *, noun: str) -> None:
    if spec.kind == "list[str]":
        _check_stops(spec, value, noun=noun)
        return
    if spec.kind == "float":
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise InvalidOption(f'{noun} "{spec.name}" must be a finite number')
        return
    if spec.kind != "int":
        return
    if spec.minimum is not None and value < spec.minimum:
        raise InvalidOption(f'{noun} "{spec.name}" must be at least {spec.minimum} (got {value})')
    if spec.maximum is not None and value > spec.maximum:
        raise InvalidOption(f'{noun} "{spec.name}" must be at most {spec.maximum} (got {value})')


def _coerce_one(spec: OptionSpec, value: Any) -> Any:
    """One JSON value to the option's type, with Go ``FromMap``'s acceptance and messages."""
    key = spec.name
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidOption(f'option "{key}" must be of type integer')
        if isinstance(value, float):
            if not math.isfinite(value) or not INT64_MIN <= value < 2.0**63:
                raise InvalidOption(f'option "{key}" must be a finite integer in range')
            value = int(value)  # JSON numbers are truncated toward zero, as Go's int64(f)
        return value
    if spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidOption(f'option "{key}" must be of type float32')
        try:
            return float(value)
        except OverflowError:
            raise InvalidOption(f'option "{key}" must be a finite number') from None
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise InvalidOption(f'option "{key}" must be of type boolean')
        return value
    if not isinstance(value, list | tuple):
        raise InvalidOption(f'option "{key}" must be of type array')
    if not all(isinstance(item, str) for item in value):
        raise InvalidOption(f'option "{key}" must be of an array of strings')
    return list(value)


def coerce_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Validate a request's ``options`` object, as Ollama's ``Options.FromMap``.

    Returns the typed options that were given (not merged with defaults) and a list of
    warnings for the keys that were ignored (unknown or deprecated), which Ollama only logs.
    ``null`` values are skipped, as in Go. Int options accept any JSON number (truncated),
    float options accept integers, ``stop`` must be an array of strings (a bare string is an
    error in Ollama too). Raises :class:`InvalidOption` on the first bad value.
    """
    typed: dict[str, Any] = {}
    warnings: list[str] = []
    for key, value in options.items():
        spec = OPTIONS.get(key)
        if spec is None:
            if key in DEPRECATED_REQUEST_OPTIONS:
                warnings.append(f"option {key} is deprecated and ignored")
            else:
                warnings.append(f"invalid option provided: {key}")
            continue
        if value is None:
            continue
        coerced = _coerce_one(spec, value)
        _check_range(spec, coerced, noun="option")
        typed[key] = coerced
    return typed, warnings


def validate_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Check the typed ``parameters`` of an ``/api/create`` request; return what to store.

    Ollama stores this object unchecked, so a bad value only fails later, on every request
    (``option "stop" must be of type array``). We check it when the model is created: types
    and ranges as :func:`coerce_options`, an unknown name is an error listing the valid names
    (as for a Modelfile ``PARAMETER``). Deprecated names and ``null`` values are left out of
    the result; callers should store the result, not the input.
    """
    typed: dict[str, Any] = {}
    for key, value in parameters.items():
        spec = OPTIONS.get(key)
        if spec is None:
            if key in DEPRECATED_REQUEST_OPTIONS:
                continue
            raise InvalidOption(
                f"unknown parameter '{key}'; valid parameters are: {_valid_names()}"
            )
        if value is None:
            continue
        coerced = _coerce_one(spec, value)
        _check_range(spec, coerced, noun="option")
        typed[key] = coerced
    return typed


def merge_options(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, then each layer in order (model params, then request options).

    Layers must already be typed (:func:`coerce_options`); ``None`` values do not override.
    """
    merged = default_options()
    for layer in layers:
        for key, value in layer.items():
            if value is not None:
                merged[key] = list(value) if isinstance(value, list) else value
    return merged

