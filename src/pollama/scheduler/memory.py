"""How much memory a model needs, how much the machine has, and the message when it won't fit.

"Memory" is system RAM for what stays on the CPU, and an accelerator's own memory for the
layers offloaded to it (``scheduler/placement.py`` decides how many). The worker maps the
GGUF weights and allocates the KV cache and llama.cpp's compute buffers; :class:`Footprint`
splits all of it by layer, so that the host part of any offload is known. The scheduler
compares :func:`estimate_memory` (the host part) of the model about to load with
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
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pollama.errors import GGUFError, InsufficientMemory
from pollama.format import human_bytes
from pollama.gguf import GGUFInfo
from pollama.runner.base import MAX_UBATCH, LoadSpec, kv_bytes_per_element
from pollama.store.gguf_cache import gguf_info

__all__ = [
    "Footprint",
    "MemoryInfo",
    "MemoryProbe",
    "compute_buffer_bytes",
    "estimate_memory",
    "footprint",
    "insufficient_memory",
    "kv_cache_bytes",
    "kv_cache_bytes_per_layer",
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


def _file_bytes(paths: tuple[str, ...]) -> int:
    """The size of files loaded beside the weights (LoRA adapters, the projector), which
    llama.cpp reads into memory whole (an image's encode buffers come on top, counted by the
    worker after it loads); a file that is gone counts 0."""
    total = 0
    for path in paths:
        try:
            total += os.stat(path).st_size
        except OSError:
            continue
    return total


def kv_cache_bytes_per_layer(info: GGUFInfo, spec: LoadSpec) -> list[int]:
    """:func:`kv_cache_bytes` split over the repeating layers in proportion to each layer's
    KV heads (a layer without attention holds none). The parts sum exactly to the total, so
    the CPU-only estimate is the same whichever way it is added up."""
    n_layer = info.block_count or 0
    if n_layer <= 0:
        return []
    n_head = _as_int(_arch_value(info, "attention.head_count")) or 0
    heads = _kv_heads_per_layer(info, n_layer, n_head)
    total, all_heads = kv_cache_bytes(info, spec), sum(heads)
    if all_heads <= 0:
        return [0] * n_layer
    parts = [total * h // all_heads for h in heads]
    parts[max(range(n_layer), key=lambda i: heads[i])] += total - sum(parts)
    return parts


_BLOCK = re.compile(r"blk\.(\d+)\.")
_HOST_GRAPH_EMBD_ROWS = 4  # f32 bytes per element of the input rows the CPU still computes


@dataclass(frozen=True)
class Footprint:
    """A model's memory, split the way llama.cpp places it (``n_gpu_layers`` = k offloads the
    last k repeating layers, and k = ``block_count + 1`` the output layer too; the input
    embedding always stays on the CPU).

    ``layers`` is each repeating layer's weights plus its KV cache; ``output_host`` the output
    tensors' bytes in the file (0 when tied to the embedding), ``output_device`` what the
    output takes on a device (a tied output is a copy of the embedding there); ``host_rest``
    everything else of the file (embedding, header, stray tensors) plus LoRA adapters, which
    stay on the host; ``graph`` the compute buffers (:func:`compute_buffer_bytes`), on each
    device that holds a layer; ``host_graph`` what the host keeps of them when layers are
    offloaded; ``projector`` the projector files. What must stay true: with nothing offloaded
    :meth:`host_bytes` is the whole estimate, ``file size + side files + KV + compute``.
    """

    layers: tuple[int, ...]
    output_host: int
    output_device: int
    host_rest: int
    graph: int
    host_graph: int
    projector: int

    @property
    def n_layers(self) -> int:
        """The layers ``num_gpu`` counts: the repeating ones and the output layer."""
        return len(self.layers) + 1 if self.layers else 0

    def offloaded(self, gpu_layers: int) -> int:
        """``gpu_layers`` (-1: all) as the number of layers really offloaded."""
        return self.n_layers if gpu_layers < 0 else min(gpu_layers, self.n_layers)

    def host_bytes(self, gpu_layers: int) -> int:
        """What stays in system memory when ``gpu_layers`` layers are offloaded."""
        k = self.offloaded(gpu_layers)
        blocks = len(self.layers) - min(k, len(self.layers))
        host = self.host_rest + sum(self.layers[:blocks])
        if k <= len(self.layers):
            host += self.output_host
        if k == 0:
            return host + self.graph + self.projector
        return host + self.host_graph


def _layer_weights(info: GGUFInfo, n_layer: int) -> tuple[list[int], int, int, int]:
    """Each repeating layer's tensor bytes, the output's bytes in the file and on a device,
    and the file's remaining bytes. A GGUF without a tensor table (or whose tensors name no
    block) is split evenly by file size over its blocks."""
    blocks = [0] * n_layer
    sizes = {t.name: t.nbytes for t in info.tensors}
    for tensor in info.tensors:
        match = _BLOCK.match(tensor.name)
        if match and int(match.group(1)) < n_layer:
            blocks[int(match.group(1))] += tensor.nbytes
    if not any(blocks):
        share = info.file_size // n_layer if n_layer else 0
        return [share] * n_layer, 0, 0, info.file_size - share * n_layer
    norm = sizes.get("output_norm.weight", 0) + sizes.get("output_norm.bias", 0)
    output = sizes.get("output.weight")
    output_host = norm + (output or 0)
    output_device = norm + (output if output is not None else sizes.get("token_embd.weight", 0))
    rest = max(info.file_size - sum(blocks) - output_host, 0)
    return blocks, output_host, output_device, rest


def footprint(info: GGUFInfo, spec: LoadSpec) -> Footprint:
    """The model's :class:`Footprint` for this spec (context, slots, batch, KV type)."""
    n_layer = max(info.block_count or 0, 0)
    weights, output_host, output_device, rest = _layer_weights(info, n_layer)
    kv = kv_cache_bytes_per_layer(info, spec)
    tokens = _context_tokens(spec)
    n_batch = max(1, min(spec.num_batch, tokens, MAX_UBATCH))
    host_graph = _HOST_GRAPH_EMBD_ROWS * n_batch * (info.embedding_length or 0) + _COMPUTE_SLACK
    adapters = _file_bytes(spec.adapters)
    return Footprint(
        layers=tuple(w + c for w, c in zip(weights, kv, strict=True)),
        output_host=output_host,
        output_device=output_device,
        host_rest=rest + adapters + draft_model_bytes(spec),
        graph=compute_buffer_bytes(info, spec),
        host_graph=host_graph,
        projector=_file_bytes(spec.projectors),
    )


def draft_model_bytes(spec: LoadSpec) -> int:
    """What a draft model (``spec.draft_path``) adds, all on the host (the worker keeps it
    on the CPU): its file, its KV cache over the same slots (``runner/drafter.py`` keeps
    :data:`DRAFT_MODEL_MAX` more cells a slot) and its compute buffers; 0 without one, or
    with a file that is gone (the load will say so)."""
    if not spec.draft_path:
        return 0
    from pollama.runner.drafter import DRAFT_MODEL_MAX

    path = Path(spec.draft_path)
    try:
        info = gguf_info(path, display_name=path.name)
    except (OSError, GGUFError):
        return 0
    draft_spec = replace(spec, num_ctx=spec.num_ctx + DRAFT_MODEL_MAX, kv_cache_type="f16",
                         draft_path="", gpu_layers=0)  # fmt: skip
    return path.stat().st_size + kv_cache_bytes(info, draft_spec) + compute_buffer_bytes(
        info, draft_spec)


def estimate_memory(info: GGUFInfo, spec: LoadSpec) -> int:
    """Bytes of system memory a worker will need for this model and spec: with nothing
    offloaded (``spec.gpu_layers`` 0) the weights (the GGUF file size, plus LoRA adapters and
    the projector), the KV cache (:func:`kv_cache_bytes`) and the compute buffers
    (:func:`compute_buffer_bytes`); with layers offloaded, only what stays on the host
    (:meth:`Footprint.host_bytes`). The device parts are ``placement.plan_offload``'s."""
    return footprint(info, spec).host_bytes(spec.gpu_layers)


def insufficient_memory(name: str, required: int, available: int) -> InsufficientMemory:
    """The error for a model that does not fit even after every idle model is unloaded:
    both numbers, and what the user can change."""
    return InsufficientMemory(
        f"model {name!r} requires more system memory ({human_bytes(required)}) than is "
        f"available ({human_bytes(max(available, 0))}); try a smaller context (num_ctx), "
        "fewer parallel requests (OLLAMA_NUM_PARALLEL), a smaller quantization, or unload "
        "other models (ollama stop)"
    )
