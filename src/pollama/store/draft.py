"""Draft models (Modelfile ``DRAFT``, speculative decoding): whether one can draft for a
model, read from the two GGUF headers alone.

llama.cpp drafts with a second model only when both read text as the same tokens: at every
load it compares the two vocabularies (``common_speculative_are_compatible`` in
``common/speculative.cpp``, llama-cpp-python 0.3.36) and refuses a pair that differs.
``create`` asks :func:`vocabulary_mismatch` first, so such a pair is a 400 that names what
differs instead of a model whose draft fails at every load. What must stay true:

* The checks are llama.cpp's, in its order: the vocabulary type, then whether a BOS token is
  added (and which one, when it is), the same for EOS, then the sizes (at most
  :data:`MAX_SIZE_DIFFERENCE` apart), then every token's text from id
  :data:`CHECK_START_TOKEN` up to the smaller size.
* What llama.cpp derives when a key is absent follows ``llama_vocab::impl::load``
  (``src/llama-vocab.cpp``): the vocabulary type of each ``tokenizer.ggml.model``, its
  default BOS/EOS ids (a default beyond the vocabulary is none), and whether BOS/EOS are
  added by default (SPM and WPM add BOS, UGM adds EOS, a few BPE pre-tokenizers add BOS).
  The keys themselves win, as there (an id beyond the vocabulary keeps the default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Final

from pollama.gguf import GGUFInfo, PackedStrings

__all__ = ["CHECK_START_TOKEN", "MAX_SIZE_DIFFERENCE", "vocabulary_mismatch"]

MAX_SIZE_DIFFERENCE: Final = 128
"""``SPEC_VOCAB_MAX_SIZE_DIFFERENCE``: how many more tokens one vocabulary may have."""
CHECK_START_TOKEN: Final = 5
"""``SPEC_VOCAB_CHECK_START_TOKEN_ID``: the first token whose text must be the same."""

# tokenizer.ggml.model -> llama.cpp's vocabulary type (llama_vocab_type); a name llama.cpp
# does not know stands for itself (it would not load either way).
_VOCAB_TYPES: Final = {
    "no_vocab": "none", "none": "none", "llama": "spm", "bert": "wpm", "gpt2": "bpe",
    "hybriddna": "bpe", "whitespace": "bpe", "gemma4": "bpe", "t5": "ugm", "rwkv": "rwkv",
    "plamo2": "plamo2", "test": "test",
}  # fmt: skip
# tokenizer.ggml.model -> the default (BOS, EOS) ids; None is LLAMA_TOKEN_NULL.
_DEFAULT_IDS: Final[dict[str, tuple[int | None, int | None]]] = {
    "llama": (1, 2), "bert": (101, None), "gpt2": (11, 11), "hybriddna": (11, 11),
    "whitespace": (11, 11), "t5": (None, 1), "plamo2": (1, 2),
}  # fmt: skip
# The BPE pre-tokenizers (tokenizer.ggml.pre) that add BOS unless the file says otherwise.
_BOS_PRE_TOKENIZERS: Final = frozenset({
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
    "jina-v5-nano", "tekken", "chameleon",
})  # fmt: skip
# The BPE pre-tokenizers llama.cpp treats as Gemma 4's, which always add BOS.
_GEMMA4_PRE_TOKENIZERS: Final = frozenset({"gemma4", "granite-embed-multi-311m"})


@dataclass(frozen=True)
class _Vocab:
    """What llama.cpp's comparison reads of one vocabulary."""

    tokenizer: str
    kind: str
    tokens: Sequence[str]
    add_bos: bool
    add_eos: bool
    bos: int | None
    eos: int | None


def _uint(kv: dict[str, Any], key: str) -> int | None:
    value = kv.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read(info: GGUFInfo) -> _Vocab | None:
    """The vocabulary as llama.cpp loads it, or None for a header without one."""
    kv = info.kv
    tokenizer, tokens = kv.get("tokenizer.ggml.model"), kv.get("tokenizer.ggml.tokens")
    if not isinstance(tokenizer, str) or not isinstance(tokens, list | PackedStrings):
        return None
    kind = _VOCAB_TYPES.get(tokenizer, tokenizer)
    pre = kv.get("tokenizer.ggml.pre")
    add_bos = kind in ("spm", "wpm") or (kind == "bpe" and pre in _BOS_PRE_TOKENIZERS)
    add_eos = kind == "ugm"
    if isinstance(kv.get("tokenizer.ggml.add_bos_token"), bool):
        add_bos = kv["tokenizer.ggml.add_bos_token"]
    if isinstance(kv.get("tokenizer.ggml.add_eos_token"), bool):
        add_eos = kv["tokenizer.ggml.add_eos_token"]
    if kind == "bpe" and (tokenizer == "gemma4" or pre in _GEMMA4_PRE_TOKENIZERS):
        add_bos = True  # llama.cpp's Gemma 4 workaround overrides the file
    ids: list[int | None] = []
    for default, key in zip(_DEFAULT_IDS.get(tokenizer, (None, None)), ("bos", "eos"),
                            strict=True):
        if default is not None and default >= len(tokens):
            default = None
        given = _uint(kv, f"tokenizer.ggml.{key}_token_id")
        ids.append(given if given is not None and 0 <= given < len(tokens) else default)
    return _Vocab(tokenizer, kind, tokens, add_bos, add_eos, ids[0], ids[1])


def _special(name: str, draft: tuple[bool, int | None], model: tuple[bool, int | None]) -> str:
    """How the draft's BOS or EOS token differs from the model's ('' if it does not)."""
    (draft_adds, draft_id), (model_adds, model_id) = draft, model
    if draft_adds != model_adds:
        adds = {True: "adds", False: "does not add"}
        article = "an" if name == "EOS" else "a"
        return (
            f"the draft {adds[draft_adds]} {article} {name} token and the model "
            f"{adds[model_adds]} one"
        )
    if model_adds and draft_id != model_id:
        return f"the {name} token is {_id(draft_id)} in the draft and {_id(model_id)} in the model"
    return ""


def _id(token: int | None) -> str:
    return "none" if token is None else str(token)


def _first_different_token(draft: Sequence[str], model: Sequence[str]) -> int | None:
    """The first id from :data:`CHECK_START_TOKEN` whose text differs, up to the smaller size
    (a vocabulary of 150 K tokens decodes in a few tens of milliseconds)."""
    pairs = islice(zip(draft, model, strict=False), CHECK_START_TOKEN, None)
    for index, (a, b) in enumerate(pairs, start=CHECK_START_TOKEN):
        if a != b:
            return index
    return None


def vocabulary_mismatch(model: GGUFInfo, draft: GGUFInfo) -> str | None:
    """Why llama.cpp would refuse ``draft`` as the draft model of ``model``, in words, or
    None when it would accept the pair. A model header without a vocabulary gives None
    (nothing to compare with: its load reports llama.cpp's own error); a draft without
    one is refused, since it could never draft."""
    mine = _read(model)
    if mine is None:
        return None
    theirs = _read(draft)
    if theirs is None:
        return "the draft has no vocabulary (no tokenizer.ggml.model and tokenizer.ggml.tokens)"
    if theirs.kind != mine.kind:
        return (
            f"the tokenizer is '{theirs.tokenizer}' in the draft and '{mine.tokenizer}' in "
            "the model"
        )
    for name, draft_side, model_side in (
        ("BOS", (theirs.add_bos, theirs.bos), (mine.add_bos, mine.bos)),
        ("EOS", (theirs.add_eos, theirs.eos), (mine.add_eos, mine.eos)),
    ):
        if difference := _special(name, draft_side, model_side):
            return difference
    sizes = len(theirs.tokens), len(mine.tokens)
    if abs(sizes[0] - sizes[1]) > MAX_SIZE_DIFFERENCE:
        return (
            f"it has {sizes[0]} tokens in the draft and {sizes[1]} in the model (llama.cpp "
            f"allows at most {MAX_SIZE_DIFFERENCE} more or fewer)"
        )
    index = _first_different_token(theirs.tokens, mine.tokens)
    if index is not None:
        return (
            f"token {index} is {theirs.tokens[index]!r} in the draft and "
            f"{mine.tokens[index]!r} in the model"
        )
    return None
