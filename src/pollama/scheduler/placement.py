"""Where a model's layers go: how many llama.cpp offloads to the accelerators, and to which.

:func:`plan_offload` follows Ollama's rules (``llm/memory.go``, ``server/sched.go``):

* Each accelerator offers its free memory less ``OLLAMA_GPU_OVERHEAD`` and a fixed reserve
  (:data:`DEVICE_RESERVE`, the driver's context and allocator slack). A device that takes a
  layer also takes the compute buffers; the first one that takes a layer takes the projector.
* ``num_gpu`` unset or -1 offloads as many layers as fit; 0 none; N exactly N (at most the
  model's blocks + 1: Ollama counts the output layer), fitting or not: the user asked.
* llama.cpp offloads the *last* layers, and the output layer only once every block is
  offloaded, so the host keeps the first layers and the input embedding.
* Several accelerators: the model goes on the fewest that hold all of it, those with the most
  free memory first; when none does (or with ``OLLAMA_SCHED_SPREAD``) over all of them. Layers
  go round-robin over the chosen devices as long as each has room (Ollama's fill), and
  ``tensor_split`` says how many each took (llama.cpp's device order; a zero keeps a device
  out). ``main_gpu`` set puts everything on that one device.
* No accelerator (only the CPU device, or none reported), or integrated GPUs without
  ``OLLAMA_IGPU_ENABLE``: nothing is offloaded and the spec is the CPU one, unchanged.
* RPC servers' devices (``OLLAMA_RPC_SERVERS``, ``runner/rpc.py``) or a preset's
  ``tensor_split``: the layers go over every device in proportion to its room (a machine
  without a local accelerator counts its CPU, by its free memory, as one of them: the CPU
  keeps the first layers), or in the preset's shares, with ``num_gpu`` layers offloaded
  (all by default); llama.cpp's own rule, made explicit so that the estimate per device is
  the split it loads (README.md#rpc).

What must stay true: the plan depends only on the model, the spec and the devices passed in;
a plan with 0 layers leaves ``gpu_layers``, ``main_gpu`` and ``tensor_split`` at their
defaults; and the per-device and host bytes always add up to the CPU-only estimate plus the
copies a device needs (compute buffers on each device, a tied output's copy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pollama.errors import InvalidOption
from pollama.format import human_bytes
from pollama.gguf import GGUFInfo
from pollama.runner.base import DeviceInfo, LoadSpec, rpc_endpoint
from pollama.runner.devices import offload_devices
from pollama.scheduler.memory import Footprint, footprint

__all__ = ["DEVICE_RESERVE", "Offload", "device_room", "plan_offload", "usable_devices"]

DEVICE_RESERVE = 457 << 20
"""Bytes kept free on every accelerator besides ``OLLAMA_GPU_OVERHEAD``: the CUDA context and
allocator slack (Ollama's minimum per CUDA GPU)."""


@dataclass(frozen=True)
class Offload:
    """A plan: ``gpu_layers``, ``main_gpu`` and ``tensor_split`` as :class:`LoadSpec` takes
    them, the estimated bytes on each accelerator (by device name) and on the host, and why
    (one line for the log and for errors)."""

    gpu_layers: int = 0
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()
    device_bytes: Mapping[str, int] = field(default_factory=dict)
    host_bytes: int = 0
    reason: str = ""
    rpc_servers: tuple[str, ...] = ()  # the RPC servers the worker adds (LoadSpec's)

    def apply(self, spec: LoadSpec) -> LoadSpec:
        """``spec`` with this plan's placement fields."""
        return dataclasses.replace(
            spec,
            gpu_layers=self.gpu_layers,
            main_gpu=self.main_gpu,
            tensor_split=self.tensor_split,
            rpc_servers=self.rpc_servers,
        )


def _targets(devices: Sequence[DeviceInfo], igpu: bool) -> list[DeviceInfo]:
    """The accelerators a plan may use, in llama.cpp's numbering (``runner/devices.py``):
    the discrete GPUs, or the integrated ones when there is none, and those only with
    ``OLLAMA_IGPU_ENABLE`` (an iGPU shares system memory and is often slower than the CPU)."""
    targets = offload_devices(devices)
    if not igpu and any(device.kind != "gpu" for device in targets):
        return []
    return targets


def device_room(
    devices: Sequence[DeviceInfo], used: Mapping[str, int], overhead: int
) -> dict[str, int]:
    """Bytes a new model may still take on each accelerator: its reported free memory, or its
    total less what loaded runners hold (``used``) when that is smaller (Ollama's
    ``updateFreeSpace``: right whether the report is live or from the server's start), less
    ``overhead`` and :data:`DEVICE_RESERVE`; never negative."""
    room: dict[str, int] = {}
    for device in devices:
        if device.accelerator:
            free = min(device.free_bytes, device.total_bytes - used.get(device.name, 0))
            room[device.name] = max(free - overhead - DEVICE_RESERVE, 0)
    return room


@dataclass
class _Slot:
    """One accelerator in a plan: its index in llama.cpp's order and the layers it takes."""

    index: int
    device: DeviceInfo
    room: int
    blocks: int = 0
    output: bool = False


def _fill(fp: Footprint, slots: list[_Slot], want: int) -> None:
    """Ollama's fill: up to ``want`` layers (blocks, then the output once every block is
    placed) round-robin over ``slots`` while each has room for one more. Every layer counts
    as the largest one, so an uneven model never overflows a device."""
    layer = max(fp.layers)
    caps = []
    for number, slot in enumerate(slots):
        budget = slot.room - fp.graph - (fp.projector if number == 0 else 0)
        caps.append(max(budget, 0) // layer if layer else 0)
    blocks = min(want, len(fp.layers))
    open_ = [n for n in range(len(slots)) if caps[n] > 0]
    turn = 0
    while blocks > 0 and open_:
        n = open_[turn % len(open_)]
        if slots[n].blocks < caps[n]:
            slots[n].blocks += 1
            blocks -= 1
            turn += 1
        else:
            open_.remove(n)
    if want > len(fp.layers) and sum(s.blocks for s in slots) == len(fp.layers):
        last = max((n for n in range(len(slots)) if slots[n].blocks), default=None)
        if last is not None:
            left = slots[last].room - fp.graph - slots[last].blocks * layer
            left -= fp.projector if last == 0 else 0
            slots[last].output = left >= fp.output_device


def _placed(slots: list[_Slot]) -> int:
    return sum(slot.blocks + slot.output for slot in slots)


def _choose(
    fp: Footprint, rooms: list[tuple[DeviceInfo, int]], want: int, spread: bool, main: int | None
) -> list[_Slot]:
    """The devices the model goes on, filled: ``main_gpu`` alone; every device when spreading;
    else the fewest (most free first) that hold ``want`` layers, or all when none do."""
    everything = list(range(len(rooms)))
    if main is not None:
        subsets = [[main]]
    elif spread:
        subsets = [everything]
    else:
        by_room = sorted(everything, key=lambda i: -rooms[i][1])
        subsets = [sorted(by_room[:k]) for k in range(1, len(rooms) + 1)]
    slots: list[_Slot] = []
    for subset in subsets:
        slots = [_Slot(i, rooms[i][0], rooms[i][1]) for i in subset]
        _fill(fp, slots, want)
        if _placed(slots) >= want:
            return slots
    if main is None and not spread:
        slots = [_Slot(i, rooms[i][0], rooms[i][1]) for i in everything]
        _fill(fp, slots, want)
    return slots


def _force(fp: Footprint, slots: list[_Slot], want: int) -> None:
    """An explicit ``num_gpu`` beyond what fits: the missing layers round-robin over the
    devices already used (the first one if none), fitting or not, as Ollama passes ``-ngl``."""
    used = [slot for slot in slots if slot.blocks] or slots[:1]
    blocks = min(want, len(fp.layers)) - sum(slot.blocks for slot in slots)
    for turn in range(max(blocks, 0)):
        used[turn % len(used)].blocks += 1
    if want > len(fp.layers):
        for slot in slots:
            slot.output = False
        used[-1].output = True


def _device_bytes(fp: Footprint, slots: list[_Slot]) -> dict[str, int]:
    """Each device's bytes for the plan: llama.cpp gives the offloaded (last) blocks to the
    devices in its order, a contiguous run each, and the output to the last of them."""
    start = len(fp.layers) - sum(slot.blocks for slot in slots)
    result: dict[str, int] = {}
    first = True
    for slot in sorted(slots, key=lambda s: s.index):
        if not slot.blocks and not slot.output:
            continue
        size = fp.graph + sum(fp.layers[start : start + slot.blocks])
        size += fp.output_device if slot.output else 0
        size += fp.projector if first else 0
        result[slot.device.name] = result.get(slot.device.name, 0) + size
        start += slot.blocks
        first = False
    return result


def _cpu(fp: Footprint, reason: str) -> Offload:
    return Offload(host_bytes=fp.host_bytes(0), reason=reason)


def plan_offload(
    info: GGUFInfo,
    spec: LoadSpec,
    devices: Sequence[DeviceInfo],
    *,
    num_gpu: int | None = None,
    main_gpu: int | None = None,
    overhead: int = 0,
    spread: bool = False,
    igpu: bool = False,
    split: Sequence[float] = (),
) -> Offload:
    """Where ``info``'s layers go for ``spec`` on ``devices`` (the rules are the module's).

    ``num_gpu`` and ``main_gpu`` are the options (None: unset); ``overhead`` is
    ``OLLAMA_GPU_OVERHEAD``, ``spread`` ``OLLAMA_SCHED_SPREAD``, ``igpu``
    ``OLLAMA_IGPU_ENABLE``, ``split`` a preset's ``tensor_split``. The plan is for the
    devices alone, as Ollama fits a model before it evicts others for it: the scheduler then
    makes room beside the loaded runners (:func:`device_room`). The spec's own placement
    fields are ignored."""
    fp = footprint(info, spec)
    candidates = _targets(devices, igpu)
    if not candidates or not fp.layers:
        return _cpu(fp, "no accelerator: every layer on the CPU")
    if num_gpu == 0:
        return _cpu(fp, "num_gpu 0: every layer on the CPU")
    explicit = num_gpu is not None and num_gpu > 0
    want = min(num_gpu, fp.n_layers) if num_gpu is not None and num_gpu > 0 else fp.n_layers
    room = device_room(candidates, {}, overhead)
    rooms = [(device, room[device.name]) for device in candidates]
    main = main_gpu if main_gpu is not None and main_gpu < len(candidates) else None
    if main is None and (split or any(device.endpoint for device in candidates)):
        return _plan_split(fp, rooms, devices, want if explicit else None, split)
    slots = _choose(fp, rooms, want, spread, main)
    fitted = _placed(slots)
    if explicit and fitted < want:
        _force(fp, slots, want)
    layers = _placed(slots)
    if layers == 0:
        free = human_bytes(max(r for _, r in rooms))
        return _cpu(fp, f"no layer fits in the accelerators' memory ({free} usable)")
    offload = _offload(fp, slots, len(candidates), main, _reason(fp, slots, want, fitted, explicit))
    servers = tuple(dict.fromkeys(d.endpoint for d in candidates if d.endpoint))
    return dataclasses.replace(offload, rpc_servers=servers)


def _offload(
    fp: Footprint, slots: list[_Slot], n_devices: int, main: int | None, reason: str
) -> Offload:
    layers = _placed(slots)
    counts = [0.0] * n_devices
    for slot in slots:
        counts[slot.index] += slot.blocks + slot.output
    busiest = max(slots, key=lambda s: (s.blocks + s.output, -s.index)).index
    return Offload(
        gpu_layers=layers,
        main_gpu=main if main is not None else busiest,
        tensor_split=tuple(counts) if n_devices > 1 else (),
        device_bytes=_device_bytes(fp, slots),
        host_bytes=fp.host_bytes(layers),
        reason=reason,
    )


def _reason(fp: Footprint, slots: list[_Slot], want: int, fitted: int, explicit: bool) -> str:
    names = ", ".join(
        f"{slot.device.name} ({slot.blocks + slot.output})"
        for slot in slots
        if slot.blocks or slot.output
    )
    layers = _placed(slots)
    if explicit and fitted < want:
        return (
            f"num_gpu {want}: {layers} of {fp.n_layers} layers on {names}, "
            f"though about {fitted} fit"
        )
    if explicit:
        return f"num_gpu {want}: {layers} of {fp.n_layers} layers on {names}"
    if layers == fp.n_layers:
        return f"all {layers} layers fit on {names}"
    return f"{layers} of {fp.n_layers} layers fit on {names}; the rest on the CPU"


def _shares_of(weights: Sequence[float], total: int) -> list[int]:
    """``total`` whole layers in proportion to ``weights`` (largest remainders first; ties
    to the earlier device); all zero weights give nothing."""
    whole = sum(weights)
    if total <= 0 or whole <= 0:
        return [0] * len(weights)
    exact = [w * total / whole for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _plan_split(
    fp: Footprint,
    rooms: list[tuple[DeviceInfo, int]],
    devices: Sequence[DeviceInfo],
    num_gpu: int | None,
    split: Sequence[float],
) -> Offload:
    """The proportional split (the module's RPC rule): each candidate's layers from the
    preset's shares or its room; without a local accelerator and without ``num_gpu``, the
    local CPU takes its share by its free memory first (the first layers stay on the host).
    ``tensor_split`` is the whole-layer counts, which llama.cpp's loader turns back into the
    same contiguous runs (``llama_model_base::load_tensors``)."""
    if len(split) > len(rooms):
        names = ", ".join(device.name for device, _ in rooms)
        raise InvalidOption(
            f"tensor_split names {len(split)} devices; there are {len(rooms)} ({names})"
        )
    want = fp.n_layers if num_gpu is None else num_gpu
    if split:
        weights = [float(x) for x in split] + [0.0] * (len(rooms) - len(split))
    else:
        weights = [float(room) for _, room in rooms]
        local = any(not device.endpoint for device, _ in rooms)
        cpu = next((d for d in devices if d.kind == "cpu"), None)
        if num_gpu is None and not local and cpu is not None:
            want -= _shares_of([*weights, float(cpu.free_bytes)], fp.n_layers)[-1]
    counts = _shares_of(weights, want)
    if not any(counts):
        return _cpu(fp, "the split leaves every layer on the CPU")
    slots = [_Slot(i, device, room) for i, (device, room) in enumerate(rooms)]
    for slot, count in zip(slots, counts, strict=True):
        slot.blocks = count
    if want > len(fp.layers):  # the output layer: the last device that takes a layer
        last = max(i for i, count in enumerate(counts) if count)
        slots[last].blocks -= 1
        slots[last].output = True
    placed = zip(slots, counts, strict=True)
    names = ", ".join(f"{slot.device.name} ({n})" for slot, n in placed if n)
    host = fp.n_layers - sum(counts)
    how = "in the preset's shares" if split else "by free memory"
    reason = f"split {how}: {names}; {host} of {fp.n_layers} layers on the CPU"
    offload = _offload(fp, [s for s in slots if s.blocks or s.output], len(rooms), None, reason)
    return _drop_idle_servers(offload, [device for device, _ in rooms], counts)


def _drop_idle_servers(
    offload: Offload, candidates: Sequence[DeviceInfo], counts: Sequence[int]
) -> Offload:
    """The plan with only the RPC servers that take a layer, and ``tensor_split`` over the
    devices the worker will then have: an idle server is not connected to at all (it serves
    one client at a time, and another model may want it)."""
    used = {d.endpoint for d, n in zip(candidates, counts, strict=True) if d.endpoint and n}
    kept = [(d, n) for d, n in zip(candidates, counts, strict=True)
            if not d.endpoint or d.endpoint in used]  # fmt: skip
    servers = tuple(dict.fromkeys(d.endpoint for d, _ in kept if d.endpoint))
    split = tuple(float(n) for _, n in kept)
    busiest = max(range(len(kept)), key=lambda i: (kept[i][1], -i))
    return dataclasses.replace(
        offload, tensor_split=split, rpc_servers=servers, main_gpu=busiest
    )


def usable_devices(
    devices: Sequence[DeviceInfo],
    held: Iterable[str],
    own: Sequence[str],
    check: Callable[[list[str]], list[str]],
) -> tuple[list[DeviceInfo], list[str], list[str]]:
    """The devices a new load may plan on, the RPC servers left out because they are down,
    and those left out because another loaded model holds them.

    ``held`` names the devices loaded runners use (``Scheduler.device_usage``); ``own`` are
    the servers of this model's own runner, which the new load replaces (so they are not
    "held"); ``check`` returns the unreachable ones of those it is given (``runner/rpc.py``
    ``unreachable``). An RPC server serves one client at a time, so one held by another
    model is not used, nor connected to: a connect to it would wait in its backlog."""
    endpoints = list(dict.fromkeys(d.endpoint for d in devices if d.endpoint))
    if not endpoints:
        return list(devices), [], []
    taken = {rpc_endpoint(name) for name in held} - {""} - set(own)
    busy = [e for e in endpoints if e in taken]
    down = check([e for e in endpoints if e not in taken])
    usable = set(endpoints) - set(busy) - set(down)
    kept = [d for d in devices if not d.endpoint or d.endpoint in usable]
    return kept, down, busy
