"""Long texts tokenized in pieces, so that special-token parsing stays linear.

llama.cpp splits a text at every special-token string before tokenizing the rest, and that
split costs time quadratic in the number of special-token strings in one call (1 MB of
``<|im_start|>`` took 11 s on SmolLM2's vocabulary while 1.2 MB of words took 0.3 s).
Cutting the text into pieces of about :data:`PIECE_CHARS` characters, each ending just
before a special-token string, and tokenizing the pieces one after the other keeps the
cost linear and the tokens the same: llama.cpp tokenizes the text between two special
tokens on its own anyway, so a cut where it would split changes nothing.

What must stay true: a cut is made only where llama.cpp itself splits, just before a
special-token string, and never where that token would strip the whitespace before it
(``lstrip``), which would then be on the other side of the cut.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["PIECE_CHARS", "SpecialSplitter"]

PIECE_CHARS = 16 << 10
"""About the size of one tokenizer call on a long text (16k characters: a few ms at worst)."""


@dataclass(frozen=True)
class SpecialSplitter:
    """Where a text may be cut for one vocabulary: ``pattern`` finds its special-token
    strings; ``lstrip`` are those that eat the whitespace before them."""

    pattern: re.Pattern[str] | None
    lstrip: frozenset[str]

    @classmethod
    def of(cls, specials: Iterable[tuple[str, bool]]) -> SpecialSplitter:
        """From ``(text, strips_left)`` of every special token (longest matched first)."""
        texts = sorted({text for text, _ in specials if text}, key=len, reverse=True)
        lstrip = frozenset(text for text, strips in specials if strips and text)
        pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
        return cls(pattern, lstrip)

    def pieces(self, text: str, size: int = PIECE_CHARS) -> Iterator[str]:
        """``text`` in consecutive pieces of at least ``size`` characters where it can be
        cut (the last one may be shorter, a piece longer where no cut is allowed)."""
        start = 0
        while len(text) - start > size and self.pattern is not None:
            cut = self._cut_after(text, start + size)
            if cut < 0:
                break
            yield text[start:cut]
            start = cut
        yield text[start:]

    def _cut_after(self, text: str, pos: int) -> int:
        """The first allowed cut at or after ``pos`` (-1: none)."""
        assert self.pattern is not None
        for match in self.pattern.finditer(text, pos):
            at = match.start()
            if match.group() not in self.lstrip or not text[at - 1].isspace():
                return at
        return -1
