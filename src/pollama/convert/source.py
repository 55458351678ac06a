"""The uploaded Hugging Face folder: its files by name, read within bounds, nothing executed.

The server gives this module a map from each uploaded file's name in the folder
(``config.json``, ``1_Pooling/config.json``, ``model-00001-of-00002.safetensors``…) to the
blob that holds it; the store builds those paths, never this module. JSON files are read
whole but only up to a size limit each; safetensors files only their headers
(``convert/safetensors.py``). Pickled weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``,
``.pkl``) are refused by name before anything is read: unpickling runs code, and no
``trust_remote_code`` Python file is ever imported either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pollama.convert.safetensors import SourceTensor, read_header
from pollama.errors import ConversionError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_TOKENIZER_BYTES",
    "HFFolder",
    "refuse_pickles",
]

MAX_JSON_BYTES = 4 << 20
"""config.json, tokenizer_config.json and the other small JSON files."""
MAX_TOKENIZER_BYTES = 64 << 20
"""tokenizer.json (Gemma's is 33 MB, Llama 3's 9 MB) and vocab.txt."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickles(files: Mapping[str, Path]) -> None:
    """Refuse pickled weights among files that are not a safetensors folder: a file named
    like one (``pytorch_model.bin``) that is not a GGUF inside (an old ``.bin`` name for a
    GGUF is fine, as Ollama sniffs the content too)."""
    for name in sorted(files):
        if name.lower().endswith(PICKLE_SUFFIXES):
            with open(files[name], "rb") as f:
                if f.read(4) != b"GGUF":
                    raise ConversionError(_pickle_message(name))


def _pickle_message(name: str) -> str:
    return (
        f"'{name}' holds pickled PyTorch weights, which pollama never loads (unpickling "
        "runs code): convert the model to safetensors first (for example with "
        "transformers: model.save_pretrained(folder, safe_serialization=True))"
    )


@dataclass
class HFFolder:
    """The files of one upload, by their names in the folder."""

    files: Mapping[str, Path]
    _json: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pickled = sorted(n for n in self.files if n.lower().endswith(PICKLE_SUFFIXES))
        if pickled:
            raise ConversionError(_pickle_message(pickled[0]))

    def has(self, name: str) -> bool:
        return name in self.files

    def read_bytes(self, name: str, limit: int) -> bytes:
        """A file's bytes, refusing one over ``limit`` before reading it."""
        path = self.files[name]
        size = os.stat(path).st_size
        if size > limit:
            raise ConversionError(f"'{name}' is {size} bytes, more than the {limit} allowed")
        with open(path, "rb") as f:
            return f.read(limit + 1)[:limit]

    def json(self, name: str, *, limit: int = MAX_JSON_BYTES, required: bool = False) -> Any:
        """A JSON file of the folder (``None`` when absent and not ``required``); a file that
        does not parse is a ``ConversionError`` naming it."""
        if name in self._json:
            return self._json[name]
        if name not in self.files:
            if required:
                raise ConversionError(f"the model folder has no '{name}'")
            return None
        try:
            value = json.loads(self.read_bytes(name, limit))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ConversionError(f"'{name}' does not parse as JSON: {exc}") from None
        self._json[name] = value
        return value

    def json_object(self, name: str, *, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
        """A JSON file that must be an object when present (``{}`` when absent)."""
        value = self.json(name, limit=limit)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConversionError(f"'{name}' is not a JSON object")
        return value

    def config(self) -> dict[str, Any]:
        """``config.json``: required, an object."""
        value = self.json("config.json", required=True)
        if not isinstance(value, dict):
            raise ConversionError("'config.json' is not a JSON object")
        return value

    def safetensors_names(self) -> list[str]:
        """The weight files at the top of the folder (a sentence-transformers ``2_Dense``
        module's own weights are not the model's)."""
        return sorted(
            n for n in self.files if n.lower().endswith(".safetensors") and "/" not in n
        )

    def tensors(self) -> dict[str, SourceTensor]:
        """Every tensor of the folder's safetensors files, by name; a name in two files
        is refused."""
        names = self.safetensors_names()
        if not names:
            raise ConversionError("the model folder has no '*.safetensors' weights")
        found: dict[str, SourceTensor] = {}
        for name in names:
            for tensor in read_header(self.files[name], name):
                if tensor.name in found:
                    raise ConversionError(
                        f"tensor '{tensor.name}' is in both '{found[tensor.name].filename}' "
                        f"and '{name}'"
                    )
                found[tensor.name] = tensor
        return found
