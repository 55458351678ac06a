"""llama.cpp's RPC backend for real, on one machine over loopback (README.md#rpc): two
``pollama rpc`` processes and a ``pollama serve`` with ``OLLAMA_RPC_SERVERS`` pointing at
both. The default model loads split over three devices (this machine's CPU and the two
servers: ``/api/ps`` and ``/metrics``); its greedy output through the split equals the
local run's; an RPC process killed mid-stream ends the stream with an error line naming it,
the server keeps serving, and once the process is back the next request loads the split
again; a server down at load time leaves the model to the devices that are up, with a
warning (the refusal when the model does not fit without it is in ``test_rpc.py``); a
server down when the server started joins once it answers."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import MODEL, RunningServer, cpu_has_amx, default_model_server, free_port
from pollama.config import load_settings
from pollama.server.app import create_app
from pollama.server.rpc_watch import find_returned_servers

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "seed": 7, "num_ctx": 512, "num_predict": 24}
PROMPT = "List three facts about the Moon."


class RpcProcess:
    """One ``pollama rpc`` on a loopback port; restartable on the same port."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.endpoint = f"127.0.0.1:{port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pollama", "rpc", "--port", str(self.port),
                 "--threads", "1"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not _listening(self.port):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL to the server process itself (the CLI's child): a machine that died."""
        assert self.proc is not None
        children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                                  text=True).stdout.split()  # fmt: skip
        for pid in children:
            subprocess.run(["kill", "-KILL", pid], check=False)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def rpcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RpcProcess]]:
    folder = tmp_path_factory.mktemp("rpc")
    servers = [RpcProcess(free_port(), folder / f"rpc{i}.log") for i in range(2)]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, rpcs: list[RpcProcess]
        ) -> Iterator[RunningServer]:  # fmt: skip
    env = {"OLLAMA_RPC_SERVERS": ",".join(r.endpoint for r in rpcs),
           "OLLAMA_KEEP_ALIVE": "10m"}  # fmt: skip
    with default_model_server(tmp_path_factory.mktemp("home"), env) as running:
        yield running


def _generate(http: httpx.Client, keep_alive: str = "10m", **options: Any) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": PROMPT, "stream": False, "logprobs": True,
            "top_logprobs": 3, "keep_alive": keep_alive,
            "options": {**GREEDY, **options}}  # fmt: skip
    reply = http.post("/api/generate", json=body)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def _placed(http: httpx.Client) -> dict[str, float]:
    """The loaded model's bytes per device, from ``/metrics``."""
    text = http.get("/metrics").text
    pattern = r'pollama_model_device_bytes\{device="([^"]+)",model="[^"]+"\} (\S+)'
    return {device: float(size) for device, size in re.findall(pattern, text)}


def test_split_over_three_devices_matches_the_local_run(
    http: httpx.Client, srv: RunningServer, rpcs: list[RpcProcess]
) -> None:
    split = _generate(http)
    ps = http.get("/api/ps").json()["models"]
    assert len(ps) == 1 and 0 < ps[0]["size_vram"] < ps[0]["size"]
    placed = _placed(http)
    names = {"CPU", *(f"RPC0[{r.endpoint}]" for r in rpcs)}
    assert set(placed) == names, placed
    assert all(size > 1 << 20 for size in placed.values()), placed
    assert set(ps[0]["devices"]) == names  # /api/ps shows the split too
    table = srv.cli("ps", check=True).stdout.splitlines()
    assert table[0].split()[-1] == "DEVICES"
    assert all(f"RPC0[{r.endpoint}]" in table[1] for r in rpcs), table
    devices = http.get("/metrics").text
    for r in rpcs:
        assert f'pollama_device_memory_total_bytes{{device="RPC0[{r.endpoint}]",kind="gpu"}}' \
            in devices
    log = srv.log.read_text()
    assert "inference compute name=RPC0[" in log

    local = _generate(http, num_gpu=0)  # the same server, every layer on this CPU
    assert set(_placed(http)) == {"CPU"}
    # Unloaded: a loaded runner would serve the next automatic placement as it is
    # (Ollama's num_gpu -1 matches any loaded runner).
    assert http.post("/api/generate", json={"model": MODEL, "keep_alive": 0}).status_code == 200
    # With AMX the engine repacks the local layers' weights for the AMX kernels, which the
    # RPC servers' plain CPU backend does not.
    _same_greedy_run(split, local, repacked=cpu_has_amx())


def _same_greedy_run(split: dict[str, Any], local: dict[str, Any], repacked: bool) -> None:
    """The same CPU backend computes every layer on each side of the hop (the RPC servers
    run ggml's CPU backend too), so greedy decoding gives the same tokens, and the
    log-probabilities agree within float32 noise of the split's different graph.

    Where the local side runs the AMX kernels (``repacked``), its rounding differs from the
    plain kernels' more (measured here: log-probabilities up to 0.09 apart): the runs agree
    token for token, log-probabilities within 0.15, until the first near-tie (the split's
    token among the local run's top 3, within 0.3 of its choice), where either token may win
    and the texts part."""
    tolerance = 0.15 if repacked else 1e-3
    for a, b in zip(split["logprobs"], local["logprobs"], strict=True):
        if a["token"] != b["token"] and repacked:
            runner_up = {t["token"]: t["logprob"] for t in b["top_logprobs"]}
            assert a["token"] in runner_up, (a, b)
            assert b["logprob"] - runner_up[a["token"]] < 0.3, (a, b)
            return
        assert a["token"] == b["token"], (a, b)
        assert abs(a["logprob"] - b["logprob"]) < tolerance, (a, b)
    assert split["response"] == local["response"]


def test_an_rpc_server_killed_mid_stream_is_an_error_then_recovery(
    http: httpx.Client, srv: RunningServer, rpcs: list[RpcProcess]
) -> None:
    _generate(http, num_predict=4)  # loaded over both servers again
    victim = rpcs[1]
    body = {"model": MODEL, "prompt": PROMPT, "options": {**GREEDY, "num_predict": 400}}
    lines: list[dict[str, Any]] = []
    with http.stream("POST", "/api/generate", json=body) as reply:
        for raw in reply.iter_lines():
            if not raw:
                continue
            lines.append(json.loads(raw))
            if len(lines) == 3:
                victim.kill()
    assert "error" in lines[-1], (len(lines), lines[-1], srv.log.read_text()[-3000:])
    assert f"RPC server {victim.endpoint} is unreachable" in lines[-1]["error"]
    assert not lines[-1].get("done")
    assert http.get("/api/tags").status_code == 200  # the server keeps serving

    victim.start()  # back on the same port
    again = _generate(http, num_predict=8)
    assert again["done"] is True and again["eval_count"] > 0
    assert f"RPC0[{victim.endpoint}]" in _placed(http)


def test_a_server_down_at_load_time_is_left_out_with_a_warning(
    http: httpx.Client, srv: RunningServer, rpcs: list[RpcProcess]
) -> None:
    down = rpcs[0]
    down.kill()
    reply = _generate(http, num_ctx=640, num_predict=4)  # another spec: a fresh load
    assert reply["done"] is True
    placed = _placed(http)
    assert set(placed) == {"CPU", f"RPC0[{rpcs[1].endpoint}]"}, placed
    assert f"RPC server {down.endpoint} is unreachable: loading without it" in (
        srv.log.read_text())


def test_a_server_down_at_start_joins_when_it_comes_back(
    tmp_path: Path, isolated_env: Path
) -> None:
    """The inventory is taken at start; a listed server that was down then is found by the
    watcher (server/rpc_watch.py) once it answers, and the next load plans on it."""
    late = RpcProcess(free_port(), tmp_path / "late.log")
    settings = load_settings({"HOME": str(isolated_env), "OLLAMA_RPC_SERVERS": late.endpoint})
    app = create_app(settings)
    assert asyncio.run(find_returned_servers(app)) == []  # still down: nothing added
    late.start()
    try:
        assert asyncio.run(find_returned_servers(app)) == [late.endpoint]
        names = [d.name for d in app.state.scheduler.devices()]
        assert names == [f"RPC0[{late.endpoint}]"]
        assert [d.name for d in app.state.devices] == names  # what /metrics reads
        assert asyncio.run(find_returned_servers(app)) == []  # known now: not asked again
    finally:
        late.kill()
