"""Decode times by batch shape (rows per step), guessed between the shapes measured.

Both the drafting policy's step costs (``runner/ngram.py``) and the thread tuner's
references (``runner/tuning.py``) keep a time per row count, and most row counts a drafting
request makes are rare: a count never measured is drawn on the line between the nearest
counts measured below and above it. What each does beyond both ends differs, so that stays
with each.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

__all__ = ["on_the_line"]


def on_the_line(rows: int, counts: Sequence[int], times: Mapping[int, float]) -> float | None:
    """The time of a step of ``rows`` rows on the line between the nearest of ``counts``
    (the measured row counts, sorted; ``times`` by count) below and above it; None unless
    ``counts[0] < rows <= counts[-1]`` (at a measured count: its own time)."""
    at = bisect.bisect_left(counts, rows)
    if not 0 < at < len(counts):
        return None
    below, above = counts[at - 1], counts[at]
    low, high = times[below], times[above]
    return low + (high - low) * (rows - below) / (above - below)
