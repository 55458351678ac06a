"""Where llama.cpp put a model, read from its own log while it loads.

llama.cpp reports each buffer it allocates, on the device whose buffer type holds it, and
how many layers it offloaded::

    load_tensors: offloaded 25/25 layers to GPU
    load_tensors:        CUDA0 model buffer size =   373.73 MiB
    load_tensors:   CPU_Mapped model buffer size =    68.06 MiB
    llama_kv_cache:      CUDA0 KV buffer size =    48.00 MiB
    llama_context:  CUDA_Host  output buffer size =     0.58 MiB
    sched_reserve:      CUDA0 compute buffer size =   298.50 MiB

These lines are the most exact figure there is (the scheduler's estimate comes before the
load, this after it), so ``/api/ps`` ``size_vram`` and ``pollama ps`` are built from them.
The buffer type's name says the device: ``CPU``, ``CPU_Mapped`` (the mapped file),
``CPU_REPACK`` (and the CPU backend's other repacked layouts, ``CPU_KLEIDIAI``, ``CPU_HBM``…),
``AMX`` (weights repacked for Intel's AMX tiles, the one such type whose name lacks the
prefix) and any ``<backend>_Host`` (pinned host memory of a GPU backend) are host memory and
count as ``CPU``; ``<device>_Mapped`` (Metal's mapped file, in the GPU's unified
memory) counts as that device; anything else is a device name as llama.cpp gives it
(``CUDA0``, ``MTL0``, ``Vulkan0``).

What must stay true: nothing here imports llama.cpp (the parser is tested on sample lines);
a line that is not a buffer or offload report changes nothing; the "offloaded" count is
believed only when some bytes really went to a device other than the CPU (llama.cpp prints
the layers it was asked to offload, which a device that refused them would not hold).
"""

from __future__ import annotations

import re

__all__ = ["CPU_DEVICE", "OffloadReport", "device_of_buffer"]

CPU_DEVICE = "CPU"
# The CPU backend's extra buffer types (ggml-cpu) whose names do not start with "CPU".
_HOST_BUFFER_TYPES = frozenset({"AMX"})
_MIB = 1 << 20
_BUFFER = re.compile(rb":\s+(\S+)\s+(?:\S+\s+)*?buffer size =\s*([0-9.]+) MiB")
_OFFLOADED = re.compile(rb"offloaded (\d+)/(\d+) layers to GPU")


def device_of_buffer(buffer_type: str) -> str:
    """The device a buffer type's memory is on (see the module docstring)."""
    if (
        buffer_type.upper().startswith(CPU_DEVICE)
        or buffer_type.endswith("_Host")
        or buffer_type in _HOST_BUFFER_TYPES
    ):
        return CPU_DEVICE
    if buffer_type.endswith("_Mapped"):
        return buffer_type[: -len("_Mapped")]
    return buffer_type


class OffloadReport:
    """Sums llama.cpp's buffer reports per device, and keeps its offload count.

    Fed every log line of the worker (:meth:`feed`); read once the model and its context
    are loaded (the embedding context a generation model makes later adds its own lines,
    after ``ready`` has been sent)."""

    def __init__(self) -> None:
        self.device_bytes: dict[str, int] = {}
        self.offloaded = 0  # "offloaded N/M layers": N (0 when no such line came)
        self.layers = 0  # M: the layers the model has, output layer included

    def feed(self, text: bytes) -> None:
        match = _BUFFER.search(text)
        if match:
            device = device_of_buffer(match.group(1).decode("utf-8", "replace"))
            size = int(float(match.group(2)) * _MIB)
            self.device_bytes[device] = self.device_bytes.get(device, 0) + size
            return
        match = _OFFLOADED.search(text)
        if match:
            self.offloaded, self.layers = int(match.group(1)), int(match.group(2))

    def add(self, device: str, size: int) -> None:
        """Memory llama.cpp does not report in these lines (a projector's weights)."""
        if size > 0:
            self.device_bytes[device] = self.device_bytes.get(device, 0) + size

    @property
    def total_bytes(self) -> int:
        return sum(self.device_bytes.values())

    @property
    def accelerator_bytes(self) -> int:
        """Bytes on devices other than the CPU: ``/api/ps`` ``size_vram``."""
        return sum(n for device, n in self.device_bytes.items() if device != CPU_DEVICE)

    @property
    def gpu_layers(self) -> int:
        """The layers on an accelerator: llama.cpp's count, when its buffers say so."""
        return self.offloaded if self.accelerator_bytes > 0 else 0
