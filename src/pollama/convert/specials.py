"""Special tokens, the add-BOS/EOS/SEP flags and the chat template of a Hugging Face tokenizer.

A port of ``gguf.SpecialVocab`` as the pinned engine's vendored ``gguf-py/gguf/vocab.py``
has it (newer than the ``gguf`` package on PyPI: it reads the ``ByteLevel`` post-processor
and the normalizer too), reading the folder through :class:`HFFolder` instead of a path:

* the special tokens come from ``tokenizer_config.json`` (``bos_token``… as strings or
  ``{"content": …}``), matched against ``tokenizer.json``'s ``added_tokens``, then from
  ``config.json``'s ``*_token_id``; ``special_tokens_map.json`` fills the names that
  ``tokenizer_config.json`` lacks (as transformers merges them);
* whether BOS, EOS and SEP are added comes from ``tokenizer.json``'s post-processor
  (``TemplateProcessing``, ``RobertaProcessing``, ``ByteLevel``), then from
  ``tokenizer_config.json``'s ``add_*_token`` where the post-processor said nothing;
* the chat template is ``tokenizer_config.json``'s ``chat_template``, else
  ``chat_template.jinja``, else ``chat_template.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pollama.convert.source import MAX_JSON_BYTES, HFFolder

__all__ = ["SpecialTokens", "special_tokens"]

log = logging.getLogger(__name__)

TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # llama.cpp's spelling
    "pad": "tokenizer.ggml.padding_token_id",
    "cls": "tokenizer.ggml.cls_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
}
MAX_TEMPLATE_BYTES = 1 << 20


@dataclass
class SpecialTokens:
    ids: dict[str, int] = field(default_factory=dict)
    add: dict[str, bool] = field(default_factory=dict)
    chat_template: str | None = None
    types: tuple[str, ...] = TYPES

    def set(self, typ: str, token_id: Any, n_vocab: int) -> None:
        """The first id found for a type wins; one outside the vocabulary is skipped."""
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            return
        if token_id >= n_vocab:
            log.warning("special token %s id %d is outside the vocabulary", typ, token_id)
            return
        self.ids.setdefault(typ, token_id)

    def kv(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = [(KEYS[t], i) for t, i in self.ids.items() if t in KEYS]
        out += [(f"tokenizer.ggml.add_{t}_token", v) for t, v in self.add.items()]
        if self.chat_template is not None:
            out.append(("tokenizer.chat_template", self.chat_template))
        return out


def _content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _tokenizer_config(folder: HFFolder) -> dict[str, Any]:
    """tokenizer_config.json with special_tokens_map.json's names where it has none, every
    token name as a plain string."""
    config = dict(folder.json_object("tokenizer_config.json"))
    for key, value in folder.json_object("special_tokens_map.json").items():
        config.setdefault(key, value)
    for typ in TYPES:
        key = f"{typ}_token"
        if key in config:
            config[key] = _content(config[key])
    return config


def special_tokens(
    folder: HFFolder,
    tokenizer: dict[str, Any] | None,
    n_vocab: int,
    lookup: Callable[[str], int | None] | None = None,
) -> SpecialTokens:
    """The special tokens of the folder's tokenizer (see the module docstring). ``lookup``
    finds a token's id where there is no ``tokenizer.json`` (a ``vocab.txt``)."""
    found = SpecialTokens()
    config = _tokenizer_config(folder)
    if tokenizer is not None:
        _from_post_processor(found, tokenizer, config)
    added = tokenizer.get("added_tokens", []) if tokenizer else []
    added = added if isinstance(added, list) else []
    if config:
        found.chat_template = _chat_template(folder, config)
        for typ in found.types:
            flag = config.get(f"add_{typ}_token")
            if isinstance(flag, bool):
                if typ in found.add and found.add[typ] != flag:
                    log.warning("add_%s_token disagrees with the post-processor", typ)
                found.add.setdefault(typ, flag)
            name = config.get(f"{typ}_token")
            if not isinstance(name, str):
                continue
            token_id = next(
                (a.get("id") for a in added if isinstance(a, dict) and a.get("content") == name),
                None,
            )
            if token_id is None and lookup is not None:
                token_id = lookup(name)
            found.set(typ, token_id, n_vocab)
    model_config = folder.json_object("config.json")
    for typ in found.types:
        token_id = model_config.get(f"{typ}_token_id")
        if token_id is None and isinstance(model_config.get("text_config"), dict):
            token_id = model_config["text_config"].get(f"{typ}_token_id")
        found.set(typ, token_id, n_vocab)
    return found


def _chat_template(folder: HFFolder, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if template is None and folder.has("chat_template.jinja"):
        raw = folder.read_bytes("chat_template.jinja", MAX_TEMPLATE_BYTES)
        template = raw.decode("utf-8", errors="replace")
    if template is None:
        template = folder.json_object("chat_template.json", limit=MAX_JSON_BYTES).get(
            "chat_template"
        )
    if isinstance(template, list):  # named templates: llama.cpp's default is "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _from_post_processor(
    found: SpecialTokens, tokenizer: dict[str, Any], config: dict[str, Any]
) -> None:
    """``names`` mirrors the vendored code's ``special_bos``… locals; ``config`` (empty: no
    tokenizer_config.json) is updated where it updates ``tokenizer_config``."""
    names = {typ: config.get(f"{typ}_token") for typ in ("bos", "cls", "eos", "sep")}
    if not names["bos"] and names["cls"] and config:
        config["bos_token"] = names["bos"] = names["cls"]
    if not names["eos"] and names["sep"] and config:
        config["eos_token"] = names["eos"] = names["sep"]
    post = tokenizer.get("post_processor")
    if not isinstance(post, dict):
        return
    processors = post.get("processors", [post])
    for processor in processors if isinstance(processors, list) else []:
        kind = processor.get("type") if isinstance(processor, dict) else None
        if kind == "ByteLevel":
            found.add.setdefault("bos", False)
            found.add.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            found.add.update(bos=True, eos=True, sep=True)
            if not names["cls"] and config:
                config["cls_token"] = names["cls"] = _first(processor.get("cls"), names["bos"])
            if not names["sep"] and config:
                config["sep_token"] = names["sep"] = _first(processor.get("sep"), names["eos"])
        elif kind == "TemplateProcessing":
            first, last = _template_single(found, processor, config, names)
            _template_pair(found, processor, config, names, first, last)


def _first(value: Any, default: Any) -> Any:
    return value[0] if isinstance(value, list) and value else default


def _special_id(item: Any) -> str | None:
    token = item.get("SpecialToken") if isinstance(item, dict) else None
    value = token.get("id") if isinstance(token, dict) else None
    return value if isinstance(value, str) else None


def _sequence_id(item: Any) -> str | None:
    seq = item.get("Sequence") if isinstance(item, dict) else None
    return seq.get("id") if isinstance(seq, dict) else None


def _template_single(
    found: SpecialTokens, processor: dict[str, Any], config: dict[str, Any],
    names: dict[str, Any],
) -> tuple[str | None, str | None]:
    """The vendored "crude parsing of TemplateProcessing": the single template's first and
    last special tokens decide add-BOS and add-EOS (a last token that is not the EOS
    becomes the EOS, the old one the EOT)."""
    single = processor.get("single")
    first = last = None
    if not isinstance(single, list) or len(single) <= 1:
        return first, last
    if first := _special_id(single[0]):
        if not config:
            names["bos"] = first
        elif first not in (names["bos"], names["cls"]):
            if not names["bos"]:
                config["bos_token"] = names["bos"] = first
            if not names["cls"]:
                config["cls_token"] = names["cls"] = first
        found.add["bos"] = first in (names["bos"], names["cls"])
    if last := _special_id(single[-1]):
        if not config:
            names["eos"] = last
        elif last != names["eos"]:
            if "eot" not in found.types:
                found.types = (*found.types, "eot")
                config["eot_token"] = names["eos"]
            config["eos_token"] = names["eos"] = last
        found.add["eos"] = last == names["eos"]
    return first, last


def _template_pair(
    found: SpecialTokens, processor: dict[str, Any], config: dict[str, Any],
    names: dict[str, Any], first: str | None, last: str | None,
) -> None:
    """A separator between A and B in the pair template: add-SEP."""
    pair = processor.get("pair")
    if not isinstance(pair, list) or not pair:
        return
    start = 1 if first and _special_id(pair[0]) == first else 0
    stop = -1 if last and _special_id(pair[-1]) == last else None
    pair = pair[start:stop]
    if not pair or _sequence_id(pair[0]) != "A" or _sequence_id(pair[-1]) != "B":
        return
    middle = pair[1:-1]
    if not middle:
        return
    seps = (names["sep"], names["eos"])
    entry = _special_id(middle[0])
    add_sep = entry is not None and entry in seps and not last
    second = _special_id(middle[1]) if len(middle) == 2 else None
    if second is not None and second in seps:
        add_sep = True
    found.add["sep"] = add_sep
    if add_sep and not names["sep"] and config:
        config["sep_token"] = names["eos"]
