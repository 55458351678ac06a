"""GPU offload on this CPU-only build, for real: the worker's report after loading the default
model (every byte on the CPU, no layer offloaded, whatever was asked), the scheduler's
warning when the plan wanted layers on a GPU, and a real ``pollama serve``: its start-up
device log, ``/api/status``, ``/api/ps`` ``size_vram`` 0, ``pollama ps`` "100% CPU", and
``POLLAMA_REQUIRE_GPU=1`` turning the load into a 503 that says why."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, RunningServer, start_server, stop_server
from pollama.config import load_settings
from pollama.default_model import default_gguf_path, default_modelfile
from pollama.runner.base import LoadSpec
from pollama.runner.devices import probe_devices
from pollama.runner.process import subprocess_factory
from pollama.scheduler import ModelRef, Scheduler
from test_worker import WorkerClient

pytestmark = pytest.mark.slow


def _spec(**fields: object) -> LoadSpec:
    return LoadSpec(model_path=str(default_gguf_path()), num_ctx=256, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "placement",
    [{}, {"gpu_layers": -1}, {"gpu_layers": 8, "main_gpu": 0, "tensor_split": (1.0,)}],
    ids=["cpu-plan", "all-layers", "split"],
)
def test_the_worker_reports_everything_on_the_cpu(placement: dict[str, object]) -> None:
    """llama.cpp takes the offload parameters on a CPU build and offloads nothing; the
    worker's report, read from llama.cpp's own log, says so."""
    worker = WorkerClient(_spec(**placement))
    try:
        assert worker.ready["type"] == "ready", worker.ready
        info = worker.ready["info"]
        assert set(info["device_bytes"]) == {"CPU"}
        assert info["device_bytes"]["CPU"] == info["memory_bytes"] > 50 << 20
        assert info["gpu_layers"] == 0
        assert info["layers"] == 31  # SmolLM2-135M: 30 repeating layers and the output layer
    finally:
        assert worker.close() == 0


def test_a_plan_for_the_gpu_on_a_cpu_build_warns(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings({})
    inventory = probe_devices(timeout=120)
    ref = ModelRef(key=str(default_gguf_path()), name="smollm2:135m")

    async def go() -> None:
        sched = Scheduler(settings, subprocess_factory(settings), inventory=inventory)
        try:
            async with sched.use(ref, _spec(gpu_layers=-1)) as lease:
                assert lease.info.gpu_layers == 0 and lease.info.vram_bytes == 0
                (row,) = sched.loaded()
                assert row.size_vram == 0 and row.size > 0
        finally:
            await sched.shutdown()

    with caplog.at_level(logging.WARNING, logger="pollama.scheduler.scheduler"):
        asyncio.run(asyncio.wait_for(go(), 120))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("0 of 31 planned layers went to the GPU" in w for w in warnings), warnings


def test_serve_shows_the_cpu_everywhere(model_server: RunningServer) -> None:
    srv = model_server
    r = httpx.post(f"{srv.url}/api/generate", json={"model": MODEL, "prompt": ""}, timeout=120)
    assert r.status_code == 200, r.text
    rows = [m for m in httpx.get(f"{srv.url}/api/ps").json()["models"] if m["name"] == MODEL]
    assert rows and rows[0]["size"] > 0 and rows[0]["size_vram"] == 0
    table = srv.cli("ps", check=True).stdout.splitlines()
    assert "PROCESSOR" in table[0]
    assert any(MODEL in line and "100% CPU" in line for line in table[1:]), table
    status = httpx.get(f"{srv.url}/api/status").json()
    cpus = [d for d in status["devices"] if d["name"] == "CPU"]
    assert cpus and cpus[0]["total_bytes"] > 0 and cpus[0]["accelerator"] is False
    assert "CPU" in status["build"]["backends"] and status["error"] == ""
    log = srv.log.read_text()
    assert "inference compute name=CPU" in log and 'total="' in log


def test_require_gpu_makes_a_cpu_load_an_error(tmp_path: Path) -> None:
    srv = start_server(tmp_path, {"POLLAMA_REQUIRE_GPU": "1"})
    try:
        modelfile = tmp_path / "Modelfile"
        modelfile.write_text(default_modelfile())
        srv.cli("create", MODEL, "-f", str(modelfile), check=True, timeout=300)
        r = httpx.post(
            f"{srv.url}/api/generate",
            json={"model": MODEL, "prompt": "hi", "stream": False},
            timeout=120,
        )
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert f"POLLAMA_REQUIRE_GPU is set and {MODEL} would run on the CPU" in error
        inventory = probe_devices(timeout=120)
        if not inventory.build.accelerator:
            assert "CPU-only build" in error
        assert httpx.get(f"{srv.url}/api/ps").json()["models"] == []
    finally:
        stop_server(srv)
