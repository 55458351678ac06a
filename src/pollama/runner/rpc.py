"""llama.cpp's RPC backend (``ggml-rpc``): serving this machine's devices to other pollama
servers, and adding theirs to a worker (README.md#rpc).

    python -m pollama.runner.rpc serve --host H --port P [--threads N]   # `pollama rpc`
    python -m pollama.runner.rpc query HOST:PORT                        # its devices, as JSON

llama-cpp-python 0.3.36 binds none of ``ggml-rpc.h``, so its functions are reached through
ctypes, the way llama.cpp's own ``common/arg.cpp`` and ``tools/rpc/rpc-server.cpp`` reach
them: ``ggml_backend_reg_by_name("RPC")`` and ``ggml_backend_reg_get_proc_address`` for
``ggml_backend_rpc_add_server`` / ``ggml_backend_rpc_start_server`` (so it works whether the
backend is linked into ``libggml`` or loaded with ``GGML_BACKEND_DL``). The engine must be
built with ``GGML_RPC=ON`` (``scripts/engine-build.sh`` does).

What llama.cpp does that shapes this module (``ggml/src/ggml-rpc/ggml-rpc.cpp``):

* a connection that fails (refused, handshake) is ``GGML_ABORT``: the process dies. So
  every endpoint is checked with a plain TCP connect first (:func:`unreachable`), and the
  memory query runs in a subprocess of its own (``query``), never in the server;
* any send or receive that fails later (the server died mid-generation) is
  ``RPC_STATUS_ASSERT`` -> ``GGML_ABORT("Remote RPC server crashed or returned malformed
  response")``: the worker dies and its requests fail (``runner/process.py`` names the
  server that went away);
* a server serves one client at a time (its accept loop calls ``rpc_serve_client`` and
  waits for it to end, with ``listen(fd, 1)``): one pollama model per RPC server at once.

What must stay true: importing this module loads nothing of llama.cpp (the server imports
it for :func:`unreachable`); only the functions that say so load it, in a worker or in this
module's own process.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict

from pollama.runner.base import DeviceInfo

__all__ = [
    "CONNECT_TIMEOUT",
    "add_servers",
    "device_name",
    "split_endpoint",
    "unreachable",
]

CONNECT_TIMEOUT = 1.0
"""Seconds a reachability check waits for a TCP connect (loopback and a LAN answer in
well under a millisecond; a host that drops packets costs this much)."""

# enum ggml_backend_dev_type (ggml-backend.h): CPU 0, GPU 1, IGPU 2, ACCEL 3.
_CPU, _ACCEL = 0, 3
_DEVICE_KINDS = ("cpu", "gpu", "igpu", "accel", "meta")


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port``; ``ValueError`` when it is not one (llama.cpp's own
    parser splits at the first ``:`` and takes IPv4 addresses or names, not IPv6)."""
    host, sep, port = endpoint.strip().partition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a host:port RPC endpoint: {endpoint!r}")
    return host, int(port)


def device_name(index: int, endpoint: str) -> str:
    """The name llama.cpp gives a remote device's buffers (``RPC0[host:port]``): the
    inventory uses it too, so that planned and reported bytes meet under one name."""
    return f"RPC{index}[{endpoint}]"


def unreachable(endpoints: Iterable[str], timeout: float = CONNECT_TIMEOUT) -> list[str]:
    """The endpoints that do not take a TCP connection within ``timeout``, in order.

    The connection is closed at once, before any byte: the server's accept loop reads a
    closed socket and goes on (it logs "Client connection closed"). Never call this for an
    endpoint a loaded worker holds: its single-client server would only queue the connect
    (``listen`` backlog 1) and it could time out."""
    down = []
    for endpoint in endpoints:
        try:
            host, port = split_endpoint(endpoint)
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except (OSError, ValueError):
            down.append(endpoint)
    return down


# -- llama.cpp (a worker, or this module's own process) ---------------------------------------

_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_void_p),
)  # fmt: skip


def _ggml() -> ctypes.CDLL:
    """``libggml`` with its backends registered and the RPC entry points declared."""
    from pollama.runner.devices import load_backends

    lib = load_backends()
    vp = ctypes.c_void_p
    lib.ggml_backend_reg_by_name.argtypes, lib.ggml_backend_reg_by_name.restype = (
        [ctypes.c_char_p], vp)  # fmt: skip
    lib.ggml_backend_reg_get_proc_address.argtypes = [vp, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = vp
    lib.ggml_backend_register.argtypes, lib.ggml_backend_register.restype = [vp], None
    lib.ggml_backend_reg_dev_count.argtypes = [vp]
    lib.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_dev_get.argtypes = [vp, ctypes.c_size_t]
    lib.ggml_backend_reg_dev_get.restype = vp
    return lib


def _proc(lib: ctypes.CDLL, name: str) -> int:
    """The address of the RPC backend's function ``name``; ``OSError`` naming the fix when
    the engine has no RPC backend."""
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    address = lib.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    if not address:
        raise OSError(
            "this llama.cpp build has no RPC backend (GGML_RPC); rebuild the engine: "
            "scripts/engine-build.sh install .venv"
        )
    return int(address)


def _register(lib: ctypes.CDLL, endpoint: str) -> int:
    """Connect to ``endpoint`` and add its devices to the registry; its registry handle.
    Aborts the process when the server cannot be reached (llama.cpp's behaviour): call
    :func:`unreachable` first."""
    add = _ADD_SERVER(_proc(lib, "ggml_backend_rpc_add_server"))
    reg = add(endpoint.encode())
    if not reg:
        raise OSError(f"the RPC server {endpoint} offers no device")
    lib.ggml_backend_register(reg)
    return int(reg)


def add_servers(endpoints: Sequence[str]) -> None:
    """Add each RPC server's devices to llama.cpp's registry, in order, before a model loads
    (the loader then puts them first among its offload devices: ``src/llama.cpp``
    ``llama_prepare_model_devices``). ``ConnectionError`` naming the servers that are down,
    before any is touched: llama.cpp would abort on them."""
    if not endpoints:
        return
    down = unreachable(endpoints)
    if down:
        raise ConnectionError(f"RPC server {', '.join(down)} is unreachable (connection failed)")
    lib = _ggml()
    for endpoint in endpoints:
        _register(lib, endpoint)


def query_server(endpoint: str) -> list[DeviceInfo]:
    """The devices one RPC server offers, with their memory (asked over the network);
    ``ConnectionError`` when it is down (llama.cpp would abort)."""
    if unreachable([endpoint]):
        raise ConnectionError(f"RPC server {endpoint} is unreachable (connection failed)")
    lib = _ggml()
    reg = _register(lib, endpoint)
    found = []
    for index in range(lib.ggml_backend_reg_dev_count(reg)):
        dev = lib.ggml_backend_reg_dev_get(reg, index)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(
            DeviceInfo(
                name=device_name(index, endpoint),
                description=f"RPC server {endpoint}",
                kind="gpu",  # what ggml-rpc reports for every remote device
                total_bytes=int(total.value),
                free_bytes=int(free.value),
            )
        )
    return found


def _served_devices(lib: ctypes.CDLL) -> list[int]:
    """The devices a server offers: every GPU-like one, else the CPU (``rpc-server.cpp``
    ``get_devices``: the CPU beside a GPU would only slow the split down)."""
    devices = []
    for index in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(index)
        if int(lib.ggml_backend_dev_type(dev)) not in (_CPU, _ACCEL):
            devices.append(int(dev))
    if not devices:
        devices = [
            int(lib.ggml_backend_dev_get(i))
            for i in range(lib.ggml_backend_dev_count())
            if int(lib.ggml_backend_dev_type(lib.ggml_backend_dev_get(i))) == _CPU
        ][:1]
    return devices


def serve(host: str, port: int, threads: int) -> int:
    """Run llama.cpp's RPC server on ``host:port`` until killed (it never returns on its
    own); 1 when it could not start. The caller (``pollama rpc``) has already refused a
    non-loopback address without the flag that accepts the risk."""
    lib = _ggml()
    devices = _served_devices(lib)
    if not devices:
        sys.stderr.write("pollama rpc: llama.cpp found no device to serve\n")
        return 1
    for dev in devices:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = int(lib.ggml_backend_dev_type(dev))
        sys.stdout.write(
            f"pollama rpc: serving {lib.ggml_backend_dev_name(dev).decode()} "
            f"({_DEVICE_KINDS[kind] if 0 <= kind < len(_DEVICE_KINDS) else kind}, "
            f"{lib.ggml_backend_dev_description(dev).decode()}): "
            f"{total.value >> 20} MiB, {free.value >> 20} MiB free; {threads} threads\n"
        )
    sys.stdout.flush()
    start = _START_SERVER(_proc(lib, "ggml_backend_rpc_start_server"))
    array = (ctypes.c_void_p * len(devices))(*devices)
    # The C accept loop never returns to Python, so Python's own SIGINT handler would never
    # run: the default actions end the process at once instead.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    start(f"{host}:{port}".encode(), None, threads, len(devices), array)
    sys.stderr.write(f"pollama rpc: the RPC server on {host}:{port} stopped (port in use?)\n")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``serve`` (what ``pollama rpc`` runs) or ``query`` (what ``runner/devices.py`` runs
    per server: one JSON list of devices on stdout)."""
    parser = argparse.ArgumentParser(prog="pollama.runner.rpc")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=50052)
    run.add_argument("--threads", type=int, default=0)
    ask = sub.add_parser("query")
    ask.add_argument("endpoint")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            threads = args.threads if args.threads > 0 else len(os.sched_getaffinity(0))
            return serve(args.host, args.port, threads)
        devices = query_server(args.endpoint)
    except (OSError, ImportError, AttributeError) as exc:
        sys.stderr.write(f"pollama.runner.rpc: {exc}\n")
        return 1
    sys.stdout.write(json.dumps([asdict(d) for d in devices]) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skip teardown: the RPC dispatcher threads of llama.cpp may still run
