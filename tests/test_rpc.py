"""llama.cpp's RPC backend, without llama.cpp (README.md#rpc): ``pollama rpc``'s refusal of a
non-loopback address without the flag and its warning, ``OLLAMA_RPC_SERVERS`` and the
presets' ``tensor_split``, the split plan over RPC devices (its counts, ``tensor_split`` and
``rpc_servers`` as the worker will see them), which servers a load may use (down, held by
another model), and a crash detail naming the server that went away. The real servers are
in ``tests/test_e2e_rpc.py``."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pollama.cli import rpc as rpc_cli
from pollama.config import load_settings, read_config_file
from pollama.config.presets import PresetProblem, parse_preset
from pollama.errors import RpcServerUnavailable
from pollama.inference.service import InferenceService
from pollama.runner.base import DeviceInfo, LoadSpec, rpc_endpoint
from pollama.runner.devices import offload_devices
from pollama.runner.process import _name_lost_servers
from pollama.runner.rpc import device_name, split_endpoint, unreachable
from pollama.scheduler import MemoryInfo
from pollama.scheduler.memory import footprint
from pollama.scheduler.placement import Offload, plan_offload, usable_devices
from test_placement import qwen_like

MiB, GiB = 1 << 20, 1 << 30
CPU = DeviceInfo("CPU", "host", "cpu", 64 * GiB, 30 * GiB)
RPC_A = DeviceInfo(device_name(0, "127.0.0.1:50052"), "RPC server", "gpu", 64 * GiB, 30 * GiB)
RPC_B = DeviceInfo(device_name(0, "127.0.0.1:50053"), "RPC server", "gpu", 64 * GiB, 30 * GiB)
CUDA = DeviceInfo("CUDA0", "NVIDIA H100", "gpu", 80 * GiB, 79 * GiB)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _up_and_down() -> Iterator[tuple[str, str]]:
    """Two loopback endpoints: one that takes connections, one where nothing listens."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        yield f"127.0.0.1:{server.getsockname()[1]}", f"127.0.0.1:{_closed_port()}"


# -- pollama rpc ------------------------------------------------------------------------------


class _Child:
    def __init__(self, command: list[str]) -> None:
        self.command = command

    def wait(self) -> int:
        return 0


def _rpc(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Any, list[list[str]]]:
    started: list[list[str]] = []

    def popen(command: list[str]) -> _Child:
        started.append(command)
        return _Child(command)

    monkeypatch.setattr(rpc_cli.subprocess, "Popen", popen)
    result = CliRunner().invoke(rpc_cli.rpc, list(args))
    return result, started


def test_rpc_listens_on_loopback_by_default_and_says_how_to_tunnel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result, started = _rpc(monkeypatch)
    assert result.exit_code == 0, result.output
    assert started[0][-7:] == ["serve", "--host", "127.0.0.1", "--port", "50052",
                               "--threads", "0"]  # fmt: skip
    assert "listening on 127.0.0.1:50052 (this machine only)" in result.output
    assert "ssh -N -L 50052:127.0.0.1:50052" in result.output
    assert "WARNING" not in result.output


def test_rpc_refuses_a_network_address_without_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    result, started = _rpc(monkeypatch, "--host", "0.0.0.0")
    assert result.exit_code == 2 and not started
    assert "refusing to listen on 0.0.0.0" in result.output
    assert rpc_cli.RISK_FLAG in result.output
    assert "ssh -L" in result.output and "WireGuard" in result.output


def test_rpc_with_the_flag_listens_there_and_warns_what_an_attacker_can_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result, started = _rpc(monkeypatch, "--host", "10.0.0.5", "--port", "6000",
                           rpc_cli.RISK_FLAG)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert started[0][-6:-2] == ["--host", "10.0.0.5", "--port", "6000"]
    text = " ".join(result.output.split())
    assert "WARNING: llama.cpp's RPC protocol has no authentication and no encryption" in text
    assert "Anyone who can reach 10.0.0.5:6000" in text
    assert "read and overwrite the model weights and prompts" in text
    assert "crash this process or run code in it" in text
    assert "ssh -N -L" in text and "WireGuard" in text


@pytest.mark.parametrize(("host", "accepted"), [
    ("localhost", "127.0.0.1"), ("127.0.0.2", "127.0.0.2"), ("::1", None), ("my-host", None),
])  # fmt: skip
def test_rpc_takes_ipv4_addresses_only(host: str, accepted: str | None) -> None:
    if accepted is None:
        with pytest.raises(rpc_cli.click.UsageError, match="IPv4"):
            rpc_cli.listen_address(host, accept_risk=True)
    else:
        assert rpc_cli.listen_address(host, accept_risk=False) == accepted


def test_rpc_failing_server_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Child, "wait", lambda self: 1)
    result, _ = _rpc(monkeypatch, "--port", "7000")
    assert result.exit_code == 1
    assert "the RPC server on 127.0.0.1:7000 stopped (exit status 1)" in result.output


# -- settings and presets -------------------------------------------------------------------


def test_rpc_servers_setting_is_a_host_port_list() -> None:
    assert load_settings({}).rpc_servers == ()
    env = {"OLLAMA_RPC_SERVERS": " 10.0.0.2:50052, gpu-box:50053,10.0.0.2:50052 "}
    assert load_settings(env).rpc_servers == ("10.0.0.2:50052", "gpu-box:50053")


@pytest.mark.parametrize("value", ["10.0.0.2", "host:port", "a:0", ":50052", "a:70000"])
def test_a_bad_rpc_server_keeps_the_default(value: str, caplog: pytest.LogCaptureFixture) -> None:
    assert load_settings({"OLLAMA_RPC_SERVERS": value}).rpc_servers == ()
    assert "OLLAMA_RPC_SERVERS" in caplog.text


def test_rpc_servers_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "pollama.toml"
    path.write_text('rpc_servers = ["127.0.0.1:50052", "127.0.0.1:50053"]\n')
    path.chmod(0o600)
    config = read_config_file({"POLLAMA_CONFIG": str(path), "HOME": str(tmp_path)})
    settings = load_settings({}, config_file=config)
    assert settings.rpc_servers == ("127.0.0.1:50052", "127.0.0.1:50053")


def test_preset_tensor_split() -> None:
    preset, unknown = parse_preset({"tensor_split": [3, 1, 0.5], "num_gpu": 20})
    assert (preset.tensor_split, unknown) == ((3.0, 1.0, 0.5), [])
    assert "tensor_split=(3.0, 1.0, 0.5)" in preset.describe()
    assert "tensor_split" not in parse_preset({"num_ctx": 8})[0].describe()


@pytest.mark.parametrize("value", [[], [0, 0], [-1, 2], [1, "2"], [True], 3, [float("nan")],
                                   [1] * 17])  # fmt: skip
def test_preset_tensor_split_refuses(value: Any) -> None:
    with pytest.raises(PresetProblem):
        parse_preset({"tensor_split": value})


# -- endpoints, device names, order ----------------------------------------------------------


def test_endpoints_and_device_names() -> None:
    assert split_endpoint("10.0.0.2:50052") == ("10.0.0.2", 50052)
    for bad in ("10.0.0.2", "a:b", ":1", "a:0"):
        with pytest.raises(ValueError):
            split_endpoint(bad)
    assert RPC_A.name == "RPC0[127.0.0.1:50052]"
    assert (RPC_A.endpoint, CPU.endpoint, CUDA.endpoint) == ("127.0.0.1:50052", "", "")
    assert rpc_endpoint("CUDA0") == ""


def test_unreachable_is_a_tcp_connect() -> None:
    with _up_and_down() as (up, down):
        assert unreachable([up, down, "nonsense"], timeout=2.0) == [down, "nonsense"]


def test_llama_cpp_numbers_rpc_devices_before_local_gpus() -> None:
    # The registry lists CUDA0 first; llama.cpp's loader puts the RPC servers in front.
    assert offload_devices([CUDA, CPU, RPC_A, RPC_B]) == [RPC_A, RPC_B, CUDA]
    igpu = DeviceInfo("Vulkan0", "iGPU", "igpu", 8 * GiB, 8 * GiB)
    assert offload_devices([igpu, CPU, RPC_A]) == [RPC_A, igpu]


def test_load_spec_carries_its_rpc_servers() -> None:
    spec = LoadSpec("/m.gguf", 2048, tensor_split=(8.0, 8.0), rpc_servers=("a:1", "b:2"))
    assert LoadSpec.from_json(spec.to_json()) == spec
    assert LoadSpec.from_json({"model_path": "/m.gguf", "num_ctx": 8}).rpc_servers == ()


# -- the split plan ---------------------------------------------------------------------------

SPEC = LoadSpec("/m.gguf", 2048)


def test_two_rpc_servers_and_the_cpu_share_the_layers_by_free_memory() -> None:
    info = qwen_like()  # 24 blocks + the output: 25 layers
    offload = plan_offload(info, SPEC, [CPU, RPC_A, RPC_B])
    # Three devices with about the same free memory: a third each, the CPU first (a remote
    # device's room is less the reserve every accelerator keeps: the CPU gets the extra one).
    assert offload.gpu_layers == 16
    assert offload.tensor_split == (8.0, 8.0)
    assert offload.rpc_servers == ("127.0.0.1:50052", "127.0.0.1:50053")
    assert set(offload.device_bytes) == {RPC_A.name, RPC_B.name}
    fp = footprint(info, SPEC)
    assert offload.host_bytes == fp.host_bytes(16)
    assert "split by free memory" in offload.reason
    assert "9 of 25 layers on the CPU" in offload.reason
    spec = offload.apply(SPEC)
    assert (spec.gpu_layers, spec.rpc_servers) == (16, offload.rpc_servers)


def test_with_a_local_gpu_the_cpu_takes_no_share() -> None:
    offload = plan_offload(qwen_like(), SPEC, [CUDA, CPU, RPC_A])
    assert offload.gpu_layers == 25
    # llama.cpp's order: RPC0 first, then CUDA0; shares by room (30 GiB vs 79 GiB).
    assert offload.tensor_split == (7.0, 18.0)
    assert offload.rpc_servers == ("127.0.0.1:50052",)


def test_preset_split_and_num_gpu() -> None:
    offload = plan_offload(qwen_like(), SPEC, [CPU, RPC_A, RPC_B], num_gpu=10, split=(3, 1))
    assert (offload.gpu_layers, offload.tensor_split) == (10, (8.0, 2.0))
    assert "in the preset's shares" in offload.reason
    with pytest.raises(Exception, match="tensor_split names 3 devices; there are 2"):
        plan_offload(qwen_like(), SPEC, [CPU, RPC_A, RPC_B], split=(1, 1, 1))


def test_a_server_with_no_share_is_not_connected() -> None:
    offload = plan_offload(qwen_like(), SPEC, [CPU, RPC_A, RPC_B], split=(1, 0))
    assert offload.rpc_servers == ("127.0.0.1:50052",)
    assert offload.tensor_split == (25.0,)
    assert set(offload.device_bytes) == {RPC_A.name}


def test_num_gpu_zero_and_main_gpu_keep_their_meaning() -> None:
    assert plan_offload(qwen_like(), SPEC, [CPU, RPC_A], num_gpu=0).rpc_servers == ()
    main = plan_offload(qwen_like(), SPEC, [CPU, RPC_A, RPC_B], main_gpu=1)
    assert set(main.device_bytes) == {RPC_B.name}
    assert main.rpc_servers == ("127.0.0.1:50052", "127.0.0.1:50053")  # indexes must match


def test_usable_devices_leave_out_down_and_held_servers() -> None:
    checked: list[list[str]] = []

    def check(endpoints: list[str]) -> list[str]:
        checked.append(endpoints)
        return [e for e in endpoints if e.endswith("50053")]

    devices = [CPU, RPC_A, RPC_B]
    kept, down, busy = usable_devices(devices, {}, (), check)
    assert (kept, down, busy) == ([CPU, RPC_A], ["127.0.0.1:50053"], [])
    # Another model holds 50052: not used, and not even connected to.
    kept, down, busy = usable_devices(devices, {RPC_A.name: GiB, "CPU": GiB}, (), check)
    assert (kept, busy) == ([CPU], ["127.0.0.1:50052"])
    assert checked[-1] == ["127.0.0.1:50053"]
    # This model's own runner holds it, and a new load replaces that runner: not held.
    kept, _, busy = usable_devices(devices, {RPC_A.name: GiB}, ("127.0.0.1:50052",), check)
    assert (kept, busy) == ([CPU, RPC_A], [])
    assert checked[-1] == ["127.0.0.1:50052", "127.0.0.1:50053"]
    assert usable_devices([CPU, CUDA], {}, (), check)[0] == [CPU, CUDA]


def test_a_server_down_at_load_time_is_a_clear_error_when_the_model_needs_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec = LoadSpec("/models/big.gguf", 2048)
    plan = Offload(host_bytes=40 * GiB, reason="every layer on the CPU")
    monkeypatch.setattr(
        "pollama.inference.service.system_memory", lambda: MemoryInfo(64 * GiB, 16 * GiB)
    )
    with pytest.raises(RpcServerUnavailable) as caught:
        InferenceService._without_servers(None, spec, plan, ["10.0.0.9:50052"])  # type: ignore[arg-type]
    assert str(caught.value) == (
        "RPC server 10.0.0.9:50052 is unreachable (connection failed), and big.gguf needs "
        "42 GB on this machine without it (17 GB available)"
    )
    small = Offload(host_bytes=GiB, reason="every layer on the CPU")
    InferenceService._without_servers(None, spec, small, ["10.0.0.9:50052"])  # type: ignore[arg-type]
    assert "RPC server 10.0.0.9:50052 is unreachable: loading without it" in caplog.text


# -- a worker that lost its server --------------------------------------------------------------


def test_a_crash_detail_names_the_server_that_went_away() -> None:
    with _up_and_down() as (up, down):
        abort = "ggml-rpc.cpp:566: Remote RPC server crashed or returned malformed response"
        named = asyncio.run(_name_lost_servers(abort, [up, down]))
        assert named == f"RPC server {down} is unreachable ({abort})"
        assert asyncio.run(_name_lost_servers("signal: aborted", [up])) == "signal: aborted"
