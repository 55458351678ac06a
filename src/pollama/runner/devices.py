"""The compute devices llama.cpp sees, through its own device API (the ggml backend registry).

    python -m pollama.runner.devices      # prints the inventory as JSON on stdout

The server never loads llama.cpp in its own process (only workers do: see
docs/architecture.md#a-worker-process-per-model), so it asks for the inventory with
:func:`probe_devices`, which runs this module in a subprocess with a timeout. Inside, the
query (:func:`query_devices`) uses the very ggml library instance that ``libllama`` uses:
llama-cpp-python 0.3.36 has no bindings for ``ggml_backend_dev_*``, so they are called
through ctypes on ``libggml`` from the package's own library folder, after the bindings
(``runner/bindings.py``) have loaded it.

What must stay true:

* importing this module does not load llama.cpp; only :func:`query_devices` does;
* the devices are in the registry's order, which is the order llama.cpp numbers its
  offload devices in (``main_gpu`` and ``tensor_split`` index :func:`offload_devices`);
* a build with an accelerator backend that finds no device (a CUDA build after a driver
  update) is told apart from a CPU-only build: :attr:`BuildInfo.accelerator` says which
  backends were compiled in, whatever devices they found;
* :func:`probe_devices` never raises: a failure is an inventory with ``error`` set.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pollama.runner.base import DeviceInfo, LoadSpec, RunnerInfo

__all__ = [
    "BuildInfo",
    "DeviceInventory",
    "load_backends",
    "offload_devices",
    "offload_shortfall",
    "planned_cpu_reason",
    "probe_devices",
    "probe_rpc_server",
    "query_devices",
]

# enum ggml_backend_dev_type (ggml/include/ggml-backend.h), in order.
_DEVICE_KINDS = ("cpu", "gpu", "igpu", "accel", "meta")
# Registries that run on the host, next to the CPU backend: their presence does not make a
# build an accelerator build (BLAS and AMX speed up CPU work; RPC reaches other machines).
_HOST_BACKENDS = frozenset({"CPU", "BLAS", "RPC", "ZENDNN", "OPENVINO", "AMX"})
_log = logging.getLogger(__name__)
PROBE_TIMEOUT = 60.0
"""Seconds :func:`probe_devices` waits: a CUDA runtime's first initialization can take
tens of seconds on a machine with several GPUs."""


@dataclass(frozen=True)
class BuildInfo:
    """What the engine was built with: the backend registries it has (``CPU``, ``CUDA``,
    ``Metal``, ``Vulkan``...), and llama.cpp's own ``llama_supports_gpu_offload()`` (true
    only when a local offload device was found: its RPC clause, true for any build with the
    RPC backend, is left out)."""

    backends: tuple[str, ...] = ()
    gpu_offload: bool = False

    @property
    def accelerator(self) -> bool:
        """Whether an accelerator backend was compiled in (found devices or not)."""
        return any(name.upper() not in _HOST_BACKENDS for name in self.backends)

    def to_json(self) -> dict[str, Any]:
        return {
            "backends": list(self.backends),
            "accelerator": self.accelerator,
            "gpu_offload": self.gpu_offload,
        }


@dataclass(frozen=True)
class DeviceInventory:
    """The devices and the build, as one query saw them. ``error`` says why the query
    failed (then the lists are empty and nothing is known); "" when it worked."""

    devices: tuple[DeviceInfo, ...] = ()
    build: BuildInfo = field(default_factory=BuildInfo)
    error: str = ""

    def accelerators(self) -> list[DeviceInfo]:
        return [d for d in self.devices if d.accelerator]

    def no_accelerator_reason(self) -> str:
        """Why no layer can go to an accelerator, in words for a log or an error; "" when
        one is there."""
        if self.error:
            return f"the device inventory failed ({self.error})"
        if self.accelerators():
            return ""
        if not self.build.accelerator:
            return "this build of llama.cpp has no GPU backend (a CPU-only build)"
        backends = ", ".join(b for b in self.build.backends if b.upper() not in _HOST_BACKENDS)
        return f"the {backends} backend found no device (driver or runtime missing?)"

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": [asdict(d) for d in self.devices],
            "build": self.build.to_json(),
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceInventory:
        devices = tuple(
            DeviceInfo(
                name=str(d["name"]),
                description=str(d.get("description", "")),
                kind=str(d.get("kind", "cpu")),
                total_bytes=int(d.get("total_bytes", 0)),
                free_bytes=int(d.get("free_bytes", 0)),
            )
            for d in data.get("devices") or ()
        )
        build = data.get("build") or {}
        return cls(
            devices=devices,
            build=BuildInfo(
                backends=tuple(str(b) for b in build.get("backends") or ()),
                gpu_offload=bool(build.get("gpu_offload")),
            ),
            error=str(data.get("error") or ""),
        )


def offload_devices(devices: Sequence[DeviceInfo]) -> list[DeviceInfo]:
    """The devices llama.cpp offloads layers to, in its numbering (``main_gpu`` and the
    indexes of ``tensor_split``): the RPC servers' devices first, then the discrete GPUs in
    registry order, or the integrated ones when there is no discrete GPU (the RPC devices
    do not count there): ``llama_prepare_model_devices``'s rule (``src/llama.cpp``)."""
    remote = [d for d in devices if d.endpoint]
    gpus = [d for d in devices if d.kind == "gpu" and not d.endpoint]
    return remote + (gpus or [d for d in devices if d.kind == "igpu" and not d.endpoint])


def planned_cpu_reason(spec: LoadSpec, inventory: DeviceInventory) -> str:
    """Why a load planned as ``spec`` puts no layer on an accelerator, in words; "" when it
    puts some there (``gpu_layers`` not 0)."""
    if spec.gpu_layers != 0:
        return ""
    return inventory.no_accelerator_reason() or (
        "no layer was planned for the GPU (num_gpu 0, or the model does not fit in its free "
        "memory)"
    )


def offload_shortfall(spec: LoadSpec, info: RunnerInfo, inventory: DeviceInventory) -> str:
    """How a loaded model fell short of the layers its plan sent to an accelerator, in words
    (the scheduler warns, or with ``POLLAMA_REQUIRE_GPU`` refuses); "" when it did not.
    What the worker reports decides (``info.gpu_layers``, from llama.cpp's own log), never
    the plan: an accelerator build that lost its device loads "everything offloaded" on
    the CPU without a word from llama.cpp."""
    if spec.gpu_layers == 0:
        return ""
    if spec.gpu_layers < 0:  # every layer
        short = info.gpu_layers < info.layers if info.layers else info.gpu_layers == 0
        wanted = str(info.layers) if info.layers else "all"
    else:
        most = min(spec.gpu_layers, info.layers) if info.layers else spec.gpu_layers
        short, wanted = info.gpu_layers < most, str(most)
    if not short:
        return ""
    reason = inventory.no_accelerator_reason()
    detail = f" ({reason})" if reason else ""
    return f"{info.gpu_layers} of {wanted} planned layers went to the GPU{detail}"


def _declare(lib: ctypes.CDLL) -> None:
    """The signatures of the ggml functions used here (``ggml-backend.h``)."""
    vp, size = ctypes.c_void_p, ctypes.c_size_t
    lib.ggml_backend_reg_count.argtypes, lib.ggml_backend_reg_count.restype = [], size
    lib.ggml_backend_reg_get.argtypes, lib.ggml_backend_reg_get.restype = [size], vp
    lib.ggml_backend_reg_name.argtypes, lib.ggml_backend_reg_name.restype = [vp], ctypes.c_char_p
    lib.ggml_backend_dev_count.argtypes, lib.ggml_backend_dev_count.restype = [], size
    lib.ggml_backend_dev_get.argtypes, lib.ggml_backend_dev_get.restype = [size], vp
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [vp], ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes, lib.ggml_backend_dev_type.restype = [vp], ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [vp, ctypes.POINTER(size), ctypes.POINTER(size)]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load_all_from_path.restype = None


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def _device(lib: ctypes.CDLL, index: int) -> DeviceInfo:
    dev = lib.ggml_backend_dev_get(index)
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    kind = int(lib.ggml_backend_dev_type(dev))
    return DeviceInfo(
        name=_text(lib.ggml_backend_dev_name(dev)),
        description=_text(lib.ggml_backend_dev_description(dev)),
        kind=_DEVICE_KINDS[kind] if 0 <= kind < len(_DEVICE_KINDS) else "unknown",
        total_bytes=int(total.value),
        free_bytes=int(free.value),
    )


def load_backends() -> ctypes.CDLL:
    """ggml's library with its backends registered (the worker calls this before loading a
    model, :func:`query_devices` before listing).

    A build with its backends linked in (llama-cpp-python's default) has them registered
    already and is left alone. A build with dynamically loaded backends
    (``GGML_BACKEND_DL``) registers none until asked, and llama.cpp's own
    ``ggml_backend_load_all()`` looks beside the executable (Python's) and in the working
    directory, not in the package's library folder where they are: so they are loaded
    from there."""
    from pollama.runner.bindings import lc, load_ggml

    lib = load_ggml()
    _declare(lib)
    if not lib.ggml_backend_reg_count():
        lib.ggml_backend_load_all_from_path(str(lc._base_path).encode())
    return lib


def query_devices() -> DeviceInventory:
    """The inventory, asked of llama.cpp in this process (which loads its libraries: call it
    in a worker or in this module's own process, never in the server)."""
    from pollama.runner.bindings import lc

    lib = load_backends()
    backends = tuple(
        _text(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)))
        for i in range(lib.ggml_backend_reg_count())
    )
    devices = tuple(_device(lib, i) for i in range(lib.ggml_backend_dev_count()))
    # llama_supports_gpu_offload() less its llama_supports_rpc() clause, which is true for
    # every build with the RPC backend (all of pollama's: scripts/engine-build.sh): a local
    # GPU or integrated GPU found. RPC servers' devices are the inventory's own entries.
    local_gpu = any(d.accelerator and not d.endpoint for d in devices)
    build = BuildInfo(
        backends=backends,
        gpu_offload=local_gpu and bool(lc.llama_supports_gpu_offload()),
    )
    return DeviceInventory(devices=devices, build=build)


RPC_QUERY_TIMEOUT = 20.0
"""Seconds one RPC server's device query may take: a server busy with another client
(it serves one at a time) would hold it for as long as that client stays."""


def probe_devices(
    timeout: float = PROBE_TIMEOUT,
    python: str = sys.executable,
    rpc_servers: Sequence[str] = (),
) -> DeviceInventory:
    """The inventory from ``python -m pollama.runner.devices`` in a subprocess, so the caller
    never loads llama.cpp, followed by the devices of each RPC server (``rpc_servers``: the
    server passes ``OLLAMA_RPC_SERVERS`` from its settings), each asked by a subprocess of its own
    (``runner/rpc.py``: llama.cpp aborts on a server it cannot reach). Never raises: a
    timeout, a crash or bad output is an inventory with ``error`` saying which (the server
    logs it as a warning and goes on); an RPC server that does not answer is logged as a
    warning and left out (a later load checks it again: ``inference/service.py``)."""
    inventory = _probe_local(timeout, python)
    remote: list[DeviceInfo] = []
    for endpoint in rpc_servers:
        found, problem = probe_rpc_server(endpoint, python=python)
        if problem:
            _log.warning("RPC server %s left out: %s", endpoint, problem)
        remote.extend(found)
    if not remote:
        return inventory
    return dataclasses.replace(inventory, devices=inventory.devices + tuple(remote))


def probe_rpc_server(
    endpoint: str, timeout: float = RPC_QUERY_TIMEOUT, python: str = sys.executable
) -> tuple[list[DeviceInfo], str]:
    """One RPC server's devices and memory, and "" or why there are none (unreachable,
    busy, an engine without RPC)."""
    from pollama.runner.rpc import unreachable

    if unreachable([endpoint]):
        return [], "unreachable (connection failed)"
    command = [python, "-m", "pollama.runner.rpc", "query", endpoint]
    try:
        done = subprocess.run(  # noqa: S603 - our own interpreter and module, no shell
            command, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return [], f"no answer in {timeout:g}s (serving another client?)"
    except OSError as exc:
        return [], f"the query could not start: {exc}"
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    if done.returncode != 0:
        return [], lines[-1] if lines else f"exit status {done.returncode}"
    try:
        data = json.loads(done.stdout)
        return list(DeviceInventory.from_json({"devices": data}).devices), ""
    except (ValueError, TypeError, KeyError) as exc:
        return [], f"the query printed no device list: {exc}"


def _probe_local(timeout: float, python: str) -> DeviceInventory:
    """This machine's devices (:func:`probe_devices` without the RPC servers)."""
    command = [python, "-m", "pollama.runner.devices"]
    try:
        done = subprocess.run(  # noqa: S603 - our own interpreter and module, no shell
            command, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return DeviceInventory(error=f"the device query took more than {timeout:g}s")
    except OSError as exc:
        return DeviceInventory(error=f"the device query could not start: {exc}")
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = lines[-1] if lines else f"exit status {done.returncode}"
        return DeviceInventory(error=f"the device query failed: {detail}")
    try:
        return DeviceInventory.from_json(json.loads(done.stdout))
    except (ValueError, TypeError, KeyError) as exc:
        return DeviceInventory(error=f"the device query printed no inventory: {exc}")


def main() -> int:
    """Print the inventory as one JSON object on stdout (llama.cpp's own log goes to
    stderr); 1 when llama.cpp cannot be loaded."""
    try:
        inventory = query_devices()
    except (ImportError, OSError, AttributeError) as exc:
        sys.stderr.write(f"pollama.runner.devices: {type(exc).__name__}: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(inventory.to_json()) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
