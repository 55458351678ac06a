"""Re-quantize a GGUF file with llama.cpp, as a child process.

    python -m pollama.runner.quantize SRC DST TYPE [--threads N] [--verbose]

This is the only place that calls ``llama_model_quantize`` (Ollama runs ``llama-quantize``
the same way). It runs in its own process, started by ``pollama.store.quantize.quantize_file``,
so a llama.cpp abort on a bad file costs a failed request, never the server, and the server
process never imports ``llama_cpp``.

Contract with the parent: exit status 0 means DST is complete; anything else means failure,
and the last line written to stderr is a one-line reason (llama.cpp's own log is suppressed
unless ``--verbose``, but its error lines are folded into that reason). TYPE is a file type
name such as ``Q4_K_M``; the parent has already validated it and the source file.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from collections.abc import Sequence

import llama_cpp

from pollama.gguf import FILE_TYPES

_FTYPES = {name: ftype for ftype, name in FILE_TYPES.items()}
# ggml_log_level in the llama.cpp that llama-cpp-python 0.3.36 bundles: NONE 0, DEBUG 1,
# INFO 2, WARN 3, ERROR 4, CONT 5 (a continuation of the previous message).
_GGML_LOG_ERROR = 4
_GGML_LOG_CONT = 5
_FAILED = "failed to quantize: "


class QuantizeFailed(Exception):
    """llama.cpp returned an error; the message is its reason, on one line."""


class _LogCapture:
    """Keeps llama.cpp's error lines (and echoes everything when verbose).

    The ctypes callback object must outlive every llama.cpp call, so it is held here.
    """

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.errors: list[str] = []
        self._last_level = 0
        self.callback = llama_cpp.llama_log_callback(self._log)
        llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))

    def _log(self, level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace")
        if level != _GGML_LOG_CONT:
            self._last_level = level
        if self.verbose:
            sys.stderr.write(message)
        if self._last_level == _GGML_LOG_ERROR and message.strip():
            self.errors.append(message.strip())


def quantize(
    src: str, dst: str, type_name: str, *, threads: int = 0, verbose: bool = False
) -> None:
    """Write DST as SRC quantized to ``type_name``; raise ``QuantizeFailed`` on failure."""
    ftype = _FTYPES.get(type_name.upper())
    if ftype is None:
        raise QuantizeFailed(f"unknown file type {type_name}")
    log = _LogCapture(verbose)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if status != 0:
        reason = log.errors[-1] if log.errors else f"llama_model_quantize returned {status}"
        raise QuantizeFailed(reason.partition(_FAILED)[2] or reason)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pollama.runner.quantize", description="Re-quantize a GGUF model."
    )
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("type", help="target file type, e.g. Q4_K_M, Q8_0, F16")
    parser.add_argument("--threads", type=int, default=0, help="0: all hardware threads")
    parser.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    args = parser.parse_args(argv)
    try:
        quantize(args.src, args.dst, args.type, threads=args.threads, verbose=args.verbose)
    except QuantizeFailed as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
