"""Embedding vectors as the APIs return them: checked, L2-normalized, shortened, encoded.

This is the only server module that imports numpy, and it is imported on the first
embedding request (``inference/embeddings.py``), so a server that never embeds does not
carry numpy (about 15 MiB resident).

Ollama's rules (docs/ollama-behaviour.md#embeddings, ``server/routes.go`` ``normalize``): every
vector is scaled to norm 1 (a zero vector stays zero); ``0 < dimensions < len`` keeps the first
``dimensions`` values and normalizes again; a NaN or infinite value is an error. Values are
float32, as Ollama's are, and are written (``server/vectors_json.py``) the way Go writes a
float32 (the shortest decimal that reads back as the same float32) rather than as float64
noise.
"""

from __future__ import annotations

import base64

import numpy as np
import numpy.typing as npt

from pollama.errors import InternalError, InvalidRequest

__all__ = [
    "Vector",
    "checked_float",
    "finish",
    "from_bytes",
    "to_base64",
    "to_float64_list",
]

Vector = npt.NDArray[np.float32]

_MIN_NORM = 1e-12  # Ollama's floor: a zero vector is not divided by zero


def from_bytes(raw: bytes) -> Vector:
    """A worker's vector (little-endian float32 bytes) as an array (a copy: writable)."""
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _normalized(vector: Vector) -> Vector:
    wide = vector.astype(np.float64)
    norm = max(float(np.sqrt(np.dot(wide, wide))), _MIN_NORM)
    return (wide / norm).astype(np.float32)


def finish(vector: Vector, *, dimensions: int | None = None, normalize: bool = True) -> Vector:
    """The vector a response carries: checked for NaN/Inf, normalized (unless
    ``normalize`` is off: the legacy endpoint), and cut to ``dimensions``.

    ``dimensions`` must be 1 to the vector's length (the request model refuses 0 and
    negatives before anything runs); equal to it, nothing is cut.
    """
    if not np.isfinite(vector).all():
        raise InternalError("embedding contains NaN or Inf values")
    if dimensions is not None and dimensions > len(vector):
        raise InvalidRequest(
            f"dimensions {dimensions} is more than the model's {len(vector)} embedding "
            "dimensions"
        )
    if normalize:
        vector = _normalized(vector)
    if dimensions is not None and dimensions < len(vector):
        vector = vector[:dimensions]
        if normalize:
            vector = _normalized(vector)
    return vector


def checked_float(value: float) -> float:
    """A score as a JSON number: finite (else the same error as a vector's), written as its
    shortest float32 decimal, as ``server/vectors_json.py`` writes a vector's values."""
    if not np.isfinite(value):
        raise InternalError("the model's score is NaN or Inf")
    return float(str(np.float32(value)))


def to_float64_list(vector: Vector) -> list[float]:
    """The float32 values widened to float64, as Ollama's legacy ``/api/embeddings`` writes
    them (``[]float64`` converted from the runner's ``[]float32``)."""
    return [float(x) for x in vector.astype(np.float64).tolist()]


def to_base64(vector: Vector) -> str:
    """OpenAI's ``encoding_format: base64``: little-endian float32 bytes, base64."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
