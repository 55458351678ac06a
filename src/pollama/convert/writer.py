"""A conversion plan, and the GGUF file it becomes, written one tensor block at a time.

A :class:`ConvertPlan` is everything checked: the metadata, and for each output tensor its
GGUF name, shape and type and where its values come from. :func:`write_gguf` streams it out
with ``gguf.GGUFWriter`` (header, metadata, tensor infos, then the data), converting each
tensor's rows in blocks of at most :data:`BLOCK_ELEMENTS`, so memory stays bounded by one
block whatever the model's size (a tensor whose rows are rearranged, such as a llama query
projection, is cut at whole groups of rows: its heads).

Types follow llama.cpp's converter (``prepare_tensors`` with ``--outtype auto``): 1-D
tensors, norms, biases, position and token-type embeddings in F32; the other weights in
F16, or BF16 when the model's weights are BF16 (the highest-fidelity 16-bit type).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import gguf
import numpy as np

from pollama.convert.safetensors import SourceTensor

__all__ = ["BLOCK_ELEMENTS", "ConvertPlan", "OutTensor", "out_type", "write_gguf"]

BLOCK_ELEMENTS = 1 << 24

FILE_TYPES = {"F32": 0, "F16": 1, "BF16": 32}  # general.file_type (LlamaFileType)
_GGML = {
    "F32": (gguf.GGMLQuantizationType.F32, np.dtype(np.float32)),
    "F16": (gguf.GGMLQuantizationType.F16, np.dtype(np.float16)),
    "BF16": (gguf.GGMLQuantizationType.BF16, np.dtype(np.uint16)),
}
_ALWAYS_F32 = ("position_embd.weight", "token_types.weight", "rope_freqs.weight")


def out_type(name: str, ndim: int, weights: str) -> str:
    """The GGUF type of an output tensor (see the module docstring); ``weights`` is F16 or
    BF16, the model's 16-bit type."""
    if ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32"
    if name in _ALWAYS_F32:
        return "F32"
    return weights


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its values are rows ``0:shape[0]`` of ``source`` (all of
    them unless the output is shorter), each block of whole ``group``s of rows passed
    through ``transform`` when there is one, or ``data`` for a tensor the converter makes
    itself."""

    name: str
    shape: tuple[int, ...]
    type: str
    source: SourceTensor | None = None
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    group: int = 1
    data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _GGML[self.type][1].itemsize


@dataclass
class ConvertPlan:
    architecture: str
    kv: list[tuple[str, Any]]
    tensors: list[OutTensor] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_type(self) -> int:
        """``general.file_type``: the type of the weights (BF16, F16, else F32)."""
        types = {t.type for t in self.tensors}
        return FILE_TYPES[next((t for t in ("BF16", "F16") if t in types), "F32")]


def _cast(values: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == "F32":
        return values.astype(np.float32, copy=False)
    if type_name == "F16":
        return values.astype(np.float16)
    # BF16, rounded to nearest even; NaN stays NaN
    bits = values.astype(np.float32, copy=False).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


class _Blocks:
    """A tensor as ``GGUFWriter.write_tensor_data`` takes it (``nbytes``, ``tofile``), whose
    values are computed block by block as it is written."""

    def __init__(self, tensor: OutTensor, report: Callable[[int], None]) -> None:
        self.tensor = tensor
        self.nbytes = tensor.nbytes
        self._report = report

    def tofile(self, fout: IO[bytes]) -> None:
        t = self.tensor
        if t.data is not None:
            self._write(fout, t.data)
            return
        assert t.source is not None
        rows = t.shape[0] if t.shape else 1
        per_row = max(1, math.prod(t.shape[1:]))
        step = max(t.group, BLOCK_ELEMENTS // per_row // t.group * t.group)
        for start in range(0, rows, step):
            block = t.source.read(start, min(rows, start + step))
            self._write(fout, t.transform(block) if t.transform is not None else block)

    def _write(self, fout: IO[bytes], values: np.ndarray) -> None:
        block = _cast(values, self.tensor.type)
        fout.write(block.tobytes())
        self._report(block.nbytes)


def _add(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    """Metadata typed as llama.cpp reads it: ints as uint32, floats as float32, lists as
    arrays of their items' type (token types int32, scores float32, strings)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list) and value:
        writer.add_array(key, value)
    else:
        raise TypeError(f"cannot write {key}={value!r}")


def write_gguf(plan: ConvertPlan, dest: Path) -> Iterator[tuple[int, int]]:
    """Write the plan to ``dest``, yielding ``(done, total)`` output bytes after each
    tensor. Closing the iterator early stops the writing (the caller removes ``dest``)."""
    total = plan.output_bytes
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n

    writer = gguf.GGUFWriter(path=None, arch=plan.architecture)
    try:
        _add(writer, "general.file_type", plan.file_type)
        for key, value in plan.kv:
            _add(writer, key, value)
        for t in plan.tensors:
            ggml_type, np_dtype = _GGML[t.type]
            writer.add_tensor_info(t.name, t.shape, np_dtype, t.nbytes, raw_dtype=ggml_type)
        writer.write_header_to_file(path=dest)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan.tensors:
            writer.write_tensor_data(_Blocks(t, report))  # type: ignore[arg-type]
            yield done, total
    finally:
        writer.close()
