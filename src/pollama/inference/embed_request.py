"""What an embedding request asks for, whatever protocol it came by.

Kept apart from ``inference/embeddings.py`` (the service) so that the wire models in
``protocol/`` can build one without importing the store and the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pollama.errors import InvalidRequest

__all__ = ["EmbeddingJob", "embedding_inputs"]


def embedding_inputs(value: Any) -> list[str]:
    """A request's ``input`` (a string or a list of strings) as a list. Ollama's
    ``invalid input type`` for anything else; an empty list is refused too (Ollama would
    answer it with no vectors, which hides a caller's bug, e.g. an empty batch of chunks)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if not value:
            raise InvalidRequest("invalid input: the input list is empty, nothing to embed")
        if all(isinstance(item, str) for item in value):
            return list(value)
    raise InvalidRequest("invalid input type")


@dataclass
class EmbeddingJob:
    """One embedding request, whatever protocol it came by. An empty ``inputs`` only loads
    the model (or unloads it, with ``keep_alive`` 0)."""

    model: str  # as the caller wrote it (errors quote it back)
    inputs: list[str]
    truncate: bool = True
    dimensions: int | None = None  # None or 0: the model's full length
    keep_alive: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    # "embeddings" is the legacy endpoint: Ollama words its not-found errors differently
    # there, and returns the vectors unnormalized for some models
    # (``inference.embeddings.legacy_raw``).
    endpoint: Literal["embed", "embeddings"] = "embed"
