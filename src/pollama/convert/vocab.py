"""Tokenizers: a Hugging Face ``tokenizer.json`` (or a BERT ``vocab.txt``) as the
``tokenizer.ggml.*`` keys llama.cpp reads.

Two kinds, as llama.cpp's ``conversion/base.py`` writes them (``get_vocab_base``,
``_set_vocab_gpt2``, and ``conversion/bert.py`` ``set_vocab``), without transformers:

* **WordPiece** (BERT): ``tokenizer.ggml.model`` "bert"; every token that is not a control
  token is rewritten to llama.cpp's "phantom space" form (``##ing`` → ``ing``, ``word`` →
  ``▁word``); the normalizer's lowercase and strip-accents flags are kept.
* **byte-level BPE** (GPT-2 style: SmolLM, Llama 3): model "gpt2", the vocabulary as it is
  (``Ġ`` for the space byte), the merges, and ``tokenizer.ggml.pre`` naming the
  pre-tokenizer, which llama.cpp's converter finds by hashing the token ids of a test string
  (``get_vocab_base_pre``); without the tokenizer library we recognise the pre-tokenizer
  from its definition in ``tokenizer.json`` instead (:func:`pre_tokenizer_name`).

SentencePiece tokenizers (``tokenizer.model``, or a ``tokenizer.json`` BPE with
``byte_fallback``) are refused: they need scores this converter does not compute yet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pollama.convert.source import MAX_TOKENIZER_BYTES, HFFolder
from pollama.convert.specials import SpecialTokens, special_tokens
from pollama.errors import ConversionError

__all__ = ["Vocab", "bpe_vocab", "pre_tokenizer_name", "wordpiece_vocab"]

log = logging.getLogger(__name__)

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType
MAX_VOCAB = 1 << 21
MAX_MERGES = 1 << 22

# Split regexes of the pre-tokenizers llama.cpp knows by name (src/llama-vocab.cpp).
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class Vocab:
    """What a converted GGUF says about its tokenizer."""

    model: str
    tokens: list[str]
    types: list[int]
    pre: str = "default"
    merges: list[str] = field(default_factory=list)
    special: SpecialTokens = field(default_factory=SpecialTokens)
    lowercase: bool | None = None
    strip_accents: bool | None = None
    token_type_count: int | None = None

    def kv(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = [
            ("tokenizer.ggml.model", self.model),
            ("tokenizer.ggml.pre", self.pre),
            ("tokenizer.ggml.tokens", self.tokens),
            ("tokenizer.ggml.token_type", self.types),
        ]
        if self.token_type_count is not None:
            out.append(("tokenizer.ggml.token_type_count", self.token_type_count))
        if self.merges:
            out.append(("tokenizer.ggml.merges", self.merges))
        if self.lowercase is not None:
            out.append(("tokenizer.ggml.normalizer.lowercase", self.lowercase))
        if self.strip_accents is not None:
            out.append(("tokenizer.ggml.normalizer.strip_accents", self.strip_accents))
        return out + self.special.kv()


def _tokenizer_json(folder: HFFolder) -> dict[str, Any] | None:
    value = folder.json("tokenizer.json", limit=MAX_TOKENIZER_BYTES)
    if value is not None and not isinstance(value, dict):
        raise ConversionError("'tokenizer.json' is not a JSON object")
    return value


def _model_section(tokenizer: dict[str, Any]) -> dict[str, Any]:
    model = tokenizer.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise ConversionError("'tokenizer.json' has no model vocabulary")
    if len(model["vocab"]) > MAX_VOCAB:
        raise ConversionError(f"'tokenizer.json' has more than {MAX_VOCAB} tokens")
    return model


def _normalizer_flags(vocab: Vocab, normalizer: Any) -> None:
    """The vendored SpecialVocab's ``_parse_normalizer``: Lowercase, StripAccents, the
    BertNormalizer's own flags, and the same inside a Sequence."""
    if not isinstance(normalizer, dict):
        return
    kind = normalizer.get("type")
    if kind == "Lowercase":
        vocab.lowercase = True
    elif kind == "StripAccents":
        vocab.strip_accents = True
    elif kind == "BertNormalizer":
        if isinstance(normalizer.get("lowercase"), bool):
            vocab.lowercase = normalizer["lowercase"]
        if isinstance(normalizer.get("strip_accents"), bool):
            vocab.strip_accents = normalizer["strip_accents"]
    elif kind == "Sequence":
        for item in normalizer.get("normalizers") or []:
            _normalizer_flags(vocab, item)


def looks_special(token: str) -> bool:
    """``TextModel.does_token_look_special``."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _vocab_base(
    ids: dict[str, Any], added: list[Any], vocab_size: int, source: str
) -> tuple[list[str], list[int]]:
    """``get_vocab_base``: every id below ``vocab_size`` (``[PAD<i>]`` where none), added
    tokens as control (special, or looking special) or user-defined tokens."""
    reverse: dict[int, str] = {}
    for token, token_id in ids.items():
        if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ConversionError(
                f"token {token!r} in '{source}' has id {token_id!r}, outside the model's "
                f"vocabulary of {vocab_size}"
            )
        reverse[token_id] = token
    specials: dict[str, bool] = {}
    for item in added:
        if isinstance(item, dict) and isinstance(item.get("content"), str):
            token_id = item.get("id")
            if isinstance(token_id, int) and 0 <= token_id < vocab_size:
                reverse[token_id] = item["content"]
                specials[item["content"]] = bool(item.get("special"))
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif token in specials:
            if specials[token] or looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalized user-defined spaces
                types.append(USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(NORMAL)
    return tokens, types


def _vocab_size(config: dict[str, Any], found: int) -> int:
    size = config.get("vocab_size", found)
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_VOCAB:
        raise ConversionError(f"'config.json' has an invalid vocab_size {size!r}")
    return size


def wordpiece_vocab(folder: HFFolder, config: dict[str, Any]) -> Vocab:
    """A BERT tokenizer: ``tokenizer.json`` (WordPiece), else ``vocab.txt``."""
    tokenizer = _tokenizer_json(folder)
    if tokenizer is None:
        return _vocab_txt(folder, config)
    model = _model_section(tokenizer)
    if model.get("type") != "WordPiece":
        raise ConversionError(
            f"'tokenizer.json' is a {model.get('type')!r} tokenizer; this BERT converter "
            "reads WordPiece tokenizers"
        )
    size = _vocab_size(config, len(model["vocab"]))
    added = tokenizer.get("added_tokens") or []
    tokens, types = _vocab_base(model["vocab"], added, size, "tokenizer.json")
    vocab = Vocab("bert", _phantom(tokens, types), types)
    _normalizer_flags(vocab, tokenizer.get("normalizer"))
    vocab.special = special_tokens(folder, tokenizer, size)
    return vocab


def _phantom(tokens: list[str], types: list[int]) -> list[str]:
    """llama.cpp's WordPiece form: ``##x`` → ``x``, ``x`` → ``▁x``, control tokens kept."""
    out = []
    for token, kind in zip(tokens, types, strict=True):
        if kind == CONTROL:
            out.append(token)
        elif token.startswith("##"):
            out.append(token[2:])
        else:
            out.append("\u2581" + token)
    return out


def _vocab_txt(folder: HFFolder, config: dict[str, Any]) -> Vocab:
    if not folder.has("vocab.txt"):
        raise ConversionError(
            "the model folder has no tokenizer: a BERT model needs 'tokenizer.json' or "
            "'vocab.txt'"
        )
    text = folder.read_bytes("vocab.txt", MAX_TOKENIZER_BYTES).decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    ids = {token: i for i, token in reversed(list(enumerate(lines)))}
    size = _vocab_size(config, len(lines))
    tok_config = folder.json_object("tokenizer_config.json")
    names = {
        v for k, v in {**folder.json_object("special_tokens_map.json"), **tok_config}.items()
        if k.endswith("_token") and isinstance(v, str)
    } | {"[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"}
    added = [{"id": ids[n], "content": n, "special": True} for n in names if n in ids]
    tokens, types = _vocab_base(ids, added, size, "vocab.txt")
    vocab = Vocab("bert", _phantom(tokens, types), types)
    lower = tok_config.get("do_lower_case", True)
    vocab.lowercase = lower if isinstance(lower, bool) else True
    if isinstance(tok_config.get("strip_accents"), bool):
        vocab.strip_accents = tok_config["strip_accents"]
    lookup: Callable[[str], int | None] = ids.get
    vocab.special = special_tokens(folder, None, size, lookup)
    for typ, name in (("bos", "[CLS]"), ("eos", "[SEP]"), ("cls", "[CLS]"), ("sep", "[SEP]")):
        vocab.special.set(typ, ids.get(name), size)
    vocab.special.add.update(bos=True, eos=True)
    return vocab


def bpe_vocab(folder: HFFolder, config: dict[str, Any]) -> Vocab:
    """A byte-level BPE tokenizer (``_set_vocab_gpt2``)."""
    tokenizer = _tokenizer_json(folder)
    if tokenizer is None:
        what = "'tokenizer.model' (SentencePiece)" if folder.has("tokenizer.model") else "none"
        raise ConversionError(
            f"the model folder has no 'tokenizer.json' (its tokenizer: {what}); pollama "
            "converts byte-level BPE tokenizers from tokenizer.json"
        )
    model = _model_section(tokenizer)
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE" if model.get("byte_fallback") else model.get("type")
        raise ConversionError(
            f"'tokenizer.json' is a {kind!s} tokenizer; pollama converts byte-level BPE "
            "tokenizers (GPT-2 style, as SmolLM and Llama 3 have) for this architecture"
        )
    size = _vocab_size(config, len(model["vocab"]))
    added = tokenizer.get("added_tokens") or []
    tokens, types = _vocab_base(model["vocab"], added, size, "tokenizer.json")
    vocab = Vocab("gpt2", tokens, types, pre=pre_tokenizer_name(tokenizer))
    vocab.merges = _merges(model.get("merges"))
    _normalizer_flags(vocab, tokenizer.get("normalizer"))
    vocab.special = special_tokens(folder, tokenizer, size)
    return vocab


def _merges(merges: Any) -> list[str]:
    """Merges as llama.cpp stores them: ``"a b"``; the newer ``[["a", "b"]]`` form has its
    spaces encoded as U+0120 + 256 (as the vendored SpecialVocab does)."""
    if not isinstance(merges, list) or not merges:
        raise ConversionError("'tokenizer.json' has no BPE merges")
    if len(merges) > MAX_MERGES:
        raise ConversionError(f"'tokenizer.json' has more than {MAX_MERGES} merges")
    out: list[str] = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge)
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) for p in merge):
            out.append(" ".join(p.replace(" ", chr(ord(" ") + 256)) for p in merge))
        else:
            raise ConversionError("'tokenizer.json' has a merge that is not a pair of strings")
    return out


def pre_tokenizer_name(tokenizer: dict[str, Any]) -> str:
    """The ``tokenizer.ggml.pre`` of a byte-level BPE tokenizer, from its pre-tokenizer:

    * digits split one by one, then ByteLevel with its own (GPT-2) regex: ``smollm``
      (SmolLM, SmolLM2; llama.cpp splits ``\\p{N}`` first, then the GPT-2 regex);
    * ByteLevel with its regex alone: ``gpt-2``;
    * a Split on Llama 3's regex (or Qwen2's), then ByteLevel without regex: ``llama-bpe``
      (``qwen2``);
    * anything else: llama.cpp's ``default``, with a warning (as Ollama does)."""
    parts = _pre_parts(tokenizer.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    byte_level = parts[-1] if kinds and kinds[-1] == "ByteLevel" else None
    regex = byte_level is not None and byte_level.get("use_regex", True) is not False
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and regex:
        return "smollm"
    if kinds == ["ByteLevel"] and regex:
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not regex:
        pattern = parts[0].get("pattern")
        name = _SPLIT_NAMES.get(pattern.get("Regex")) if isinstance(pattern, dict) else None
        if name:
            return name
    log.warning("unknown pre-tokenizer %s: using llama.cpp's default", kinds)
    return "default"


def _pre_parts(pre: Any) -> list[dict[str, Any]]:
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        items = pre.get("pretokenizers")
        return [p for p in items if isinstance(p, dict)] if isinstance(items, list) else []
    return [pre]
