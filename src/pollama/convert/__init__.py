"""Hugging Face safetensors folders to GGUF, for ``create`` (``FROM`` a folder).

pollama's own converter, on ``numpy`` and ``gguf`` alone (llama.cpp's
``convert_hf_to_gguf.py`` needs PyTorch and transformers): it reads the folder's files
within bounds (``source.py``, ``safetensors.py``), plans the GGUF from the architecture's
configuration (``bert.py``, ``llama.py``, with the tokenizer from ``vocab.py`` and
``specials.py``), checking every tensor against it (``tensors.py``), and writes it a block
at a time (``writer.py``). Nothing from the upload is executed. See
docs/ollama-behaviour.md#create and docs/security.md#model-files.

This package never builds a path from a client's name: the store gives it the uploaded
files as ``{name in the folder: blob path}`` and the output path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from pollama.convert import bert, llama
from pollama.convert.source import HFFolder, is_safetensors_upload, refuse_pickles
from pollama.convert.writer import ConvertPlan, write_gguf
from pollama.errors import ConversionError

__all__ = [
    "KNOWN_ARCHITECTURES",
    "ConvertPlan",
    "is_safetensors_upload",
    "plan_conversion",
    "refuse_pickles",
    "write_gguf",
]

_PLANNERS: dict[str, Callable[[HFFolder, dict, str], ConvertPlan]] = {
    **{name: bert.plan_bert for name in bert.ARCHITECTURES},
    **{name: llama.plan_llama for name in llama.ARCHITECTURES},
}
KNOWN_ARCHITECTURES = tuple(_PLANNERS)


def plan_conversion(files: Mapping[str, Path]) -> ConvertPlan:
    """Read and check a Hugging Face folder (``{name: path}``); every ``ConversionError``
    comes from here, before anything is written."""
    folder = HFFolder(files)
    config = folder.config()
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise ConversionError(
            "'config.json' names no architecture (its \"architectures\" list); pollama "
            f"converts {', '.join(KNOWN_ARCHITECTURES)}"
        )
    architecture = architectures[0]
    planner = _PLANNERS.get(architecture) if isinstance(architecture, str) else None
    if planner is None:
        raise ConversionError(
            f"unsupported architecture {architecture!r}: pollama converts "
            f"{', '.join(KNOWN_ARCHITECTURES)}"
        )
    return planner(folder, config, architecture)
