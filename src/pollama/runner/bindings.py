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

import importlib
import importlib.util
import sys
import types


def _load() -> types.ModuleType:
    if "llama_cpp.llama_cpp" in sys.modules:
        return sys.modules["llama_cpp.llama_cpp"]
    if "llama_cpp" in sys.modules:  # the full package is already there: use it
        return importlib.import_module("llama_cpp.llama_cpp")
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
        return importlib.import_module("llama_cpp.llama_cpp")
    finally:
        if sys.modules.get("llama_cpp") is bare:
            del sys.modules["llama_cpp"]


lc = _load()

__all__ = ["lc"]
