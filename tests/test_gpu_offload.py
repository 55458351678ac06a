"""GPU offload, what this CPU-only machine can check of it: llama.cpp's log lines turned into
bytes per device (CUDA-, Metal- and CPU-style samples in llama.cpp's exact format), the
device inventory and its reasons, the scheduler's ``size_vram``, warning and
``POLLAMA_REQUIRE_GPU`` refusal over a scripted runner, ``pollama ps``'s PROCESSOR column
as Ollama prints it, ``/api/status`` and the ``/metrics`` device gauges."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fake_runner import FakeRunner
from ggufgen import write_tiny_model
from inprocess import BASE, create_models
from pollama.cli.run import _processor
from pollama.config import load_settings
from pollama.errors import AcceleratorUnavailable
from pollama.runner.base import DeviceInfo, LoadSpec, RunnerInfo
from pollama.runner.devices import (
    BuildInfo,
    DeviceInventory,
    offload_devices,
    offload_shortfall,
    planned_cpu_reason,
    probe_devices,
)
from pollama.runner.offload import OffloadReport, device_of_buffer
from pollama.scheduler import ModelRef, Scheduler
from pollama.server.app import create_app

MIB = 1 << 20
GIB = 1 << 30

# llama.cpp's lines as a CUDA build prints them (llama-model.cpp, llama-kv-cache.cpp,
# llama-context.cpp formats), Qwen2.5-0.5B fully offloaded.
CUDA_LOG = [
    "llama_model_load_from_file_impl: using device CUDA0 (NVIDIA H200) (0000:19:00.0) - "
    "140486 MiB free",
    "load_tensors: offloading output layer to GPU",
    "load_tensors: offloading 24 repeating layers to GPU",
    "load_tensors: offloaded 25/25 layers to GPU",
    "load_tensors:        CUDA0 model buffer size =   373.73 MiB",
    "load_tensors:   CPU_Mapped model buffer size =    68.06 MiB",
    "llama_context:  CUDA_Host  output buffer size =     0.58 MiB",
    "llama_kv_cache:      CUDA0 KV buffer size =    48.00 MiB",
    "sched_reserve:      CUDA0 compute buffer size =   298.50 MiB",
    "sched_reserve:  CUDA_Host compute buffer size =     9.01 MiB",
]
CPU_LOG = [
    "load_tensors:   CPU_Mapped model buffer size =    97.67 MiB",
    "load_tensors:   CPU_REPACK model buffer size =    12.00 MiB",
    "llama_context:        CPU  output buffer size =     0.19 MiB",
    "llama_kv_cache:        CPU KV buffer size =    30.00 MiB",
    "sched_reserve:        CPU compute buffer size =    98.51 MiB",
]


def _mib(x: float) -> int:
    return int(x * MIB)


def _report(lines: list[str]) -> OffloadReport:
    report = OffloadReport()
    for line in lines:
        report.feed((line + "\n").encode())
    return report


# -- the log parser -------------------------------------------------------------------------


def test_cuda_log_lines_become_bytes_per_device_and_offloaded_layers() -> None:
    report = _report(CUDA_LOG)
    assert report.device_bytes == {
        "CUDA0": _mib(373.73) + _mib(48.00) + _mib(298.50),
        "CPU": _mib(68.06) + _mib(0.58) + _mib(9.01),  # mapped file and pinned host memory
    }
    assert report.gpu_layers == 25 and report.layers == 25
    assert report.accelerator_bytes == report.device_bytes["CUDA0"]
    assert report.total_bytes == sum(report.device_bytes.values())


def test_cpu_log_lines_are_all_cpu_with_no_layer_offloaded() -> None:
    report = _report(CPU_LOG)
    assert set(report.device_bytes) == {"CPU"}
    assert report.gpu_layers == 0 and report.accelerator_bytes == 0


def test_a_cpu_with_amx_is_all_cpu_with_no_layer_offloaded() -> None:
    """An Intel CPU with AMX: llama.cpp repacks most weights into an ``AMX`` buffer and still
    prints its offload count; none of it is an accelerator (``size_vram`` 0, not "100% GPU")."""
    lines = [
        "load_tensors: offloaded 31/31 layers to GPU",
        "load_tensors:          AMX model buffer size =    95.34 MiB",
        "load_tensors:   CPU_Mapped model buffer size =    92.10 MiB",
        *CPU_LOG[2:],
    ]
    report = _report(lines)
    assert set(report.device_bytes) == {"CPU"}
    assert report.gpu_layers == 0 and report.accelerator_bytes == 0
    assert report.total_bytes == sum(_mib(x) for x in (95.34, 92.10, 0.19, 30.00, 98.51))


def test_a_partial_offload_keeps_llama_cpps_count() -> None:
    lines = [
        "load_tensors: offloaded 8/25 layers to GPU",
        "load_tensors:        CUDA0 model buffer size =   120.00 MiB",
        "load_tensors:   CPU_Mapped model buffer size =   320.00 MiB",
    ]
    report = _report(lines)
    assert report.gpu_layers == 8
    assert report.device_bytes == {"CUDA0": _mib(120), "CPU": _mib(320)}


def test_an_offload_count_without_device_buffers_is_not_believed() -> None:
    """llama.cpp prints the layers it was asked to offload; only buffers on a device prove it."""
    report = _report(["load_tensors: offloaded 25/25 layers to GPU", *CPU_LOG])
    assert report.gpu_layers == 0


@pytest.mark.parametrize(
    ("buffer", "device"),
    [
        ("CPU", "CPU"),
        ("CPU_Mapped", "CPU"),
        ("CPU_REPACK", "CPU"),
        ("CPU_KLEIDIAI", "CPU"),
        ("AMX", "CPU"),  # weights repacked for Intel AMX, in host memory
        ("CUDA_Host", "CPU"),
        ("Vulkan_Host", "CPU"),
        ("CUDA0", "CUDA0"),
        ("CUDA1", "CUDA1"),
        ("MTL0_Mapped", "MTL0"),  # Metal's mapped file is in the GPU's unified memory
        ("Vulkan0", "Vulkan0"),
    ],
)
def test_buffer_types_name_their_device(buffer: str, device: str) -> None:
    assert device_of_buffer(buffer) == device


def test_other_log_lines_change_nothing() -> None:
    report = _report(["llama_kv_cache: size =   30.00 MiB (  256 cells,  30 layers)", "hello"])
    assert report.device_bytes == {} and report.gpu_layers == 0


# -- pollama ps ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "vram", "shown"),
    [
        (1000, 0, "100% CPU"),
        (1000, 1000, "100% GPU"),
        (1000, 520, "48%/52% CPU/GPU"),
        (8, 7, "13%/87% CPU/GPU"),  # 12.5% on the CPU: Go rounds half away from zero
        (8, 1, "88%/12% CPU/GPU"),  # 87.5%
        (1000, 1001, "Unknown"),
        (0, 5, "Unknown"),
        (0, 0, "100% CPU"),
    ],
)
def test_processor_column_is_ollamas(size: int, vram: int, shown: str) -> None:
    assert _processor(size, vram) == shown


# -- the device inventory -------------------------------------------------------------------


CPU = DeviceInfo("CPU", "AMD EPYC", "cpu", 64 * GIB, 60 * GIB)
H200 = DeviceInfo("CUDA0", "NVIDIA H200", "gpu", 140 * GIB, 139 * GIB)
CPU_BUILD = DeviceInventory(devices=(CPU,), build=BuildInfo(backends=("CPU",)))
CUDA_NO_DEVICE = DeviceInventory(devices=(CPU,), build=BuildInfo(backends=("CUDA", "CPU")))
CUDA = DeviceInventory(devices=(H200, CPU), build=BuildInfo(("CUDA", "CPU"), gpu_offload=True))


def test_a_gpu_build_without_a_gpu_is_told_apart_from_a_cpu_build() -> None:
    assert not CPU_BUILD.build.accelerator
    assert "CPU-only build" in CPU_BUILD.no_accelerator_reason()
    assert CUDA_NO_DEVICE.build.accelerator
    assert "the CUDA backend found no device" in CUDA_NO_DEVICE.no_accelerator_reason()
    assert CUDA.no_accelerator_reason() == ""
    assert BuildInfo(("CPU", "BLAS", "RPC")).accelerator is False


def test_inventory_json_round_trips() -> None:
    data = json.loads(json.dumps(CUDA.to_json()))
    assert data["build"] == {"backends": ["CUDA", "CPU"], "accelerator": True, "gpu_offload": True}
    assert DeviceInventory.from_json(data) == CUDA


def test_offload_devices_follow_llama_cpps_numbering() -> None:
    igpu = DeviceInfo("Vulkan1", "Radeon 780M", "igpu", 8 * GIB, 8 * GIB)
    gpu = DeviceInfo("Vulkan0", "RTX 4090", "gpu", 24 * GIB, 23 * GIB)
    assert offload_devices([CPU, igpu, gpu]) == [gpu]  # integrated ones only without a GPU
    assert offload_devices([CPU, igpu]) == [igpu]
    assert offload_devices([CPU]) == []


def _info(gpu_layers: int, layers: int = 25) -> RunnerInfo:
    return RunnerInfo(1, 256, 8192, 1, 100, 0, 0, gpu_layers=gpu_layers, layers=layers)


def test_shortfall_compares_the_report_with_the_plan() -> None:
    spec = LoadSpec(model_path="m", num_ctx=256, gpu_layers=-1)
    assert offload_shortfall(spec, _info(25), CUDA) == ""
    assert offload_shortfall(spec, _info(0), CPU_BUILD).startswith("0 of 25 planned layers")
    assert "CPU-only build" in offload_shortfall(spec, _info(0), CPU_BUILD)
    eight = dataclasses.replace(spec, gpu_layers=8)
    assert offload_shortfall(eight, _info(8), CUDA) == ""
    assert offload_shortfall(eight, _info(5), CUDA) == "5 of 8 planned layers went to the GPU"
    assert offload_shortfall(dataclasses.replace(spec, gpu_layers=0), _info(0), CPU_BUILD) == ""
    assert offload_shortfall(spec, _info(0, layers=0), CPU_BUILD).startswith("0 of all")


def test_planned_cpu_reason_names_why() -> None:
    cpu_spec = LoadSpec(model_path="m", num_ctx=256)
    assert "CPU-only build" in planned_cpu_reason(cpu_spec, CPU_BUILD)
    assert "found no device" in planned_cpu_reason(cpu_spec, CUDA_NO_DEVICE)
    assert "does not fit" in planned_cpu_reason(cpu_spec, CUDA)
    assert planned_cpu_reason(dataclasses.replace(cpu_spec, gpu_layers=4), CUDA) == ""


def test_probe_lists_this_machines_cpu() -> None:
    """The real query, in a subprocess as the server makes it: this CPU build's CPU device."""
    inventory = probe_devices(timeout=120)
    assert inventory.error == ""
    cpus = [d for d in inventory.devices if d.kind == "cpu"]
    assert cpus and cpus[0].name == "CPU"
    assert cpus[0].total_bytes > 0 and cpus[0].free_bytes > 0
    assert "CPU" in inventory.build.backends
    if not inventory.build.accelerator:  # this machine's CPU-only build
        assert not inventory.accelerators() and not inventory.build.gpu_offload


def test_the_module_prints_json() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pollama.runner.devices"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    data = json.loads(done.stdout)
    assert {"devices", "build", "error"} <= set(data)
    assert any(d["kind"] == "cpu" and d["total_bytes"] > 0 for d in data["devices"])


def test_a_failed_probe_is_an_inventory_with_the_reason() -> None:
    inventory = probe_devices(timeout=10, python="/nonexistent/python")
    assert inventory.devices == () and "could not start" in inventory.error
    assert inventory.no_accelerator_reason().startswith("the device inventory failed")


# -- the scheduler ----------------------------------------------------------------------------


class PlacedRunner(FakeRunner):
    """A fake whose worker reports a placement (as ``runner/worker.py`` does from the log)."""

    def __init__(self, spec: LoadSpec, device_bytes: dict[str, int], gpu_layers: int) -> None:
        super().__init__(spec)
        self.device_bytes = device_bytes
        self.gpu_layers = gpu_layers

    async def start(self) -> RunnerInfo:
        info = await super().start()
        return dataclasses.replace(
            info,
            memory_bytes=sum(self.device_bytes.values()),
            device_bytes=self.device_bytes,
            gpu_layers=self.gpu_layers,
            layers=25,
        )


REF = ModelRef(key="/blobs/m", name="m:latest", digest="d", size=1000)


def _scheduler(runners: list[PlacedRunner], place: dict[str, int], layers: int,
               inventory: DeviceInventory, **settings: Any) -> Scheduler:  # fmt: skip
    def factory(spec: LoadSpec) -> PlacedRunner:
        runner = PlacedRunner(spec, place, layers)
        runners.append(runner)
        return runner

    return Scheduler(load_settings({}, **settings), factory, inventory=inventory)


def test_size_vram_is_the_reported_non_cpu_part() -> None:
    place = {"CPU": 300 * MIB, "CUDA0": 700 * MIB}
    runners: list[PlacedRunner] = []

    async def go() -> None:
        sched = _scheduler(runners, place, 8, CUDA)
        spec = LoadSpec(model_path="/blobs/m", num_ctx=256, gpu_layers=8)
        async with sched.use(REF, spec):
            (row,) = sched.loaded()
            assert row.size == 1000 * MIB and row.size_vram == 700 * MIB
            assert dict(row.device_bytes) == place
            assert _processor(row.size, row.size_vram) == "30%/70% CPU/GPU"
        await sched.shutdown()

    asyncio.run(asyncio.wait_for(go(), 20))


def test_every_layer_offloaded_is_100_percent_gpu() -> None:
    """The input embeddings llama.cpp keeps in host memory do not make a fully offloaded
    model a CPU/GPU split (Ollama says "100% GPU"); the metrics still show those bytes."""
    place = {"CPU": _mib(68.06), "CUDA0": _mib(720.23)}
    runners: list[PlacedRunner] = []

    async def go() -> None:
        sched = _scheduler(runners, place, 25, CUDA)
        spec = LoadSpec(model_path="/blobs/m", num_ctx=256, gpu_layers=-1)
        async with sched.use(REF, spec):
            (row,) = sched.loaded()
            assert row.size == row.size_vram == sum(place.values())
            assert _processor(row.size, row.size_vram) == "100% GPU"
            assert dict(row.device_bytes) == place
        await sched.shutdown()

    asyncio.run(asyncio.wait_for(go(), 20))


def test_fewer_layers_than_planned_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    runners: list[PlacedRunner] = []

    async def go() -> None:
        sched = _scheduler(runners, {"CPU": 100 * MIB}, 0, CPU_BUILD)
        spec = LoadSpec(model_path="/blobs/m", num_ctx=256, gpu_layers=-1)
        async with sched.use(REF, spec):
            assert sched.loaded()[0].size_vram == 0
        await sched.shutdown()

    with caplog.at_level(logging.WARNING, logger="pollama.scheduler.scheduler"):
        asyncio.run(asyncio.wait_for(go(), 20))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("0 of 25 planned layers went to the GPU" in w and "CPU-only" in w
               for w in warnings), warnings  # fmt: skip


def test_require_gpu_refuses_a_cpu_plan_before_loading() -> None:
    runners: list[PlacedRunner] = []

    async def go() -> None:
        sched = _scheduler(runners, {"CPU": MIB}, 0, CPU_BUILD, require_gpu=True)
        with pytest.raises(AcceleratorUnavailable, match="POLLAMA_REQUIRE_GPU.*CPU-only build"):
            async with sched.use(REF, LoadSpec(model_path="/blobs/m", num_ctx=256)):
                pass
        await sched.shutdown()

    asyncio.run(asyncio.wait_for(go(), 20))
    assert runners == []  # nothing was loaded


def test_require_gpu_refuses_a_load_that_offloaded_nothing() -> None:
    runners: list[PlacedRunner] = []

    async def go() -> None:
        sched = _scheduler(runners, {"CPU": MIB}, 0, CUDA_NO_DEVICE, require_gpu=True)
        spec = LoadSpec(model_path="/blobs/m", num_ctx=256, gpu_layers=-1)
        with pytest.raises(AcceleratorUnavailable, match="found no device"):
            async with sched.use(REF, spec):
                pass
        assert sched.loaded() == []
        await sched.shutdown()

    asyncio.run(asyncio.wait_for(go(), 20))
    assert runners[0].closed


# -- /api/status, /api/ps, /metrics -------------------------------------------------------


def _app(tmp_path: Path, place: dict[str, int], layers: int, **settings: Any) -> TestClient:
    s = load_settings({}, **settings)

    def factory(spec: LoadSpec) -> PlacedRunner:
        return PlacedRunner(spec, place, layers)

    app = create_app(s, runner_factory=factory, inventory=CUDA)
    client = TestClient(app, base_url=BASE)
    client.__enter__()
    create_models(client, write_tiny_model(tmp_path / "tiny.gguf"), {"tiny": {}})
    return client


def test_status_lists_the_devices(tmp_path: Path) -> None:
    client = _app(tmp_path, {"CPU": MIB}, 0)
    try:
        body = client.get("/api/status").json()
        assert body["cloud"] == {"disabled": True, "source": "none"}
        assert [d["name"] for d in body["devices"]] == ["CUDA0", "CPU"]
        assert body["devices"][0] == {
            "name": "CUDA0", "description": "NVIDIA H200", "kind": "gpu",
            "total_bytes": 140 * GIB, "free_bytes": 139 * GIB, "accelerator": True,
        }  # fmt: skip
        assert body["build"]["accelerator"] is True and body["error"] == ""
        assert client.app.state.devices == [H200, CPU]  # type: ignore[attr-defined]
    finally:
        client.__exit__(None, None, None)


def test_ps_and_metrics_show_the_reported_split(tmp_path: Path) -> None:
    place = {"CPU": 48 * MIB, "CUDA0": 52 * MIB}
    client = _app(tmp_path, place, 12)  # 12 of 25 layers offloaded
    try:
        r = client.post("/api/generate", json={"model": "tiny", "prompt": "", "stream": False})
        assert r.status_code == 200, r.text
        (row,) = client.get("/api/ps").json()["models"]
        assert row["size"] == 100 * MIB and row["size_vram"] == 52 * MIB
        assert _processor(row["size"], row["size_vram"]) == "48%/52% CPU/GPU"
        got = _samples(client.get("/metrics").text)
        assert got["pollama_device_memory_total_bytes", ("CUDA0", "gpu")] == 140 * GIB
        assert got["pollama_device_memory_free_bytes", ("CPU", "cpu")] == 60 * GIB
        assert got["pollama_model_device_bytes", ("CUDA0", "tiny:latest")] == 52 * MIB
        assert got["pollama_model_device_bytes", ("CPU", "tiny:latest")] == 48 * MIB
    finally:
        client.__exit__(None, None, None)


def _samples(text: str) -> dict[tuple[str, tuple[str, ...]], float]:
    """The Prometheus text's samples by name and label values (labels sorted by name)."""
    return {
        (sample.name, tuple(v for _, v in sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_require_gpu_is_a_503_naming_why(tmp_path: Path) -> None:
    client = _app(tmp_path, {"CPU": MIB}, 0, require_gpu=True)
    try:
        r = client.post("/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False})
        assert r.status_code == 503
        error = r.json()["error"]
        assert "POLLAMA_REQUIRE_GPU is set and tiny:latest would run on the CPU" in error
    finally:
        client.__exit__(None, None, None)
