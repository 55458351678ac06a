"""Re-quantization for ``create --quantize``: type names, checks, and the child process.

The work is done by ``python -m pollama.runner.quantize`` (llama.cpp's quantizer) in a child
process; this module never imports ``llama_cpp``. It validates what Ollama validates, with
Ollama's messages (``fs/ggml/type.go ParseFileType``, ``server/create.go``), reports progress
while the child writes, and turns a failed child into ``InternalError``.

What must stay true: a destination file exists after ``quantize_file`` only if it returned
normally; the child never outlives the call (a callback that raises, or an interrupt, kills
it); no server path appears in an error message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from pollama.errors import InternalError, UnsupportedQuantization
from pollama.gguf import GGML_TYPES, read_gguf

__all__ = [
    "OLLAMA_QUANTIZATION_TYPES",
    "QUANTIZATION_TYPES",
    "QUANTIZABLE_SOURCE_TYPES",
    "normalize_quantization",
    "quantize_file",
]

OLLAMA_QUANTIZATION_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_K_S", "Q4_K_M")
"""The targets Ollama accepts (``Q4_K`` is an alias of ``Q4_K_M``)."""

QUANTIZATION_TYPES = OLLAMA_QUANTIZATION_TYPES + (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q5_K_S", "Q5_K_M",
    "Q6_K",
)  # fmt: skip
"""Every target pollama accepts: Ollama's, plus the other classic llama.cpp types."""

QUANTIZABLE_SOURCE_TYPES = ("F16", "BF16", "F32")

_ALIASES = {"Q4_K": "Q4_K_M"}
_UNSUPPORTED = (
    "unsupported quantization type {} - supported types are F32, F16, Q4_K_S, Q4_K_M, Q8_0"
)
_POLL_SECONDS = 0.2
_STDERR_TAIL = 4096

# The main tensor type of each file type, for the progress estimate only.
_TARGET_TENSOR_TYPE = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q4_0",
    "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q2_K": "Q2_K", "Q3_K_S": "Q3_K",
    "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
}  # fmt: skip
_TYPE_BY_NAME = {name: (block, size) for name, block, size in GGML_TYPES.values()}


def normalize_quantization(name: str) -> str:
    """The canonical target name for ``name`` (case-insensitive; ``Q4_K`` means ``Q4_K_M``).

    Raises ``UnsupportedQuantization`` with Ollama's message for anything else.
    """
    upper = name.strip().upper()
    upper = _ALIASES.get(upper, upper)
    if upper not in QUANTIZATION_TYPES:
        raise UnsupportedQuantization(_UNSUPPORTED.format(name.strip()))
    return upper


def quantize_file(
    src: Path,
    dst: Path,
    type_name: str,
    on_progress: Callable[[int, int], None] | None = None,
    *,
    source_file_type: str | None = None,
    threads: int = 0,
) -> None:
    """Write ``dst`` as ``src`` re-quantized to ``type_name``.

    ``source_file_type`` is the source's file type name when the caller has already read it
    with ``read_gguf`` (which also validated the file); otherwise the source is read and
    validated here. Only F16, BF16 and F32 sources are accepted, as in Ollama.

    ``on_progress(done, total)`` is called every ~0.2 s while the child writes, in units of
    *source* bytes (``total`` is the source size), the way Ollama reports quantization
    progress; the last call is ``(total, total)``. ``threads`` 0 means all cores.
    """
    target = normalize_quantization(type_name)
    src, dst = Path(src), Path(dst)
    if source_file_type is None:
        source_file_type = read_gguf(src, display_name=src.name).file_type
    if source_file_type not in QUANTIZABLE_SOURCE_TYPES:
        raise UnsupportedQuantization("quantization is only supported for F16, BF16 and F32 models")
    try:
        total = src.stat().st_size
    except OSError as e:
        raise InternalError(f"cannot read the source model: {e.strerror or e}") from None
    expected = int(total * _bytes_per_weight(target) / _bytes_per_weight(source_file_type))
    command = [
        sys.executable, "-m", "pollama.runner.quantize", str(src), str(dst), target,
        "--threads", str(threads),
    ]  # fmt: skip
    ok = False
    try:
        with tempfile.TemporaryFile() as stderr:
            returncode = _run(command, stderr, dst, expected, total, on_progress)
            if returncode != 0:
                raise InternalError(_failure(returncode, stderr, target, src, dst))
        if on_progress is not None:
            on_progress(total, total)
        ok = True
    finally:
        if not ok:
            dst.unlink(missing_ok=True)


def _run(
    command: list[str],
    stderr: IO[bytes],
    dst: Path,
    expected: int,
    total: int,
    on_progress: Callable[[int, int], None] | None,
) -> int:
    """Run the child to completion, polling ``dst``'s size for progress; never leak it."""
    try:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
    except OSError as e:
        raise InternalError(f"cannot start the quantizer: {e.strerror or e}") from None
    try:
        last = -1
        while True:
            try:
                return proc.wait(timeout=_POLL_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            if on_progress is None:
                continue
            try:
                written = dst.stat().st_size
            except OSError:
                written = 0
            done = min(total * written // max(expected, 1), total * 99 // 100)
            if done != last:
                last = done
                on_progress(done, total)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _failure(returncode: int, stderr: IO[bytes], target: str, src: Path, dst: Path) -> str:
    """A one-line reason from the child's last stderr line, with paths replaced by names."""
    size = stderr.seek(0, os.SEEK_END)
    stderr.seek(max(0, size - _STDERR_TAIL))
    tail = stderr.read().decode("utf-8", errors="replace")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    reason = lines[-1] if lines else ""
    reason = reason.removeprefix("error: ")
    for path, name in ((src, "the source model"), (dst, "the output file")):
        reason = reason.replace(str(path), name)
    if returncode < 0:
        reason = f"the quantizer was killed by signal {-returncode}" + (
            f" ({reason})" if reason else ""
        )
    return f"quantizing to {target} failed: {reason or f'exit status {returncode}'}"


def _bytes_per_weight(type_name: str) -> float:
    """Bytes per weight of a file type's main tensor type (progress estimates only)."""
    block, size = _TYPE_BY_NAME[_TARGET_TENSOR_TYPE[type_name]]
    return size / block
