"""A small cache of parsed GGUF headers, keyed by path, size and mtime.

``show``, ``list`` and ``create`` read the same few model files over and over; a blob's
content never changes under its name, and the mtime/size in the key covers files that are
not blobs (a quantization output).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pollama.gguf import GGUFInfo, read_gguf


def gguf_info(path: Path, *, display_name: str) -> GGUFInfo:
    """Parse (or recall) a GGUF header; errors name ``display_name``, never the path."""
    st = os.stat(path)
    return _cached(str(path), st.st_size, st.st_mtime_ns, display_name)


@lru_cache(maxsize=64)
def _cached(path: str, size: int, mtime_ns: int, display_name: str) -> GGUFInfo:
    return read_gguf(path, display_name=display_name)
