"""A JSON response that writes float32 arrays as Go writes float32s, fast.

Embedding responses are mostly numbers: 64 vectors of 384 values are 24,576 floats, which
Python's float formatting took 28 ms to write (longer than embedding them in one batch took
per text). orjson writes a numpy float32 array natively, each value as its shortest float32
decimal (``0.33333334``, ``-2.5e-8``: Go's ``encoding/json`` spelling for Ollama's
``[]float32``, which reads back as the same float32), in under a millisecond.

What must stay true: only finite values reach it (``inference/vectors.finish`` refuses NaN
and Inf first), and arrays are 1-D and contiguous, as ``finish`` returns them.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

__all__ = ["VectorsResponse", "dumps"]


def dumps(content: Any) -> bytes:
    """``content`` as JSON, numpy arrays and scalars included."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class VectorsResponse(JSONResponse):
    """A ``JSONResponse`` whose content may hold numpy float32 vectors."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
