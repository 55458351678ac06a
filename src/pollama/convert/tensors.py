"""From Hugging Face tensor names and shapes to the GGUF tensors llama.cpp loads.

Each architecture says how a name maps (through ``gguf.get_tensor_name_map``, llama.cpp's
own table, plus its renames) and what shape every GGUF tensor must have, worked out from
``config.json``. :func:`map_tensors` checks the folder against that before anything is
written: a tensor it cannot place, two tensors for one place, a shape that differs from the
configuration, a required tensor that is missing, a weight that is not floating point:
each is a ``ConversionError`` naming the tensor, where llama.cpp would refuse the file at
load time (or worse, load it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pollama.convert.safetensors import FLOAT_DTYPES, SourceTensor
from pollama.convert.writer import OutTensor, out_type
from pollama.errors import ConversionError

__all__ = ["Layout", "hparam", "map_tensors", "weights_type"]


def hparam(
    config: dict[str, Any], *keys: str, default: Any = None, kind: type = int
) -> Any:
    """The first of ``keys`` that ``config.json`` has (``default`` when none; no default:
    required), checked to be a positive number of ``kind``."""
    for key in keys:
        if key in config and config[key] is not None:
            value = config[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) or not value > 0:
                raise ConversionError(f"'config.json' has an invalid {key}: {value!r}")
            if kind is int and value > 1 << 31:
                raise ConversionError(f"'config.json' has an invalid {key}: {value!r}")
            return value
    if default is None:
        raise ConversionError(f"'config.json' has no {keys[0]}")
    return default


@dataclass
class Layout:
    """What an architecture expects: each GGUF tensor's source shape, which may be absent,
    which are cut to fewer rows, which are rearranged (by groups of how many rows)."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    optional: set[str] = field(default_factory=set)
    rows: dict[str, int] = field(default_factory=dict)
    transforms: dict[str, tuple[Callable[[np.ndarray], np.ndarray], int]] = field(
        default_factory=dict
    )

    def add(self, name: str, *shape: int, optional: bool = False) -> None:
        self.shapes[name] = tuple(shape)
        if optional:
            self.optional.add(name)


def weights_type(sources: Mapping[str, SourceTensor]) -> str:
    """BF16 when the model's weights are BF16, else F16 (llama.cpp's ``--outtype auto``)."""
    two_d = [t for t in sources.values() if len(t.shape) >= 2 and t.dtype in FLOAT_DTYPES]
    return "BF16" if two_d and all(t.dtype == "BF16" for t in two_d) else "F16"


def map_tensors(
    sources: Mapping[str, SourceTensor],
    rename: Callable[[str], str | None],
    layout: Layout,
) -> list[OutTensor]:
    """The output tensors, in the order their bytes lie in the files (see the module
    docstring for what is checked). ``rename`` returns the GGUF name, ``None`` to skip a
    tensor llama.cpp does not use, or raises."""
    weights = weights_type(sources)
    placed: dict[str, SourceTensor] = {}
    unknown: list[str] = []
    for name, tensor in sources.items():
        new = rename(name)
        if new is None:
            continue
        if new not in layout.shapes:
            unknown.append(name)
            continue
        if new in placed:
            raise ConversionError(f"tensors '{placed[new].name}' and '{name}' both map to '{new}'")
        _check(tensor, new, layout.shapes[new])
        placed[new] = tensor
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ConversionError(
            f"the model has tensors this converter does not know: "
            f"{', '.join(repr(n) for n in sorted(unknown)[:3])}{more}"
        )
    missing = sorted(set(layout.shapes) - set(placed) - layout.optional)
    if missing:
        raise ConversionError(f"the model's weights have no tensor for '{missing[0]}'")
    out = []
    for new, tensor in sorted(placed.items(), key=lambda i: (i[1].filename, i[1].offset)):
        shape = tensor.shape
        if new in layout.rows:
            shape = (layout.rows[new], *shape[1:])
        kind = out_type(new, len(shape), weights)
        transform, group = layout.transforms.get(new, (None, 1))
        out.append(OutTensor(new, shape, kind, tensor, transform, group))
    return out


def _check(tensor: SourceTensor, new: str, shape: tuple[int, ...]) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ConversionError(
            f"tensor '{tensor.name}' in '{tensor.filename}' is {tensor.dtype}, not a float type"
        )
    if tensor.shape != shape:
        raise ConversionError(
            f"tensor '{tensor.name}' in '{tensor.filename}' has shape {list(tensor.shape)}, "
            f"but config.json makes '{new}' {list(shape)}"
        )
