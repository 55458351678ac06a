"""Model names, mirroring Ollama's ``types/model/name_test.go`` tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pollama.errors import InvalidModelName, InvalidRequest
from pollama.names import (
    DEFAULT_SCHEME,
    MISSING_PART,
    ModelName,
    NameParts,
    _name_problem,
    is_valid_namespace,
)

PART80 = "8" * 80
PART350 = "3" * 350

# name_test.go TestParseNameParts: input -> (bare parts, fully qualified path parts)
PARSE_CASES = [
    (
        "registry.ollama.ai/library/dolphin-mistral:7b-v2.6-dpo-laser-q6_K",
        NameParts("", "registry.ollama.ai", "library", "dolphin-mistral", "7b-v2.6-dpo-laser-q6_K"),
        ("registry.ollama.ai", "library", "dolphin-mistral", "7b-v2.6-dpo-laser-q6_K"),
    ),
    (
        "scheme://host:port/namespace/model:tag",
        NameParts("scheme", "host:port", "namespace", "model", "tag"),
        ("host:port", "namespace", "model", "tag"),
    ),
    (
        "host/namespace/model:tag",
        NameParts("", "host", "namespace", "model", "tag"),
        ("host", "namespace", "model", "tag"),
    ),
    (
        "host:port/namespace/model:tag",
        NameParts("", "host:port", "namespace", "model", "tag"),
        ("host:port", "namespace", "model", "tag"),
    ),
    (
        "host/namespace/model",
        NameParts("", "host", "namespace", "model", ""),
        ("host", "namespace", "model", "latest"),
    ),
    (
        "host:port/namespace/model",
        NameParts("", "host:port", "namespace", "model", ""),
        ("host:port", "namespace", "model", "latest"),
    ),
    (
        "namespace/model",
        NameParts("", "", "namespace", "model", ""),
        ("registry.ollama.ai", "namespace", "model", "latest"),
    ),
    (
        "model",
        NameParts("", "", "", "model", ""),
        ("registry.ollama.ai", "library", "model", "latest"),
    ),
    ("h/nn/mm:t", NameParts("", "h", "nn", "mm", "t"), ("h", "nn", "mm", "t")),
    (
        f"{PART80}/{PART80}/{PART80}:{PART80}",
        NameParts("", PART80, PART80, PART80, PART80),
        (PART80, PART80, PART80, PART80),
    ),
    (
        f"{PART350}/{PART80}/{PART80}:{PART80}",
        NameParts("", PART350, PART80, PART80, PART80),
        (PART350, PART80, PART80, PART80),
    ),
    (
        "localhost:5000/ns/m:t",
        NameParts("", "localhost:5000", "ns", "m", "t"),
        ("localhost:5000", "ns", "m", "t"),
    ),
    (
        "hf.co/user/repo:Q4_K_M",
        NameParts("", "hf.co", "user", "repo", "Q4_K_M"),
        ("hf.co", "user", "repo", "Q4_K_M"),
    ),
]


@pytest.mark.parametrize(("text", "bare", "path"), PARSE_CASES)
def test_parse_parts(text: str, bare: NameParts, path: tuple[str, str, str, str]) -> None:
    assert ModelName.parse_bare(text) == bare
    assert ModelName.parse(text).path_parts() == path


# name_test.go testCases: validity of the *bare* parse (all four parts must be present).
FULLY_QUALIFIED_CASES = {
    "": False,
    "_why/_the/_lucky:_stiff": True,
    "h/n/m:t": True,
    "host/namespace/model:tag": True,
    "host/namespace/model": False,
    "namespace/model": False,
    "model": False,
    f"{PART80}/{PART80}/{PART80}:{PART80}": True,
    f"{PART350}/{PART80}/{PART80}:{PART80}": True,
    "h/nn/mm:t": True,
    "m": False,
    "n/m:": False,
    "h/n/m": False,
    "@t": False,
    "m@d": False,
    "^": False,
    "mm:": False,
    "/nn/mm": False,
    "//": False,
    "//mm": False,
    "hh//": False,
    "//mm:@": False,
    "00@": False,
    "@": False,
    "-hh/nn/mm:tt": False,
    "hh/-nn/mm:tt": False,
    "hh/nn/-mm:tt": False,
    "hh/nn/mm:-tt": False,
    "host:https/namespace/model:tag": True,
    "host/name:space/model:tag": False,
}


def _fully_qualified(text: str) -> bool:
    """Go's IsFullyQualified on a bare parse: all four parts named, validly."""
    parts = ModelName.parse_bare(text)
    if "@" in text or not all((parts.host, parts.namespace, parts.model, parts.tag)):
        return False
    problem = _name_problem(parts.host, parts.namespace, parts.model, parts.tag, DEFAULT_SCHEME)
    return problem is None


@pytest.mark.parametrize(("text", "valid"), FULLY_QUALIFIED_CASES.items())
def test_fully_qualified_table(text: str, valid: bool) -> None:
    assert _fully_qualified(text) is valid
    if valid:
        # Go round-trips String() of every valid bare name.
        assert str(ModelName.parse(text)) == text


# Names that parse (with defaults filled in) and names that must not, whatever the reason.
VALID_WITH_DEFAULTS = [
    "model",
    "llama3.2",
    "llama3.2:1b",
    "user/model",
    "user/model:tag",
    "h/n/m",
    "localhost:5000/ns/m:t",
    "http://localhost:5000/ns/m:t",
    "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
    "_/_/_:_",
    "a" * 80,
    "m:" + "t" * 80,
    "x" * 350 + "/n/m:t",
]
INVALID = [
    "",
    "m:",
    "/nn/mm",
    "//",
    "hh//",
    "n/m:",
    "@",
    "m@sha256:abc",
    "a/b/c/d",
    "a/b/c/d/e",
    "..",
    "../x",
    "x/../y",
    "../../etc/passwd",
    ".hidden",
    "ns/.model",
    "m:.tag",
    "-m",
    "m:-t",
    "name.space/model",
    "a" * 81,
    "m:" + "t" * 81,
    "h/" + "n" * 81 + "/m:t",
    "x" * 351 + "/n/m:t",
    "modèle",
    "模型",
    "m:tàg",
    "m\x00",
    "m\\x",
    "m n",
    "m/",
    "ns//m",
    " m",
    "m\n",
]


@pytest.mark.parametrize("text", VALID_WITH_DEFAULTS)
def test_valid_names_parse(text: str) -> None:
    name = ModelName.parse(text)
    assert ModelName.try_parse(text) == name
    assert ModelName.is_valid(text)


@pytest.mark.parametrize("text", INVALID)
def test_invalid_names_raise(text: str) -> None:
    with pytest.raises(InvalidModelName) as info:
        ModelName.parse(text)
    message = str(info.value)
    assert message.startswith("invalid model name")
    assert ModelName.try_parse(text) is None
    assert not ModelName.is_valid(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a/b/c/d/e", "too many '/' separators"),
        ("", "the name is empty"),
        ("m:", "tag is empty"),
        ("/nn/mm", "host is empty"),
        ("ns//m", "namespace is empty"),
        ("m@sha256:abc", "digests ('@') are not supported"),
        ("a" * 81, "model is longer than 80 characters"),
        ("x" * 351 + "/n/m:t", "host is longer than 350 characters"),
        ("name.space/model", "invalid character \".\" in namespace"),
        ("-m", "must start with a letter, a digit or '_'"),
        ("modèle", 'invalid character "è" in model'),
        ("../x", 'namespace ".." must start with'),
    ],
)
def test_error_messages_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(InvalidModelName) as info:
        ModelName.parse(text)
    message = str(info.value)
    assert message.startswith("invalid model name")
    assert reason in message
    assert "/.ollama" not in message and "manifests" not in message


def test_error_message_truncates_huge_input() -> None:
    with pytest.raises(InvalidModelName) as info:
        ModelName.parse("a" * 10_000)
    assert len(str(info.value)) < 300


def test_parse_fills_defaults() -> None:
    name = ModelName.parse("xx")
    assert str(name) == "registry.ollama.ai/library/xx:latest"
    assert name.scheme == "https"
    assert ModelName.parse("http://h:5000/n/m:t").scheme == "http"


@pytest.mark.parametrize(
    ("text", "shortest"),
    [
        ("registry.ollama.ai/library/model:latest", "model:latest"),
        ("registry.ollama.ai/library/model:tag", "model:tag"),
        ("registry.ollama.ai/namespace/model:tag", "namespace/model:tag"),
        ("host/namespace/model:tag", "host/namespace/model:tag"),
        ("host/library/model:tag", "host/library/model:tag"),
        ("REGISTRY.OLLAMA.AI/Library/model:tag", "model:tag"),
        ("llama3.2", "llama3.2:latest"),
        ("user/m", "user/m:latest"),
        ("hf.co/user/repo:Q4_K_M", "hf.co/user/repo:Q4_K_M"),
    ],
)
def test_display_shortest(text: str, shortest: str) -> None:
    assert ModelName.parse(text).display_shortest() == shortest


def test_display_forms() -> None:
    name = ModelName.parse("user/m:t")
    assert str(name) == "registry.ollama.ai/user/m:t"
    assert name.display_namespace_model() == "user/m"


@pytest.mark.parametrize(
    "parts",
    [
        ("h", "n", "m", ".."),
        ("h", "n", "..", "t"),
        ("h", "..", "m", "t"),
        ("..", "n", "m", "t"),
        ("h", "n", "m/x", "t"),
        ("h", "n", "m\\x", "t"),
        ("h", "n", "m\x00", "t"),
        ("h/x", "n", "m", "t"),
    ],
)
def test_constructor_refuses_unsafe_path_parts(parts: tuple[str, str, str, str]) -> None:
    with pytest.raises(InvalidModelName):
        ModelName(*parts)


def test_scheme_is_not_part_of_identity() -> None:
    a = ModelName.parse("http://h/n/m:t")
    b = ModelName.parse("h/n/m:t")
    assert a == b and hash(a) == hash(b)


def test_registry_base_url() -> None:
    assert ModelName.parse("m").registry_base_url() == "https://registry.ollama.ai"
    assert ModelName.parse("localhost:5000/n/m").registry_base_url(insecure=True) == (
        "http://localhost:5000"
    )
    assert ModelName.parse("http://localhost:5000/n/m").registry_base_url(insecure=True) == (
        "http://localhost:5000"
    )
    with pytest.raises(InvalidRequest, match="insecure protocol http"):
        ModelName.parse("http://localhost:5000/n/m").registry_base_url()
    with pytest.raises(InvalidRequest, match="unsupported protocol scheme"):
        ModelName.parse("ftp://h/n/m").registry_base_url()


def test_missing_part_marker_in_bare_parse() -> None:
    assert ModelName.parse_bare("/nn/mm").host == MISSING_PART
    assert ModelName.parse_bare("mm:").tag == MISSING_PART


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("", False),
        ("a", True),
        ("a:b", False),
        ("a/b", False),
        ("a:b/c", False),
        ("a/b:c", False),
        ("a/b:c/d@e", False),
        ("himynameisjoe", True),
        ("himynameisreallyreallyreallyreallylongbutitshouldstillbevalid", True),
        ("a.b", False),
    ],
)
def test_is_valid_namespace(text: str, valid: bool) -> None:
    assert is_valid_namespace(text) is valid


@given(st.text(alphabet=st.sampled_from("ab_.-:/\\@\x00é "), max_size=24))
def test_any_parsed_name_is_safe_to_join_into_a_path(text: str) -> None:
    """name_test.go FuzzName: whatever the input, a name that parses has path-safe parts."""
    name = ModelName.try_parse(text)
    if name is None:
        return
    for part in name.path_parts():
        assert part not in (".", "..")
        assert not any(ch in part for ch in "/\\\x00")
        assert part[0] != "." and len(part) <= 350
    assert ModelName.parse(str(name)) == name
