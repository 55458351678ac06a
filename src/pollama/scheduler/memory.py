"""How much memory a model needs, how much the machine has, and the message when it won't fit.

pollama runs on the CPU, so "memory" is system RAM: the worker maps the GGUF weights and
allocates the KV cache and llama.cpp's compute buffers in its own address space. The
scheduler compares :func:`estimate_memory` of the model about to load with
:attr:`MemoryInfo.available` (plus what evicting idle models would give back) before it
starts a worker, so that an oversized load fails with a clear message instead of the OOM
killer ending a worker, or the server, half-way through.

The estimate is deliberately on the high side (it assumes every weight page is resident and
the worst-case compute graph); once a worker has loaded it reports its own figure
(``RunnerInfo.memory_bytes``), which is what ``/api/ps`` shows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollama.errors import InsufficientMemory
from pollama.format import human_bytes
from pollama.gguf import GGUFInfo
from pollama.runner.base import MAX_UBATCH, LoadSpec, kv_bytes_per_element

__all__ = [
    "MemoryInfo",
    "MemoryProbe",
    "compute_buffer_bytes",
    "estimate_memory",
    "insufficient_memory",
    "kv_cache_bytes",
    "system_memory",
]

_COMPUTE_SLACK = 16 << 20  # graph metadata, small tensors, allocator alignment


@dataclass(frozen=True)
class MemoryInfo:
    """System memory in bytes: ``available`` is what a new process may still use."""

    total: int
    available: int


MemoryProbe = Callable[[], MemoryInfo]


def _read_meminfo(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in path.read_text(encoding="ascii", errors="replace").splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            scale = 1024 if len(fields) > 1 and fields[1].lower() == "kb" else 1
            values[name.strip()] = int(fields[0]) * scale
    return values


def _cgroup_limit(root: Path) -> tuple[int, int] | None:
    """(limit, usage) of this process's cgroup v2 when it has a memory limit, else None."""
    try:
        limit_text = (root / "memory.max").read_text(encoding="ascii").strip()
        usage_text = (root / "memory.current").read_text(encoding="ascii").strip()
    except OSError:
        return None
    if not limit_text.isdigit() or not usage_text.isdigit():
        return None  # "max": no limit
    return int(limit_text), int(usage_text)


def system_memory(
    meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")
) -> MemoryInfo:
    """Total and available RAM: ``MemAvailable`` from ``/proc/meminfo`` (free memory plus
    reclaimable page cache, the kernel's own estimate), capped by a cgroup v2 memory limit
    when the server runs in a container. Off Linux, ``sysconf`` free pages; when nothing can
    be read the total counts as available (the check then never refuses a load)."""
    try:
        info = _read_meminfo(meminfo)
        total = info["MemTotal"]
        available = info.get("MemAvailable", info.get("MemFree", total))
    except (OSError, KeyError, ValueError):
        total, available = _sysconf_memory()
    limit = _cgroup_limit(cgroup)
    if limit is not None:
        cap, used = limit
        total = min(total, cap) if total else cap
        available = min(available, max(cap - used, 0))
    return MemoryInfo(total=total, available=available)


def _sysconf_memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return 0, 2**62
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError):
        free = total
    return total, free


# -- the estimate ----------------------------------------------------------------------------


def _arch_value(info: GGUFInfo, suffix: str) -> Any:
    arch = info.architecture
    return info.kv.get(f"{arch}.{suffix}") if arch else None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list):  # per-layer arrays: the widest layer bounds the buffers
        numbers = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        return max(numbers) if numbers else None
    return None


def _kv_heads_per_layer(info: GGUFInfo, n_layer: int, n_head: int) -> list[int]:
    """KV heads of every layer: ``head_count_kv`` may be one number or a per-layer array
    (models that mix attention and other layers have zeros there); absent means MHA."""
    value = _arch_value(info, "attention.head_count_kv")
    if isinstance(value, list):
        heads = [v if isinstance(v, int) and not isinstance(v, bool) else 0 for v in value]
        return (heads + [heads[-1] if heads else n_head] * n_layer)[:n_layer]
    kv = _as_int(value)
    return [n_head if kv is None else kv] * n_layer


def _kv_element_bytes(spec: LoadSpec) -> float:
    kind = (spec.kv_cache_type or "f16").lower()
    if spec.flash_attention is False and kind not in ("f16", "f32", "bf16"):
        return 2.0  # llama.cpp needs flash attention for a quantized cache; Ollama falls back
    return kv_bytes_per_element(kind)


def _context_tokens(spec: LoadSpec) -> int:
    return max(spec.num_ctx, 1) * max(spec.num_parallel, 1)


def kv_cache_bytes(info: GGUFInfo, spec: LoadSpec) -> int:
    """K and V for every layer: ``n_head_kv × (key_length + value_length) × tokens × bytes``
    summed over layers, with ``tokens = num_ctx × num_parallel`` (one context holds every
    slot). For the usual ``key_length == value_length == head_dim`` this is Ollama's
    ``2 × n_layer × n_head_kv × head_dim × tokens × bytes``. Missing metadata counts as 0."""
    n_layer = info.block_count or 0
    n_embd = info.embedding_length or 0
    n_head = _as_int(_arch_value(info, "attention.head_count")) or 0
    if n_layer <= 0:
        return 0
    key_length = _as_int(_arch_value(info, "attention.key_length"))
    if key_length is None:
        key_length = n_embd // n_head if n_head else 0
    value_length = _as_int(_arch_value(info, "attention.value_length")) or key_length
    heads = sum(_kv_heads_per_layer(info, n_layer, n_head))
    elements = heads * (key_length + value_length) * _context_tokens(spec)
    return math.ceil(elements * _kv_element_bytes(spec))


def compute_buffer_bytes(info: GGUFInfo, spec: LoadSpec) -> int:
    """llama.cpp's worst-case compute graph for one physical pass (``n_ubatch``: ``num_batch``
    up to :data:`~pollama.runner.base.MAX_UBATCH`), f32: logits for every row of the pass,
    the residual and feed-forward activations, and (without flash attention) one layer's
    attention scores over the whole context."""
    tokens = _context_tokens(spec)
    n_batch = max(1, min(spec.num_batch, tokens, MAX_UBATCH))
    n_embd = info.embedding_length or 0
    n_ff = _as_int(_arch_value(info, "feed_forward_length")) or 4 * n_embd
    n_head = _as_int(_arch_value(info, "attention.head_count")) or 0
    n_vocab = info.vocab_size or _as_int(_arch_value(info, "vocab_size")) or 0
    logits = n_batch * n_vocab
    activations = n_batch * (4 * n_embd + 2 * n_ff)
    scores = 0 if spec.flash_attention else n_batch * n_head * tokens
    return 4 * (logits + activations + scores) + _COMPUTE_SLACK


def _adapter_bytes(spec: LoadSpec) -> int:
    total = 0
    for path in spec.adapters:
        try:
            total += os.stat(path).st_size
        except OSError:
            continue
    return total


def estimate_memory(info: GGUFInfo, spec: LoadSpec) -> int:
    """Bytes a worker will need for this model and spec: the weights (the GGUF file size,
    plus LoRA adapters), the KV cache (:func:`kv_cache_bytes`) and the compute buffers
    (:func:`compute_buffer_bytes`)."""
    weights = info.file_size + _adapter_bytes(spec)
    return weights + kv_cache_bytes(info, spec) + compute_buffer_bytes(info, spec)


def insufficient_memory(name: str, required: int, available: int) -> InsufficientMemory:
    """The error for a model that does not fit even after every idle model is unloaded:
    both numbers, and what the user can change."""
    return InsufficientMemory(
        f"model {name!r} requires more system memory ({human_bytes(required)}) than is "
        f"available ({human_bytes(max(available, 0))}); try a smaller context (num_ctx), "
        "fewer parallel requests (OLLAMA_NUM_PARALLEL), a smaller quantization, or unload "
        "other models (ollama stop)"
    )
