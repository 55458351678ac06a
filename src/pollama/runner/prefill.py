"""Whether a short prompt remainder should take cached tokens back to fill a tile.

llama.cpp's CPU flash-attention kernel (``ggml-cpu/ops.cpp``) takes fewer than
:data:`TILE` query rows of a sequence one by one, reading the whole cache again for each
row and head, and :data:`TILE` rows or more through a tiled matrix product
(docs/ollama-behaviour.md#flash-attention-on-the-cpu). So the few new tokens of a chat's
next turn, after hundreds of cached ones, can cost more than a tile would. Measured on a
2-core Xeon after 1,024 cached tokens: SmolLM2-135M took 176 ms for 16 rows against 116 ms
for 64, Qwen2.5-Coder-0.5B 555 ms for 32 against 334 ms; but Qwen2.5-Coder-1.5B 184 ms for
16 against 472 ms, and with flash attention off a row costs little at any depth. Hence a
measurement, not a rule: :class:`ShortChunks` learns, per model and depth, what a decode of
one row costs, what each further row adds, and what a tile costs; the engine evaluates
``TILE - left`` cached tokens again in front of a remainder of ``left`` tokens only when
the tile is clearly (:data:`MARGIN`) the cheaper. A row's cost is what it adds to a one-row
decode, not a decode's time shared among its rows: with flash attention off, a decode of two
rows costs little more than one, and shared per row it foretold 100 ms for 25 rows that
took 50 (and a tile of 100 ms was taken for it).

What must stay true:

* a short chunk is never padded before its costs were measured at its depth or a shallower
  one (a row's cost grows with depth faster than a tile's, so what paid shallower pays
  deeper); a fresh worker therefore evaluates its first short chunks as they come;
* only steps that decoded one sequence's rows and nothing else are samples: a prompt
  chunk, or a single row decoded. Not a draft: each of its rows asks for logits, which a
  prompt chunk's last row alone does (for Qwen2.5-Coder-1.5B's 151,936-token vocabulary
  that doubled what a row seemed to add, and a short rest was padded where it lost);
* only steps on all the decode threads are samples: the thread tuner's probes and a busy
  machine's fewer threads (``runner/tuning.py``) would make a row look dear;
* what a worker measured outlives it beside the prompt cache's files (``runner/kvstate.py``),
  each mean read back worth one sample, so that a restored conversation's next turn is
  padded at once where it pays, and a new machine's measurements soon replace it;
* tokens evaluated again are the ones already cached at the same positions: the answer
  differs from an unpadded one only by the kernels' rounding, as an uncached prompt's does.
"""

from __future__ import annotations

from pollama.runner.shapes import MovingMeans

__all__ = ["TILE", "ShortChunks"]

TILE = 64
"""Query rows of one sequence from which the CPU kernel takes the tiled path."""
MIN_DEPTH = 128
"""Below this many cached tokens a row is cheap on every model measured: never padded."""
MARGIN = 1.25
"""A tile is taken for a short rest when the rest is foretold to cost this much more."""
_EMA = 0.3  # weight of a new sample once a depth has a few
_MAX_BUCKET = 64  # depths are positions: 2**63 at most


def _bucket(depth: int) -> int:
    """Depths are learned in powers of two: 128-255, 256-511, ..."""
    return max(depth, 1).bit_length()


class _Means(MovingMeans):
    """A moving average per depth bucket (``runner/shapes.py``), kept as JSON."""

    def __init__(self) -> None:
        super().__init__(_EMA)

    def to_json(self) -> dict[str, float]:
        return {str(bucket): mean for bucket, mean in sorted(self.means.items())}

    def load(self, data: object) -> None:
        """Means kept by an earlier worker, each worth one sample (what this worker
        measures soon outweighs them). ``ValueError`` for anything but ``{"<bucket>":
        seconds}`` with buckets 1 to :data:`_MAX_BUCKET` and seconds in [0, 60] (what a
        further row adds may be measured as nothing)."""
        if not isinstance(data, dict) or len(data) > _MAX_BUCKET:
            raise ValueError("a cost table must be an object of at most 64 depths")
        for key, value in data.items():
            if not (isinstance(key, str) and key.isdigit() and 1 <= int(key) <= _MAX_BUCKET):
                raise ValueError(f"not a depth bucket: {key!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"not a time: {value!r}")
            if not 0 <= value <= 60:  # NaN fails too
                raise ValueError(f"a time out of range: {value!r}")
            self.set(int(key), float(value))

    def at_or_below(self, bucket: int) -> float | None:
        """The mean of ``bucket``, else of the deepest bucket below it that has one."""
        known = [b for b in self.means if b <= bucket]
        return self.means[max(known)] if known else None


class ShortChunks:
    """Decode costs of one sequence's rows by depth, and the padding they advise."""

    def __init__(self) -> None:
        self._one = _Means()  # seconds of a decode of one row
        self._extra = _Means()  # seconds each further row adds (2 to TILE - 1 rows)
        self._tile = _Means()  # seconds of a decode of exactly TILE rows
        self._scaled = _Means()  # seconds of a longer prompt chunk, scaled to TILE rows

    def to_json(self) -> dict[str, dict[str, float]]:
        """What was measured, for the next worker of the same model and load options
        (kept beside the prompt cache's files: ``runner/kvstate.py``)."""
        return {name: means.to_json() for name, means in self._tables().items()}

    @classmethod
    def from_json(cls, data: object) -> ShortChunks:
        """The costs :meth:`to_json` gave; ``ValueError`` when ``data`` is not such."""
        chunks = cls()
        tables = chunks._tables()
        if not isinstance(data, dict) or not set(data) <= set(tables):
            raise ValueError(f"cost tables must be an object of {', '.join(tables)}")
        for name, table in data.items():
            tables[name].load(table)
        return chunks

    def _tables(self) -> dict[str, _Means]:
        return {"one": self._one, "extra": self._extra, "tile": self._tile,
                "scaled": self._scaled}  # fmt: skip

    def record(self, rows: int, depth: int, seconds: float) -> None:
        """A step that decoded ``rows`` rows of one sequence after ``depth`` cached
        positions, and nothing else, took ``seconds``: a prompt chunk (logits for its last
        row), or one row."""
        if seconds <= 0 or rows < 1:
            return
        bucket = _bucket(depth)
        if rows == 1:
            self._one.add(bucket, seconds)
        elif rows < TILE:
            one = self._one.at_or_below(bucket)
            if one is not None:  # what the rows past the first added
                self._extra.add(bucket, max(seconds - one, 0.0) / (rows - 1))
        elif rows == TILE:
            self._tile.add(bucket, seconds)
        else:  # mostly matrix products, whose cost goes with the rows
            self._scaled.add(bucket, seconds * TILE / rows)

    def rows_back(self, left: int, cached: int) -> int:
        """How many of the ``cached`` tokens to evaluate again with the ``left`` new ones
        of a prompt (0: none)."""
        if not 2 <= left < TILE or cached < max(MIN_DEPTH, TILE - left):
            return 0
        bucket = _bucket(cached)
        one, extra = self._one.at_or_below(bucket), self._extra.at_or_below(bucket)
        tile = self._tile.at_or_below(bucket)
        if tile is None:  # no tile measured yet: a longer chunk's cost, scaled
            tile = self._scaled.at_or_below(bucket)
        if one is None or extra is None or tile is None:
            return 0
        return TILE - left if one + (left - 1) * extra > MARGIN * tile else 0
