"""Token-list helpers that the engine and the draft model's drafter both need."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["common_prefix"]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists (compared in numpy: these are whole
    conversations, compared at every new request and, for a draft model, every step)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    return int(diff.argmax()) if diff.any() else n
