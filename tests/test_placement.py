"""Where a model's layers go (``scheduler/placement.py``), against scripted device inventories:
one GPU that holds everything, one too small, overhead, ``num_gpu``, two GPUs packed or
spread (``OLLAMA_SCHED_SPREAD``), CPU-only and iGPU inventories, the projector, the KV cache
type and context; and the scheduler evicting to make room on the device. No model loads."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from fake_runner import FakeRunnerFactory
from ggufgen import write_tiny_model
from pollama.config import load_settings
from pollama.gguf import GGUFInfo, TensorInfo, read_gguf
from pollama.runner.base import DeviceInfo, LoadSpec
from pollama.runner.devices import DeviceInventory
from pollama.scheduler import MemoryInfo, ModelRef, Scheduler
from pollama.scheduler.memory import (
    compute_buffer_bytes,
    estimate_memory,
    footprint,
    kv_cache_bytes,
    kv_cache_bytes_per_layer,
)
from pollama.scheduler.placement import DEVICE_RESERVE, Offload, device_room, plan_offload

MiB, GiB = 1 << 20, 1 << 30
N_LAYER = 24
CPU = DeviceInfo("CPU", "host", "cpu", 64 * GiB, 48 * GiB)


def qwen_like(n_layer: int = N_LAYER, layer: int = 20 * MiB, tied: bool = True) -> GGUFInfo:
    """A Qwen2.5-0.5B-shaped header (896 wide, 14 heads, 2 KV heads, a 151,936-token vocab,
    a tied output) with its tensor table: ``layer`` bytes of weights per block."""
    embd, vocab = 896, 151936
    tensors = [TensorInfo("token_embd.weight", "q8_0", (embd, vocab), 0, 140 * MiB)]
    for i in range(n_layer):
        tensors.append(TensorInfo(f"blk.{i}.attn_q.weight", "q8_0", (embd, embd), 0, layer // 4))
        tensors.append(TensorInfo(f"blk.{i}.ffn_up.weight", "q8_0", (embd, 4864), 0, layer // 2))
        tensors.append(TensorInfo(f"blk.{i}.ffn_down.weight", "q8_0", (4864, embd), 0, layer // 4))
    tensors.append(TensorInfo("output_norm.weight", "f32", (embd,), 0, embd * 4))
    if not tied:
        tensors.append(TensorInfo("output.weight", "q8_0", (embd, vocab), 0, 140 * MiB))
    kv = {
        "general.architecture": "qwen2",
        "qwen2.block_count": n_layer,
        "qwen2.context_length": 32768,
        "qwen2.embedding_length": embd,
        "qwen2.feed_forward_length": 4864,
        "qwen2.attention.head_count": 14,
        "qwen2.attention.head_count_kv": 2,
        "qwen2.vocab_size": vocab,
    }
    size = sum(t.nbytes for t in tensors) + 6 * MiB  # the header: vocabulary strings
    return GGUFInfo(version=3, kv=kv, tensors=tensors, file_size=size)


def gpu(name: str, free: int, total: int | None = None, kind: str = "gpu") -> DeviceInfo:
    return DeviceInfo(name, f"{name} card", kind, total or max(free, 24 * GiB), free)


SPEC = LoadSpec(model_path="/blobs/m", num_ctx=4096)
INFO = qwen_like()
FP = footprint(INFO, SPEC)
ALL = N_LAYER + 1  # num_gpu counts the output layer
WHOLE = FP.graph + sum(FP.layers) + FP.output_device  # the device part of a full offload


def plan(devices: list[DeviceInfo], info: GGUFInfo = INFO, spec: LoadSpec = SPEC,
         **kw: Any) -> Offload:
    return plan_offload(info, spec, [CPU, *devices], **kw)


def room(free: int) -> int:
    return free - DEVICE_RESERVE


def test_one_gpu_that_holds_everything_takes_every_layer() -> None:
    offload = plan([gpu("CUDA0", 8 * GiB)])
    assert offload.gpu_layers == ALL == FP.n_layers
    assert offload.tensor_split == () and offload.main_gpu == 0  # llama.cpp's own split
    assert offload.device_bytes == {"CUDA0": WHOLE}
    # the host keeps the input embedding, the header and its share of the buffers
    assert offload.host_bytes == FP.host_bytes(ALL) < estimate_memory(INFO, SPEC) // 4
    assert "all 25 layers" in offload.reason
    spec = offload.apply(SPEC)
    assert (spec.gpu_layers, spec.main_gpu, spec.tensor_split) == (ALL, 0, ())
    assert estimate_memory(INFO, spec) == offload.host_bytes  # what the scheduler compares


def test_a_gpu_too_small_takes_part_of_the_layers_more_as_it_has_more() -> None:
    counts = []
    for free in range(DEVICE_RESERVE, DEVICE_RESERVE + WHOLE + 64 * MiB, 7 * MiB):
        offload = plan([gpu("CUDA0", free)])
        counts.append(offload.gpu_layers)
        used = offload.device_bytes.get("CUDA0", 0)
        assert used <= room(free)  # never more than the device offers
        assert offload.host_bytes == FP.host_bytes(offload.gpu_layers)
        if offload.gpu_layers == 0:
            assert offload == Offload(host_bytes=FP.host_bytes(0), reason=offload.reason)
    assert counts == sorted(counts)  # monotone in free memory
    assert counts[0] == 0 and counts[-1] == ALL
    assert set(range(1, N_LAYER + 1)) <= set(counts)  # every partial count along the way
    partial = plan([gpu("CUDA0", DEVICE_RESERVE + FP.graph + 10 * FP.layers[0] + MiB)])
    assert partial.gpu_layers == 10 and "10 of 25 layers" in partial.reason
    # llama.cpp offloads the last layers; the host keeps the first 14 and the output
    assert partial.host_bytes == (
        FP.host_rest + sum(FP.layers[:14]) + FP.output_host + FP.host_graph
    )


def test_the_output_layer_goes_only_once_every_block_is_offloaded() -> None:
    free = DEVICE_RESERVE + FP.graph + N_LAYER * FP.layers[0] + FP.output_device // 2
    offload = plan([gpu("CUDA0", free)])
    assert offload.gpu_layers == N_LAYER  # the blocks, not the output (it does not fit)
    assert offload.device_bytes == {"CUDA0": FP.graph + sum(FP.layers)}


def test_overhead_reduces_the_layers() -> None:
    free = DEVICE_RESERVE + WHOLE + MiB
    assert plan([gpu("CUDA0", free)]).gpu_layers == ALL
    fewer = plan([gpu("CUDA0", free)], overhead=FP.output_device + 5 * FP.layers[0])
    assert fewer.gpu_layers == N_LAYER - 5  # the output and five blocks give way
    assert plan([gpu("CUDA0", free)], overhead=free).gpu_layers == 0


def test_num_gpu_sets_the_layers_and_is_clamped() -> None:
    big = [gpu("CUDA0", 8 * GiB)]
    eight = plan(big, num_gpu=8)
    assert eight.gpu_layers == 8 and eight.reason.startswith("num_gpu 8")
    assert eight.device_bytes == {"CUDA0": FP.graph + sum(FP.layers[-8:])}
    assert plan(big, num_gpu=1000).gpu_layers == ALL  # clamped to blocks + output
    assert plan(big, num_gpu=-1).gpu_layers == ALL  # -1: as many as fit
    assert plan(big, num_gpu=0) == Offload(host_bytes=FP.host_bytes(0), reason=plan(
        big, num_gpu=0).reason)
    # asked for more than fits: the user's number all the same (Ollama passes -ngl as is)
    small = [gpu("CUDA0", DEVICE_RESERVE + FP.graph + 5 * FP.layers[0] + MiB)]
    forced = plan(small, num_gpu=20)
    assert forced.gpu_layers == 20 and "though about 5 fit" in forced.reason


def test_two_gpus_packed_onto_the_fewest_or_spread() -> None:
    devices = [gpu("CUDA0", 3 * GiB), gpu("CUDA1", 6 * GiB)]
    packed = plan(devices)
    assert packed.gpu_layers == ALL
    assert packed.tensor_split == (0.0, float(ALL))  # all on the one with more free memory
    assert packed.main_gpu == 1 and set(packed.device_bytes) == {"CUDA1"}
    spread = plan(devices, spread=True)  # OLLAMA_SCHED_SPREAD
    assert spread.gpu_layers == ALL and sum(spread.tensor_split) == ALL
    assert all(share >= N_LAYER // 2 for share in spread.tensor_split)  # round robin
    assert set(spread.device_bytes) == {"CUDA0", "CUDA1"}
    # each device pays the compute buffers, so spreading costs more device memory in all
    assert sum(spread.device_bytes.values()) == sum(packed.device_bytes.values()) + FP.graph
    # too big for either alone: both, even unasked, each within its room
    tight = [gpu("CUDA0", room(0) + 2 * DEVICE_RESERVE + WHOLE // 2),
             gpu("CUDA1", DEVICE_RESERVE + WHOLE // 2 + FP.graph)]
    both = plan(tight)
    assert all(share > 0 for share in both.tensor_split)
    for device in tight:
        assert both.device_bytes[device.name] <= room(device.free_bytes)
    # main_gpu names the one device that takes everything
    chosen = plan(devices, main_gpu=0)
    assert chosen.main_gpu == 0 and chosen.tensor_split == (float(ALL), 0.0)


@pytest.mark.parametrize(
    "devices",
    [
        [],
        [CPU],
        [CPU, gpu("iGPU0", 8 * GiB, kind="igpu")],
        [CPU, gpu("ACCEL", 8 * GiB, kind="accel")],
    ],
)
def test_without_a_usable_accelerator_the_spec_is_the_cpu_one(devices: list[DeviceInfo]) -> None:
    offload = plan_offload(INFO, SPEC, devices, num_gpu=99, main_gpu=1, spread=True)
    assert offload.apply(SPEC) == SPEC  # gpu_layers 0, main_gpu 0, tensor_split ()
    assert offload.device_bytes == {}
    old = INFO.file_size + kv_cache_bytes(INFO, SPEC) + compute_buffer_bytes(INFO, SPEC)
    assert offload.host_bytes == estimate_memory(INFO, SPEC) == old  # the estimate of before


def test_an_igpu_is_used_with_ollama_igpu_enable() -> None:
    offload = plan([gpu("Vulkan0", 8 * GiB, kind="igpu")], igpu=True)
    assert offload.gpu_layers == ALL and set(offload.device_bytes) == {"Vulkan0"}
    # with a discrete GPU there, llama.cpp numbers only that one
    both = plan([gpu("Vulkan0", 8 * GiB, kind="igpu"), gpu("CUDA0", 8 * GiB)], igpu=True)
    assert set(both.device_bytes) == {"CUDA0"} and both.tensor_split == ()


def test_the_projector_goes_on_the_device(tmp_path: Path) -> None:
    projector = tmp_path / "mmproj.gguf"
    projector.write_bytes(b"\0" * (3 * MiB))
    spec = LoadSpec(model_path="/blobs/m", num_ctx=4096, projectors=(str(projector),))
    with_it = plan([gpu("CUDA0", 8 * GiB)], spec=spec)
    assert with_it.device_bytes["CUDA0"] == WHOLE + 3 * MiB
    assert with_it.host_bytes == FP.host_bytes(ALL)  # none of it on the host
    on_cpu = plan([], spec=spec)
    assert on_cpu.host_bytes == FP.host_bytes(0) + 3 * MiB
    # on a device with just enough room, the projector costs a layer
    free = DEVICE_RESERVE + FP.graph + 10 * FP.layers[0] + MiB
    assert plan([gpu("CUDA0", free)], spec=spec).gpu_layers == 9


def test_kv_cache_type_and_num_ctx_change_the_fit() -> None:
    free = 1 * GiB
    big_ctx = LoadSpec(model_path="/blobs/m", num_ctx=32768, flash_attention=True)
    f16 = plan([gpu("CUDA0", free)], spec=big_ctx)
    q8 = plan([gpu("CUDA0", free)], spec=LoadSpec(
        model_path="/blobs/m", num_ctx=32768, flash_attention=True, kv_cache_type="q8_0"))
    assert 0 < f16.gpu_layers < q8.gpu_layers  # a q8_0 cache is about half an f16 one
    small_ctx = plan([gpu("CUDA0", free)], spec=LoadSpec(
        model_path="/blobs/m", num_ctx=2048, flash_attention=True))
    assert small_ctx.gpu_layers > f16.gpu_layers
    # the KV cache is split by layer and adds up exactly
    per_layer = kv_cache_bytes_per_layer(INFO, big_ctx)
    assert len(per_layer) == N_LAYER and sum(per_layer) == kv_cache_bytes(INFO, big_ctx)


def test_an_untied_output_is_its_own_tensor_on_the_device() -> None:
    info = qwen_like(tied=False)
    fp = footprint(info, SPEC)
    assert fp.output_host == fp.output_device == 140 * MiB + 896 * 4
    tied = footprint(INFO, SPEC)
    assert tied.output_host == 896 * 4 and tied.output_device == 140 * MiB + 896 * 4


def test_a_real_gguf_is_split_by_its_tensor_table(tmp_path: Path) -> None:
    info = read_gguf(write_tiny_model(tmp_path / "tiny.gguf", n_layer=3, n_embd=64))
    spec = LoadSpec(model_path="x", num_ctx=256)
    fp = footprint(info, spec)
    blocks = [sum(t.nbytes for t in info.tensors if t.name.startswith(f"blk.{i}."))
              for i in range(3)]
    assert list(fp.layers) == [b + k for b, k in zip(blocks, kv_cache_bytes_per_layer(
        info, spec), strict=True)]
    assert fp.host_bytes(0) == info.file_size + kv_cache_bytes(info, spec) + (
        compute_buffer_bytes(info, spec))
    # no tensor table: the file is split evenly by block
    bare = GGUFInfo(version=3, kv=info.kv, tensors=[], file_size=info.file_size)
    assert footprint(bare, spec).host_bytes(0) == fp.host_bytes(0)


def test_device_room_counts_what_loaded_runners_hold() -> None:
    device = gpu("CUDA0", free=10 * GiB, total=16 * GiB)
    assert device_room([CPU, device], {}, 0) == {"CUDA0": 10 * GiB - DEVICE_RESERVE}
    # a report taken before the runners loaded: their bytes come off the total
    assert device_room([device], {"CUDA0": 12 * GiB}, GiB) == {
        "CUDA0": 4 * GiB - GiB - DEVICE_RESERVE}
    assert device_room([device], {"CUDA0": 20 * GiB}, 0) == {"CUDA0": 0}


# -- the scheduler makes room on the device ----------------------------------------------------


def _ref(name: str, on_device: int) -> ModelRef:
    return ModelRef(key=f"/blobs/{name}", name=name, estimate_bytes=MiB,
                    device_bytes={"CUDA0": on_device} if on_device else {})


def _scheduler(factory: FakeRunnerFactory, free: int) -> Scheduler:
    inventory = DeviceInventory(devices=(CPU, gpu("CUDA0", free, total=free)))
    return Scheduler(load_settings({}), factory, inventory=inventory,
                     memory_probe=lambda: MemoryInfo(total=64 * GiB, available=48 * GiB))


def _live(factory: FakeRunnerFactory) -> list[str]:
    return sorted(r.spec.model_path for r in factory.live())


def test_a_model_that_does_not_fit_beside_another_on_the_device_evicts_it() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory()
        sched = _scheduler(factory, 8 * GiB)
        for name in ("a", "b"):  # 3 GiB each: both fit
            async with sched.use(_ref(name, 3 * GiB), LoadSpec(f"/blobs/{name}", 2048)):
                pass
        assert _live(factory) == ["/blobs/a", "/blobs/b"]
        assert sched.device_usage() == {"CUDA0": 6 * GiB}
        async with sched.use(_ref("c", 5 * GiB), LoadSpec("/blobs/c", 2048)):
            pass  # 5 GiB beside 6: the least recently used goes, then the next
        assert _live(factory) == ["/blobs/c"]
        async with sched.use(_ref("d", 0), LoadSpec("/blobs/d", 2048)):
            pass  # on the CPU: the device is not its concern
        assert _live(factory) == ["/blobs/c", "/blobs/d"]
        # too big for the device even alone: nothing else to evict, it loads as planned
        async with sched.use(_ref("e", 20 * GiB), LoadSpec("/blobs/e", 2048)):
            pass
        assert "/blobs/e" in _live(factory)
        await sched.shutdown()

    asyncio.run(asyncio.wait_for(body(), 20))
