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

from typing import TYPE_CHECKING, Any

from pollama.convert.upload import is_safetensors_upload

if TYPE_CHECKING:
    from pollama.convert.plan import KNOWN_ARCHITECTURES, plan_conversion
    from pollama.convert.source import refuse_pickles
    from pollama.convert.writer import ConvertPlan, write_gguf

__all__ = [
    "KNOWN_ARCHITECTURES",
    "ConvertPlan",
    "is_safetensors_upload",
    "plan_conversion",
    "refuse_pickles",
    "write_gguf",
]

# numpy and gguf load only when a folder is converted: ``import pollama.convert`` (which the
# server does at start, through the store's create) stays light.
_LAZY = {
    "KNOWN_ARCHITECTURES": "pollama.convert.plan",
    "plan_conversion": "pollama.convert.plan",
    "refuse_pickles": "pollama.convert.source",
    "ConvertPlan": "pollama.convert.writer",
    "write_gguf": "pollama.convert.writer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pollama.convert' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
