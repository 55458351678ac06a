"""Options: Ollama's DefaultOptions, FormatParams (Modelfile strings) and FromMap (request JSON),
plus the range checks we add for llama.cpp's safety."""

from __future__ import annotations

import dataclasses
import math

import pytest

from pollama.errors import InvalidOption
from pollama.options import (
    DEFAULT_OPTIONS,
    DEPRECATED_PARAMETERS,
    DEPRECATED_REQUEST_OPTIONS,
    MAX_CONTEXT,
    OPTIONS,
    coerce_options,
    default_options,
    format_params,
    go_parse_bool,
    merge_options,
    validate_parameters,
)
from pollama.runner.base import LoadSpec, SamplingOptions


def test_defaults_match_ollama_default_options() -> None:
    assert dict(DEFAULT_OPTIONS) == {
        "num_ctx": 0,  # OLLAMA_CONTEXT_LENGTH, else DEFAULT_NUM_CTX (capped by the model)
        "num_batch": 512,
        "num_gpu": -1,
        "main_gpu": None,
        "use_mmap": None,
        "num_thread": 0,
        "draft_num_predict": 63,  # Ollama: 4 with a draft model; n-gram drafts (runner/ngram.py)
        "draft_always": False,  # pollama's: draft every copy, as llama-server does
        "num_keep": 4,
        "seed": -1,
        "num_predict": -1,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_last_n": 64,
        "temperature": 0.8,
        "repeat_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stop": [],
    }


def test_default_options_is_a_fresh_copy() -> None:
    first = default_options()
    first["stop"].append("x")
    first["temperature"] = 0.1
    assert default_options()["stop"] == []
    assert DEFAULT_OPTIONS["stop"] == []
    assert DEFAULT_OPTIONS["temperature"] == 0.8
    with pytest.raises(TypeError):
        DEFAULT_OPTIONS["temperature"] = 0.1  # type: ignore[index]


RELOAD = {name for name, spec in OPTIONS.items() if spec.reload}
# num_gpu is resolved into LoadSpec.gpu_layers (scheduler/placement.py)
UNUSED = {"num_gpu"}


def test_reload_options_are_the_load_spec_fields() -> None:
    """The table's ``reload`` says what the scheduler does: it reloads when the LoadSpecs
    differ, and the options in a LoadSpec are exactly the ``reload`` ones."""
    load_fields = {f.name for f in dataclasses.fields(LoadSpec)}
    assert RELOAD == {"num_ctx", "num_batch", "use_mmap", "num_thread", "main_gpu"}
    assert load_fields & set(OPTIONS) == RELOAD
    assert not RELOAD & DEPRECATED_REQUEST_OPTIONS


def test_sampling_options_are_the_other_used_options() -> None:
    sampling_fields = {f.name for f in dataclasses.fields(SamplingOptions)}
    assert sampling_fields == set(OPTIONS) - RELOAD - UNUSED


def test_runner_types_take_the_table_defaults() -> None:
    sampling = SamplingOptions()
    for f in dataclasses.fields(SamplingOptions):
        expected = DEFAULT_OPTIONS[f.name]
        assert getattr(sampling, f.name) == (tuple(expected) if f.name == "stop" else expected)
    spec = LoadSpec(model_path="m", num_ctx=4096)
    # num_ctx is resolved before a spec exists, main_gpu by the placement (unset: its choice)
    for name in RELOAD - {"num_ctx", "main_gpu"}:
        assert getattr(spec, name) == DEFAULT_OPTIONS[name]


def test_deprecated_names() -> None:
    assert DEPRECATED_PARAMETERS < DEPRECATED_REQUEST_OPTIONS
    assert {"numa", "embedding_only", "tfs_z"} <= DEPRECATED_REQUEST_OPTIONS
    assert not set(OPTIONS) & DEPRECATED_REQUEST_OPTIONS


# --- format_params ----------------------------------------------------------------------------


def test_format_params_types_every_kind() -> None:
    typed = format_params(
        {
            "temperature": ["0.5"],
            "top_k": ["1"],
            "num_ctx": ["4096"],
            "use_mmap": ["false"],
            "main_gpu": ["0"],
            "seed": ["-1"],
            "stop": ["<|eot_id|>", "### User:"],
        }
    )
    assert typed == {
        "temperature": 0.5,
        "top_k": 1,
        "num_ctx": 4096,
        "use_mmap": False,
        "main_gpu": 0,
        "seed": -1,
        "stop": ["<|eot_id|>", "### User:"],
    }
    assert type(typed["top_k"]) is int
    assert type(typed["temperature"]) is float


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.1", 0.1),
        ("1", 1.0),
        ("1.", 1.0),
        (".5", 0.5),
        ("+2.5", 2.5),
        ("-0.25", -0.25),
        ("1e-3", 0.001),
        ("1E+2", 100.0),
        ("0x1p-2", 0.25),
        # Ollama stores float32: the params layer holds the shortest float32 spelling
        ("0.123456789", 0.12345679),
    ],
)
def test_format_params_float_follows_go_parse_float32(text: str, expected: float) -> None:
    assert format_params({"temperature": [text]}) == {"temperature": expected}


@pytest.mark.parametrize("text", ["abc", "", " 1", "1_0", "1,5", "inf", "NaN", "1e39", "0x1"])
def test_format_params_invalid_float(text: str) -> None:
    with pytest.raises(InvalidOption) as err:
        format_params({"top_p": [text]})
    assert err.value.message == f"invalid float value [{text}]"


@pytest.mark.parametrize("text", ["1.5", "abc", "1_000", " 4", "0x10", "9223372036854775808"])
def test_format_params_invalid_int(text: str) -> None:
    with pytest.raises(InvalidOption) as err:
        format_params({"top_k": [text]})
    assert err.value.message == f"invalid int value [{text}]"


def test_format_params_int_accepts_sign() -> None:
    assert format_params({"seed": ["+42"], "num_predict": ["-2"]}) == {
        "seed": 42,
        "num_predict": -2,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [(t, True) for t in ("1", "t", "T", "TRUE", "true", "True")]
    + [(f, False) for f in ("0", "f", "F", "FALSE", "false", "False")],
)
def test_format_params_bool_follows_go_parse_bool(text: str, expected: bool) -> None:
    assert go_parse_bool(text) is expected
    assert format_params({"use_mmap": [text]}) == {"use_mmap": expected}


@pytest.mark.parametrize("text", ["yes", "tRUE", "on", ""])
def test_format_params_invalid_bool(text: str) -> None:
    assert go_parse_bool(text) is None
    with pytest.raises(InvalidOption) as err:
        format_params({"use_mmap": [text]})
    assert err.value.message == f"invalid bool value [{text}]"


def test_format_params_unknown_parameter_lists_valid_names() -> None:
    with pytest.raises(InvalidOption) as err:
        format_params({"Temperature": ["1"]})
    message = err.value.message
    assert message.startswith("unknown parameter 'Temperature'")
    for name in OPTIONS:
        assert name in message


def test_format_params_deprecated_parameter_is_unknown() -> None:
    with pytest.raises(InvalidOption, match="unknown parameter 'mirostat'.*deprecated"):
        format_params({"mirostat": ["1"]})


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("num_ctx", "-1", '"num_ctx" must be at least 0'),
        ("num_batch", "0", '"num_batch" must be at least 1'),
        ("num_ctx", str(MAX_CONTEXT + 1), '"num_ctx" must be at most'),
        ("num_keep", "-2", '"num_keep" must be at least -1'),
        ("num_thread", "100000", '"num_thread" must be at most'),
    ],
)
def test_format_params_rejects_unsafe_values(name: str, text: str, fragment: str) -> None:
    with pytest.raises(InvalidOption, match=fragment):
        format_params({name: [text]})


# --- coerce_options ---------------------------------------------------------------------------


def test_coerce_options_types_json_values() -> None:
    typed, warnings = coerce_options(
        {
            "num_ctx": 8192.9,  # JSON numbers are truncated for int options
            "num_predict": -1.5,
            "temperature": 1,  # ints are fine for floats
            "top_p": 0.5,
            "use_mmap": False,
            "main_gpu": 0,
            "stop": ["\n", "User:"],
            "seed": None,  # null is skipped, as in Go
        }
    )
    assert typed == {
        "num_ctx": 8192,
        "num_predict": -1,
        "temperature": 1.0,
        "top_p": 0.5,
        "use_mmap": False,
        "main_gpu": 0,
        "stop": ["\n", "User:"],
    }
    assert type(typed["num_ctx"]) is int
    assert type(typed["temperature"]) is float
    assert warnings == []


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_ctx", "4096", 'option "num_ctx" must be of type integer'),
        ("num_ctx", True, 'option "num_ctx" must be of type integer'),
        ("main_gpu", "0", 'option "main_gpu" must be of type integer'),
        ("temperature", "0.5", 'option "temperature" must be of type float32'),
        ("temperature", False, 'option "temperature" must be of type float32'),
        ("use_mmap", "true", 'option "use_mmap" must be of type boolean'),
        ("use_mmap", 1, 'option "use_mmap" must be of type boolean'),
        ("draft_always", "yes", 'option "draft_always" must be of type boolean'),
        ("stop", "</s>", 'option "stop" must be of type array'),
        ("stop", ["a", 1], 'option "stop" must be of an array of strings'),
    ],
)
def test_coerce_options_wrong_type(key: str, value: object, message: str) -> None:
    with pytest.raises(InvalidOption) as err:
        coerce_options({key: value})
    assert err.value.message == message


def test_coerce_options_unknown_and_deprecated_keys_are_warnings() -> None:
    typed, warnings = coerce_options({"numa": True, "mirostat": 2, "bogus": 1, "top_k": 5})
    assert typed == {"top_k": 5}
    assert warnings == [
        "option numa is deprecated and ignored",
        "option mirostat is deprecated and ignored",
        "invalid option provided: bogus",
    ]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"num_ctx": -5}, '"num_ctx" must be at least 0'),
        ({"num_ctx": 2**40}, '"num_ctx" must be at most'),
        ({"num_batch": 0}, '"num_batch" must be at least 1'),
        ({"num_batch": -512}, '"num_batch" must be at least 1'),
        ({"num_gpu": -2}, '"num_gpu" must be at least -1'),
        ({"num_keep": -100}, '"num_keep" must be at least -1'),
        ({"repeat_last_n": -2}, '"repeat_last_n" must be at least -1'),
        ({"num_thread": -1}, '"num_thread" must be at least 0'),
        ({"draft_num_predict": 10**6}, '"draft_num_predict" must be at most'),
        ({"top_k": 2**40}, '"top_k" must be at most'),
        ({"seed": 2**70}, '"seed" must be at most'),
        ({"temperature": math.nan}, '"temperature" must be a finite number'),
        ({"top_p": math.inf}, '"top_p" must be a finite number'),
        ({"top_p": 1e39}, '"top_p" must be a finite number'),
        ({"temperature": 10**400}, '"temperature" must be a finite number'),
        ({"num_ctx": math.inf}, '"num_ctx" must be a finite integer'),
        ({"num_predict": 1e30}, '"num_predict" must be a finite integer'),
    ],
)
def test_coerce_options_rejects_unsafe_values(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidOption, match=fragment):
        coerce_options(options)


def test_coerce_options_accepts_documented_special_values() -> None:
    typed, _ = coerce_options(
        {"num_ctx": 0, "num_gpu": -1, "num_keep": -1, "repeat_last_n": -1, "num_predict": -2}
    )
    assert typed == {"num_ctx": 0, "num_gpu": -1, "num_keep": -1, "repeat_last_n": -1,
                     "num_predict": -2}  # fmt: skip


# --- merge_options ----------------------------------------------------------------------------


def test_merge_options_precedence_defaults_model_request() -> None:
    model = {"temperature": 0.5, "num_ctx": 4096, "stop": ["<|im_end|>"]}
    request = {"temperature": 0.1, "seed": 7}
    merged = merge_options(model, request)
    assert merged["temperature"] == 0.1
    assert merged["num_ctx"] == 4096
    assert merged["seed"] == 7
    assert merged["stop"] == ["<|im_end|>"]
    assert merged["top_k"] == 40
    merged["stop"].append("x")
    assert model["stop"] == ["<|im_end|>"]


# --- validate_parameters (/api/create) --------------------------------------------------------


def test_validate_parameters_types_and_drops_deprecated() -> None:
    stored = validate_parameters(
        {"temperature": 1, "num_ctx": 4096.0, "stop": ["</s>"], "mirostat": 0, "seed": None}
    )
    assert stored == {"temperature": 1.0, "num_ctx": 4096, "stop": ["</s>"]}


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"bogus": 1}, "unknown parameter 'bogus'; valid parameters are: num_ctx"),
        ({"stop": "</s>"}, 'option "stop" must be of type array'),
        ({"num_batch": 0}, '"num_batch" must be at least 1'),
    ],
)
def test_validate_parameters_rejects(parameters: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidOption, match=fragment):
        validate_parameters(parameters)
