"""What a text can cost before it is tokenized: the fewest tokens it can become.

A token's text is never longer than the model's longest token (``max_token_bytes``, which
the worker reports after loading: its longest piece, special tokens included, widened for
tokenizers that normalize text away), so a text of ``n`` bytes is at least
``n // max_token_bytes`` tokens. A prompt whose floor is already over the context can be
refused, and an embedding input cut, without sending it to the worker: tokenizing 30 MB
cost the worker about 100 bytes per token and killed it, and llama.cpp's special-token
split grows faster than the text. Every text that reaches the tokenizer is then at most
``n_ctx * max_token_bytes`` bytes (a few hundred kilobytes at the usual sizes).

What must stay true: a floor never exceeds the real count for the tokenizers llama.cpp
runs (BPE and SentencePiece pieces spell the text back; WordPiece and Unigram get four
times the slack for what normalization removes), so a prompt that fits is never refused.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TokenFloor"]

# Texts of fewer characters (at most 4 KiB of UTF-8) go to the tokenizer whatever the bound
# says: counting their bytes is not worth it, and a tiny context still gets exact counts.
_ALWAYS_TOKENIZE_CHARS = 1024


@dataclass(frozen=True)
class TokenFloor:
    """The token floor of texts for one loaded model; ``max_token_bytes`` 0 means unknown
    (a runner that does not report it): no text is then refused or cut here."""

    max_token_bytes: int

    def of(self, text: str) -> int:
        """The fewest tokens ``text`` can be (0 when it is short or the bound unknown)."""
        if self.max_token_bytes <= 0 or len(text) < _ALWAYS_TOKENIZE_CHARS:
            return 0
        return len(text.encode("utf-8", "surrogatepass")) // self.max_token_bytes

    def cut(self, text: str, limit: int) -> str:
        """``text`` shortened so that it still holds its first ``limit`` tokens and more:
        twice the bytes that ``limit`` of the longest tokens take, so the tokens that
        truncation keeps come out as they would from the whole text."""
        if self.max_token_bytes <= 0:
            return text
        keep = 2 * (limit + 1) * self.max_token_bytes
        if len(text) <= keep // 4:  # four bytes a character at most: short enough already
            return text
        data = text.encode("utf-8", "surrogatepass")
        return text if len(data) <= keep else data[:keep].decode("utf-8", "ignore")
