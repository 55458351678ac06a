"""Decode times by batch shape (rows per step), guessed between the shapes measured.

Both the drafting policy's step costs (``runner/ngram.py``) and the thread tuner's
references (``runner/tuning.py``) keep a time per row count, and most row counts a drafting
request makes are rare: a count never measured is drawn on the line between the nearest
counts measured below and above it. What each does beyond both ends differs, so that stays
with each. The drafting policy and the short-chunk policy (``runner/prefill.py``) average
their samples alike (:class:`MovingMeans`).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

__all__ = ["MovingMeans", "on_the_line"]


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


class MovingMeans:
    """A mean per key: a key's first samples averaged plainly, later ones moved by
    ``weight`` (a moving average). A shape measured a few times in a worker's life is still
    averaged, and one slow first sample (another process busy at that moment) does not
    weigh fully for ever."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.means: dict[int, float] = {}  # read, never written, by the owner
        self._counts: dict[int, int] = {}

    def add(self, key: int, value: float) -> bool:
        """One more sample of ``key``; True when it is the key's first."""
        n = self._counts.get(key, 0) + 1
        self._counts[key] = n
        mean = self.means.get(key)
        if mean is None:
            self.means[key] = value
            return True
        self.means[key] = mean + max(1.0 / n, self.weight) * (value - mean)
        return False

    def samples(self, key: int) -> int:
        """How many samples of ``key`` were added (0: none)."""
        return self._counts.get(key, 0)

    def scale(self, factor: float) -> None:
        """Every mean times ``factor`` (their unit changed), each keeping its samples."""
        for key in self.means:
            self.means[key] *= factor

    def set(self, key: int, value: float) -> None:
        """``value`` as the key's mean, worth one sample."""
        self.means[key] = value
        self._counts[key] = 1
