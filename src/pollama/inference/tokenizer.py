"""Tokenize and detokenize with a model's own vocabulary (``/api/tokenize``, ``/api/detokenize``).

The loaded worker answers, as it does for generation: the model is scheduled (and loaded if
needed) through the same placement and lease as a generate request
(:meth:`InferenceService.placement`), so a tokenizer request never loads a second copy.

Both are bounded before the worker sees them: ``content`` to :data:`MAX_CONTENT_BYTES` (a token
is at least one byte of text, so the reply stays far within the worker protocol's line limit)
and ``tokens`` to :data:`MAX_TOKENS`; each token must be an integer in the vocabulary, and the
error names the first one that is not.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pollama.errors import InvalidRequest, ModelNotFound
from pollama.inference.service import InferenceService, Placement
from pollama.names import ModelName
from pollama.store.describe import model_gguf

__all__ = ["MAX_CONTENT_BYTES", "MAX_TOKENS", "TokenizerService", "Tokenized", "join_pieces"]

MAX_TOKENS = 1_000_000
"""The most tokens one request may send to ``/api/detokenize`` or get from ``/api/tokenize``."""
MAX_CONTENT_BYTES = 4 * MAX_TOKENS
"""The most UTF-8 bytes of ``content`` one ``/api/tokenize`` request may send."""


@dataclass(frozen=True)
class Tokenized:
    """The tokens of a text, and each token's text piece when asked for."""

    tokens: list[int]
    pieces: list[str] | None = None


def join_pieces(raw: Sequence[bytes]) -> list[str]:
    """Each token's bytes as text, decoded incrementally: a character split across tokens
    (a multi-byte character in byte-level pieces) belongs to the token that completes it, so
    the pieces joined are exactly the text the tokens decode to."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pieces = [decoder.decode(piece) for piece in raw]
    tail = decoder.decode(b"", final=True)
    if tail and pieces:
        pieces[-1] += tail
    return pieces


def check_tokens(tokens: Sequence[Any], n_vocab: int | None = None) -> list[int]:
    """``tokens`` as integers, refused (400 naming the first bad one) when one is not an
    integer or (``n_vocab`` known) outside the vocabulary, or when there are too many."""
    if len(tokens) > MAX_TOKENS:
        raise InvalidRequest(f"too many tokens: {len(tokens)} (at most {MAX_TOKENS})")
    for i, token in enumerate(tokens):
        if isinstance(token, bool) or not isinstance(token, int):
            raise InvalidRequest(f"invalid token at index {i}: {token!r} is not an integer")
        if n_vocab is not None and not 0 <= token < n_vocab:
            raise InvalidRequest(
                f"invalid token id {token} at index {i}: the vocabulary has {n_vocab} tokens"
            )
    return [int(t) for t in tokens]


class TokenizerService:
    """Tokenizer requests over the inference service's placement and scheduler."""

    def __init__(self, inference: InferenceService) -> None:
        self.inference = inference

    def _placement(self, name: str, options: dict[str, Any] | None) -> Placement:
        """Where ``name`` runs, as a generate request with these ``options`` would run."""
        if not name:
            raise InvalidRequest("model is required")
        model = self.inference.store.find(ModelName.parse(name))
        if model is None:
            raise ModelNotFound(f"model '{name}' not found")
        info = model_gguf(model)
        if info is None:
            raise InvalidRequest(f"model '{name}' has no weights to run")
        return self.inference.placement(model, info, options)

    async def tokenize(
        self,
        name: str,
        content: str,
        *,
        add_special: bool = True,
        with_pieces: bool = False,
        keep_alive: Any = None,
        options: dict[str, Any] | None = None,
    ) -> Tokenized:
        """The tokens of ``content`` (and their pieces), from the model's loaded worker."""
        size = len(content.encode("utf-8", "surrogatepass"))
        if size > MAX_CONTENT_BYTES:
            raise InvalidRequest(
                f"content is {size} bytes; at most {MAX_CONTENT_BYTES} bytes can be tokenized "
                "in one request"
            )
        place = self._placement(name, options)
        scheduler = self.inference.scheduler
        async with scheduler.use(place.ref, place.spec, place.keep_alive_for(keep_alive)) as lease:
            tokens = await lease.runner.tokenize(content, add_special)
            if len(tokens) > MAX_TOKENS:
                raise InvalidRequest(f"content is {len(tokens)} tokens (at most {MAX_TOKENS})")
            pieces = join_pieces(await lease.runner.pieces(tokens)) if with_pieces else None
        return Tokenized(tokens=tokens, pieces=pieces)

    async def detokenize(
        self,
        name: str,
        tokens: Sequence[Any],
        *,
        keep_alive: Any = None,
        options: dict[str, Any] | None = None,
    ) -> str:
        """The text of ``tokens``, from the model's loaded worker."""
        check_tokens(tokens)  # types and count: before anything loads
        place = self._placement(name, options)
        scheduler = self.inference.scheduler
        async with scheduler.use(place.ref, place.spec, place.keep_alive_for(keep_alive)) as lease:
            ids = check_tokens(tokens, lease.info.n_vocab or None)
            return await lease.runner.detokenize(ids)
