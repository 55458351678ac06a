"""Ollama's built-in named templates and the chat-template detection ``ollama create`` does.

The package data in ``named/`` is Ollama's ``template/`` directory unchanged (MIT, see
``named/LICENSE``): ``index.json`` lists known Jinja ``tokenizer.chat_template`` strings with
the name of the Go template that renders the same format, each ``NAME.gotmpl`` is that Go
template, and ``NAME.json`` holds its default parameters (stop words).

``detect_named_template`` is ``template.Named``: the index entry with the smallest Levenshtein
distance to the GGUF's chat template wins (the first one on ties), but only if the distance is
below 100. Only the ``stop`` list of a parameters file is kept, because that is the only field
Ollama's ``named.Parameters`` struct has (``gemma3-instruct.json``'s ``temperature`` is
dropped by Ollama too).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ._values import json_string

MAX_DISTANCE = 100
"""A chat template must be closer than this (in edits) to an index entry to match it."""


@dataclass(frozen=True, slots=True)
class NamedTemplate:
    """One built-in template: its name, Go template text and default stop words."""

    name: str
    template: str
    """The Go template (``NAME.gotmpl``, CRLF normalized to LF)."""
    chat_template: str = ""
    """The Jinja template of the index entry that matched (empty when looked up by name)."""
    stop: tuple[str, ...] | None = None
    """The ``stop`` list of ``NAME.json``; None when there is no parameters file."""
    has_params: bool = False
    """Whether ``NAME.json`` exists (Ollama then writes a params layer, even for no stops)."""

    @property
    def parameters(self) -> dict[str, Any] | None:
        """The parameters Ollama keeps from ``NAME.json`` (``{"stop": [...]}``), or None."""
        if not self.has_params:
            return None
        return {"stop": None if self.stop is None else list(self.stop)}

    def params_json(self) -> bytes | None:
        """The params layer Ollama writes for this template: ``json.Encoder`` output.

        Byte-identical to Ollama's (HTML-safe escapes, trailing newline), so the layer has
        the same digest in both stores. None when the template has no parameters file.
        """
        if not self.has_params:
            return None
        stop = self.stop
        body = "null" if stop is None else "[" + ",".join(json_string(s) for s in stop) + "]"
        return ('{"stop":' + body + "}\n").encode("utf-8")


def _read(name: str) -> str | None:
    path = resources.files(__package__ or "pollama.template").joinpath("named", name)
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8")


@functools.cache
def _load(name: str) -> NamedTemplate | None:
    text = _read(name + ".gotmpl")
    if text is None:
        return None
    params_text = _read(name + ".json")
    stop: tuple[str, ...] | None = None
    if params_text is not None:
        raw = json.loads(params_text)
        values = raw.get("stop") if isinstance(raw, dict) else None
        stop = tuple(str(v) for v in values) if values is not None else None
    return NamedTemplate(
        name, text.replace("\r\n", "\n"), stop=stop, has_params=params_text is not None
    )


@functools.cache
def _index() -> tuple[tuple[str, str], ...]:
    """The (name, Jinja chat template) pairs of ``index.json``, in file order."""
    text = _read("index.json")
    if text is None:
        raise FileNotFoundError("pollama.template: named/index.json is missing")
    return tuple((e["name"], e["template"]) for e in json.loads(text))


def named_templates() -> list[str]:
    """Names of every built-in template (each ``NAME.gotmpl``, including unindexed ones)."""
    base = resources.files(__package__ or "pollama.template").joinpath("named")
    return sorted(p.name[: -len(".gotmpl")] for p in base.iterdir() if p.name.endswith(".gotmpl"))


def named_template(name: str) -> NamedTemplate | None:
    """The built-in template called ``name``, or None."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    return _load(name)


def detect_named_template(chat_template: str) -> NamedTemplate | None:
    """The built-in template matching a GGUF Jinja chat template, or None (``template.Named``)."""
    # Imported here: only create needs it, and the server stays smaller without it.
    from rapidfuzz.distance import Levenshtein

    if not chat_template:
        return None
    best: tuple[str, str] | None = None
    score = MAX_DISTANCE
    for name, jinja in _index():
        distance = Levenshtein.distance(chat_template, jinja, score_cutoff=score - 1)
        if distance < score:
            score, best = distance, (name, jinja)
            if score == 0:
                break
    if best is None:
        return None
    found = _load(best[0])
    if found is None:
        return None
    return NamedTemplate(found.name, found.template, best[1], found.stop, found.has_params)
