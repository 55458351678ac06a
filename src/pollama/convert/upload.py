"""What kind of upload a create's files are, decided from their names alone (no numpy, no
file read): the server asks it for every create."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["is_safetensors_upload"]


def is_safetensors_upload(names: Iterable[str]) -> bool:
    """Whether ``/api/create`` files are a Hugging Face folder rather than GGUF files (as
    Ollama's ``detectModelTypeFromFiles``: any ``*.safetensors``)."""
    return any(name.lower().endswith(".safetensors") for name in names)
