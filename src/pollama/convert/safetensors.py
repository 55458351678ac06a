"""A bounds-checked reader of safetensors files, on numpy alone (no ``safetensors`` package,
no PyTorch).

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length,
that many bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` plus an
optional ``__metadata__`` of strings), then the tensors' bytes; offsets count from the end of
the header. Nothing in it is executed, unlike a pickled ``.bin``.

What must stay true: every number in a header is checked before anything is allocated from
it (the header's length against :data:`MAX_HEADER_BYTES` and the file's size, each tensor's
element count times its item size against its byte range, each range inside the file, no two
ranges overlapping), so a file that lies about its contents is a :class:`ConversionError`
naming the file, never a huge allocation or a read past its end. Tensor data is read only when
a tensor is converted, one tensor (or one block of its rows) at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pollama.errors import ConversionError

__all__ = ["MAX_HEADER_BYTES", "SourceTensor", "read_header"]

MAX_HEADER_BYTES = 100 << 20
"""The safetensors library's own limit on the JSON header."""

MAX_TENSORS = 1 << 20
MAX_DIMS = 8

# dtype -> (numpy dtype of the stored items, item size)
_DTYPES: dict[str, tuple[str, int]] = {
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "F64": ("<f8", 8),
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "BOOL": ("u1", 1),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a safetensors file: where its bytes are and what they hold."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    """Absolute byte offset of the data in the file."""
    nbytes: int
    filename: str
    """The file's name in the uploaded folder (for messages)."""

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` (the whole tensor by default) as float32, in its own shape.

        Reads exactly the bytes of those rows; a file that shrank since its header was read
        is a ``ConversionError``."""
        if self.dtype not in FLOAT_DTYPES:
            raise ConversionError(
                f"tensor '{self.name}' in '{self.filename}' has dtype {self.dtype}: only F32, "
                "F16, BF16 and F64 weights can be converted"
            )
        stop = self.rows if stop is None else stop
        row_bytes = self.nbytes // self.rows if self.rows else 0
        count = (stop - start) * row_bytes
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * row_bytes)
            data = f.read(count)
        if len(data) != count:
            raise ConversionError(f"'{self.filename}' is shorter than its header says")
        np_dtype, _ = _DTYPES[self.dtype]
        raw = np.frombuffer(data, dtype=np_dtype)
        if self.dtype == "BF16":
            values = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.astype(np.float32)
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        return values.reshape(shape)


def read_header(path: Path, filename: str) -> list[SourceTensor]:
    """The tensors a safetensors file declares, every number in its header checked against
    the file (see the module docstring)."""
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ConversionError(f"'{filename}' is not a safetensors file: it is too short")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise ConversionError(
                f"'{filename}' is not a safetensors file: its header claims {length} bytes"
                + (f" (at most {MAX_HEADER_BYTES})" if length > MAX_HEADER_BYTES else
                   f" and the file has {size}")
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"'{filename}' has a header that is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ConversionError(f"'{filename}' has a header that is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise ConversionError(f"'{filename}' declares {len(header)} tensors, too many")
    base = 8 + length
    tensors = [_tensor(name, entry, path, filename, base, size) for name, entry in header.items()]
    _check_overlaps(tensors, filename)
    return tensors


def _tensor(
    name: object, entry: object, path: Path, filename: str, base: int, size: int
) -> SourceTensor:
    def bad(why: str) -> ConversionError:
        return ConversionError(f"tensor {name!r} in '{filename}' {why}")

    if not isinstance(name, str) or not isinstance(entry, dict):
        raise bad("is not described by an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        raise bad(f"has an unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise bad("has an invalid shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
    ):
        raise bad("has invalid data_offsets")
    begin, end = offsets
    expected = math.prod(shape) * _DTYPES[dtype][1]
    if not 0 <= begin <= end or end - begin != expected:
        raise bad(f"claims {end - begin} bytes for a {dtype} tensor of shape {shape}")
    if base + end > size:
        raise bad(f"ends at byte {base + end}, past the end of the file ({size} bytes)")
    return SourceTensor(name, dtype, tuple(shape), path, base + begin, end - begin, filename)


def _check_overlaps(tensors: list[SourceTensor], filename: str) -> None:
    last_end, last_name = 0, ""
    for t in sorted(tensors, key=lambda t: (t.offset, t.nbytes)):
        if t.nbytes and t.offset < last_end:
            raise ConversionError(
                f"tensors '{last_name}' and '{t.name}' in '{filename}' overlap"
            )
        if t.nbytes:
            last_end, last_name = t.offset + t.nbytes, t.name
