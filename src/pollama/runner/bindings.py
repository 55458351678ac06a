"""llama-cpp-python's ctypes bindings, without the rest of its package.

``import llama_cpp.llama_cpp`` normally runs ``llama_cpp/__init__.py`` first, which imports
the high-level ``Llama`` class and with it jinja2, diskcache, sqlite3, multiprocessing and
more: about 10 MiB resident in every worker, none of it used (the worker drives llama.cpp
through the low-level functions only, see ``runner/llama.py``). Memory per loaded model is
a budget we hold ourselves to, so the bindings module is imported on its own: a bare
package module stands in for ``llama_cpp`` while its ``llama_cpp.llama_cpp`` submodule
loads from the same files, and is removed again right after.

What must stay true: the result is the very module a normal import gives (same file, same
loaded shared library), and a later ``import llama_cpp`` anywhere in the process still gets
the real, complete package (its ``__init__`` then reuses the already loaded bindings instead
of loading the library twice).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path


def _load(submodule: str = "llama_cpp") -> types.ModuleType:
    name = f"llama_cpp.{submodule}"
    if name in sys.modules:
        return sys.modules[name]
    if "llama_cpp" in sys.modules:  # the full package is already there: use it
        return importlib.import_module(name)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llama-cpp-python is not installed (pip install llama-cpp-python)")
    bare = types.ModuleType("llama_cpp")
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__spec__ = spec
    bare.__file__ = spec.origin
    bare.__package__ = "llama_cpp"
    sys.modules["llama_cpp"] = bare
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("llama_cpp") is bare:
            del sys.modules["llama_cpp"]


lc = _load()


def load_mtmd() -> types.ModuleType:
    """llama.cpp's multimodal library (``llama_cpp.mtmd_cpp``), loaded the same bare way,
    on first use: only a worker whose model has a projector pays for it. Raises
    ``OSError`` when the engine was built without it (``make install`` builds it)."""
    return _load("mtmd_cpp")


def load_ggml() -> ctypes.CDLL:
    """ggml's library (``libggml``, with ``libggml-base`` under it): the very instance
    ``libllama`` uses, so that its backend registry (devices, loaded backends) is the one
    llama.cpp itself sees (``runner/devices.py``).

    A wheel's library folder holds copies, not links (``libggml.so``, ``libggml.so.0``...),
    and opening another copy by path would load a second ggml with a registry of its own
    (and, on a GPU build, a second initialization of the GPU runtime). So each file of the
    folder is first opened with ``RTLD_NOLOAD``, which only finds a library already loaded:
    the one the dynamic loader chose for ``libllama``. Where the platform has no such flag
    (Windows, which matches modules by name anyway) the library is opened by name."""
    folder = Path(lc._base_path)
    noload = getattr(os, "RTLD_NOLOAD", 0)
    if noload:
        for path in sorted(folder.glob("*ggml.*")):
            try:
                return ctypes.CDLL(str(path), mode=noload | getattr(os, "RTLD_LOCAL", 0))
            except OSError:
                continue
    extensions = _load("_ctypes_extensions")
    lib: ctypes.CDLL = extensions.load_shared_library("ggml", folder)
    return lib


__all__ = ["lc", "load_ggml", "load_mtmd"]
