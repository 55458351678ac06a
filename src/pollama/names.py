"""Model names: parse, merge with defaults, validate, display.

The grammar is Ollama's (``types/model/name.go``)::

    [scheme://][host/][namespace/]model[:tag]

    host:       first char [A-Za-z0-9_], then [A-Za-z0-9_.:-]   1-350 chars
    namespace:  first char [A-Za-z0-9_], then [A-Za-z0-9_-]     1-80 chars (no '.')
    model, tag: first char [A-Za-z0-9_], then [A-Za-z0-9_.-]    1-80 chars

The tag is cut at the last ``:`` that comes after the last ``/`` (so a port in the host is
not a tag); the rest is split on ``/`` from the right into model, namespace and host, and
whatever is left of the first ``/`` is the host, slashes and all (so ``a/b/c/d`` has the host
``a/b``, which is invalid). Absent parts take the defaults ``registry.ollama.ai``,
``library`` and ``latest`` (scheme ``https``); a part *promised* by a separator but empty
(``/ns/m``, ``m:``) is :data:`MISSING_PART` and never valid.

What must stay true: a :class:`ModelName` instance is always valid (``__post_init__``
checks it), so every part is ASCII from the sets above, can never be ``.``/``..`` (the first
character cannot be a dot) and never holds ``/``, ``\\`` or NUL. That is what lets the store
join :meth:`ModelName.path_parts` into a path without further checks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from pollama.errors import InvalidModelName, InvalidRequest

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_NAMESPACE",
    "DEFAULT_SCHEME",
    "DEFAULT_TAG",
    "MISSING_PART",
    "ModelName",
    "NameParts",
    "is_valid_namespace",
]

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
DEFAULT_SCHEME = "https"

MISSING_PART = "!MISSING!"
"""Stands for a part that a separator promised but that is empty (Ollama's ``MissingPart``)."""

_FIRST = "A-Za-z0-9_"
_PART_RE = {
    "host": re.compile(rf"[{_FIRST}][{_FIRST}.:-]*"),
    "namespace": re.compile(rf"[{_FIRST}][{_FIRST}-]*"),
    "model": re.compile(rf"[{_FIRST}][{_FIRST}.-]*"),
    "tag": re.compile(rf"[{_FIRST}][{_FIRST}.-]*"),
}
_MAX_LEN = {"host": 350, "namespace": 80, "model": 80, "tag": 80}
_ALLOWED_AFTER_FIRST = {
    "host": frozenset("._-:"),
    "namespace": frozenset("_-"),
    "model": frozenset("._-"),
    "tag": frozenset("._-"),
}


class NameParts(NamedTuple):
    """The raw result of splitting a name string, before defaults and validation.

    A part is ``""`` when the string did not mention it and :data:`MISSING_PART` when a
    separator promised it but it was empty.
    """

    scheme: str
    host: str
    namespace: str
    model: str
    tag: str


def _cut_promised(text: str, sep: str) -> tuple[str, str, bool]:
    """Cut at the last ``sep``; empty sides become MISSING_PART (Go ``cutPromised``)."""
    index = text.rfind(sep)
    if index < 0:
        return text, "", False
    before, after = text[:index], text[index + len(sep) :]
    return before or MISSING_PART, after or MISSING_PART, True


def _quote(text: str, limit: int = 120) -> str:
    """Quote user input for an error message, shortened so a huge name cannot flood logs."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=False)


def _part_problem(kind: str, value: str) -> str | None:
    """Why ``value`` is not a valid ``kind`` part, or None when it is valid."""
    if value in ("", MISSING_PART):
        return f"{kind} is empty"
    if _PART_RE[kind].fullmatch(value) is None:
        first = value[0]
        if not (first.isascii() and (first.isalnum() or first == "_")):
            return f"{kind} {_quote(value)} must start with a letter, a digit or '_'"
        allowed = _ALLOWED_AFTER_FIRST[kind]
        bad = next(c for c in value[1:] if not (c.isascii() and (c.isalnum() or c in allowed)))
        return f"invalid character {_quote(bad)} in {kind} {_quote(value)}"
    if len(value) > _MAX_LEN[kind]:
        return f"{kind} is longer than {_MAX_LEN[kind]} characters"
    return None


def _name_problem(host: str, namespace: str, model: str, tag: str, scheme: str) -> str | None:
    """The first reason the parts do not form a valid name, or None."""
    if "/" in host:
        return "too many '/' separators (the most is host/namespace/model:tag)"
    for kind, value in (("host", host), ("namespace", namespace), ("model", model), ("tag", tag)):
        problem = _part_problem(kind, value)
        if problem is not None:
            return problem
    if not scheme:
        return "the scheme is empty"
    return None


def is_valid_namespace(text: str) -> bool:
    """Whether ``text`` is a valid namespace (a registry user name), as Go's IsValidNamespace."""
    return _part_problem("namespace", text) is None


@dataclass(frozen=True)
class ModelName:
    """A fully qualified, valid model name: ``host/namespace/model:tag`` plus a URL scheme.

    Equality and hashing are exact (case-sensitive) over the four parts; the scheme is not
    part of a name's identity (Ollama's store ignores it).
    """

    host: str
    namespace: str
    model: str
    tag: str
    scheme: str = field(default=DEFAULT_SCHEME, compare=False)

    def __post_init__(self) -> None:
        problem = _name_problem(self.host, self.namespace, self.model, self.tag, self.scheme)
        if problem is not None:
            raise InvalidModelName(f"invalid model name {_quote(str(self))}: {problem}")

    # -- parsing -------------------------------------------------------------------------

    @staticmethod
    def parse_bare(text: str) -> NameParts:
        """Split ``text`` into its parts without defaults or validation (Go ParseNameBare)."""
        scheme = host = namespace = tag = ""
        rest = text
        if rest.rfind(":") > rest.rfind("/"):
            rest, tag, _ = _cut_promised(rest, ":")
        rest, model, promised = _cut_promised(rest, "/")
        if not promised:
            return NameParts(scheme, host, namespace, rest, tag)
        rest, namespace, promised = _cut_promised(rest, "/")
        if not promised:
            return NameParts(scheme, host, rest, model, tag)
        before, sep, after = rest.partition("://")
        if sep:
            scheme, host = before, after
        else:
            host = rest
        return NameParts(scheme, host, namespace, model, tag)

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """Parse ``text`` and fill absent parts with the defaults (Go ParseName + IsValid).

        Raises :class:`InvalidModelName` with a message starting ``invalid model name`` that
        says which part is wrong.
        """
        if not text:
            raise InvalidModelName('invalid model name "": the name is empty')
        if "@" in text:
            raise InvalidModelName(
                f"invalid model name {_quote(text)}: digests ('@') are not supported in names"
            )
        parts = cls.parse_bare(text)
        host = parts.host or DEFAULT_HOST
        namespace = parts.namespace or DEFAULT_NAMESPACE
        tag = parts.tag or DEFAULT_TAG
        scheme = parts.scheme or DEFAULT_SCHEME
        problem = _name_problem(host, namespace, parts.model, tag, scheme)
        if problem is not None:
            raise InvalidModelName(f"invalid model name {_quote(text)}: {problem}")
        return cls(host, namespace, parts.model, tag, scheme)

    @classmethod
    def try_parse(cls, text: str) -> ModelName | None:
        """:meth:`parse`, but None instead of raising for an invalid name."""
        try:
            return cls.parse(text)
        except InvalidModelName:
            return None

    @classmethod
    def is_valid(cls, text: str) -> bool:
        """Whether ``text`` parses (with defaults) to a valid name."""
        return cls.try_parse(text) is not None

    # -- views ---------------------------------------------------------------------------

    def __str__(self) -> str:
        """The fully qualified form ``host/namespace/model:tag`` (Go Name.String)."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def display_shortest(self) -> str:
        """The short form Ollama shows in lists: drop the default host and namespace.

        A non-default namespace is kept (``user/m:latest``); a non-default host keeps the
        namespace too (``hf.co/user/repo:Q4_K_M``); the tag is always shown. Defaults are
        compared case-insensitively, as in Go.
        """
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def display_namespace_model(self) -> str:
        """``namespace/model``: the repository path in registry URLs (``/v2/<this>/...``)."""
        return f"{self.namespace}/{self.model}"

    def path_parts(self) -> tuple[str, str, str, str]:
        """(host, namespace, model, tag): the four directory levels under ``manifests/``.

        Safe to join into a path: validation guarantees no part is ``.``/``..`` or holds a
        separator or NUL.
        """
        return (self.host, self.namespace, self.model, self.tag)

    def registry_base_url(self, insecure: bool = False) -> str:
        """``https://host`` (or ``http://host``) for registry requests.

        ``insecure`` switches to plain http, as Ollama's ``--insecure`` does. A name written
        with ``http://`` is refused unless ``insecure`` is set (Ollama's "insecure protocol
        http"); any scheme other than http/https is refused too.
        """
        if insecure:
            return f"http://{self.host}"
        if self.scheme == "http":
            raise InvalidRequest("insecure protocol http")
        if self.scheme != "https":
            raise InvalidRequest(f'unsupported protocol scheme "{self.scheme}"')
        return f"https://{self.host}"
