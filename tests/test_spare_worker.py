"""The spare worker (``runner/spare.py``): a real worker process started ahead of the next
load, with llama.cpp imported, that a load takes over by sending it the spec; and its
lifecycle in a real ``pollama serve``."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from conftest import MODEL, default_model_server, stop_server
from pollama.config import load_settings
from pollama.default_model import default_gguf_path
from pollama.runner.base import CompletionRequest, LoadSpec, SamplingOptions
from pollama.runner.process import SubprocessRunner, WorkerFactory, subprocess_factory
from pollama.runner.protocol import decode, encode
from pollama.runner.spare import SpareWorkers

T = TypeVar("T")
WORKER = [sys.executable, "-m", "pollama.runner.worker"]


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 120))


def spec() -> LoadSpec:
    return LoadSpec(model_path=str(default_gguf_path()), num_ctx=512, num_parallel=1,
                    num_thread=2)


def factory(tmp_path: Path, **env: str) -> WorkerFactory:
    settings = load_settings({"OLLAMA_MODELS": str(tmp_path / "models"),
                              "POLLAMA_KV_CACHE_MAX_BYTES": "0", **env})
    return subprocess_factory(settings)


async def spare_pid(workers: WorkerFactory) -> int:
    """The pid of the spare once it started (fork and exec: its imports may still run)."""
    assert workers.spares is not None
    for _ in range(500):
        spare = workers.spares._spare
        if spare is not None:
            return spare.proc.pid
        await asyncio.sleep(0.01)
    raise AssertionError("no spare started")


async def greedy(runner: SubprocessRunner, prompt: str) -> str:
    request = CompletionRequest(prompt=prompt, options=SamplingOptions(temperature=0.0,
                                                                       num_predict=8))
    return "".join([c.text async for c in runner.completion(request)])


def test_a_load_takes_the_spare_and_closing_starts_the_next(tmp_path: Path) -> None:
    async def body() -> None:
        workers = factory(tmp_path)
        workers.start()
        first = await spare_pid(workers)
        runner = workers(spec())
        await runner.start()
        assert runner.pid == first  # the load went to the spare
        assert workers.spares is not None and workers.spares._spare is None  # not refilled yet
        text = await greedy(runner, "The capital of France is")
        await runner.close()
        second = await spare_pid(workers)  # closing a runner starts the next spare
        assert second != first
        again = workers(spec())
        await again.start()
        assert again.pid == second
        assert await greedy(again, "The capital of France is") == text  # the same model
        await again.close()
        await workers.aclose()
        assert workers.spares._spare is None
        assert not _alive(second) and not _alive(first)
        workers.start()  # closed: no spare any more
        await asyncio.sleep(0.2)
        assert workers.spares._spare is None

    run(body)


def test_a_spare_that_died_is_not_used(tmp_path: Path) -> None:
    async def body() -> None:
        workers = factory(tmp_path)
        workers.start()
        dead = await spare_pid(workers)
        os.kill(dead, 9)
        assert workers.spares is not None
        spare = workers.spares._spare
        assert spare is not None
        await spare.proc.wait()
        runner = workers(spec())
        await runner.start()  # a fresh worker, with the spec on its command line
        assert runner.pid != dead
        assert await greedy(runner, "Hello")
        await runner.close()
        await workers.aclose()

    run(body)


def test_a_spare_is_only_for_its_own_command_and_environment(tmp_path: Path) -> None:
    async def body() -> None:
        spares = SpareWorkers(WORKER, {"A": "1"})
        spares.start()
        assert await spares.take(WORKER, None) is None
        assert await spares.take(WORKER, {"A": "2"}) is None
        assert await spares.take([*WORKER, "--kv-cache", "x"], {"A": "1"}) is None
        spare = await spares.take(WORKER, {"A": "1"})
        assert spare is not None
        assert await spares.take(WORKER, {"A": "1"}) is None  # one spare, taken
        spare.sock.close()  # given up: it sees EOF and exits on its own, with 0
        assert await asyncio.wait_for(spare.proc.wait(), 60) == 0
        await spares.close()

    run(body)


def test_a_factory_nobody_started_leaves_no_process(tmp_path: Path) -> None:
    """Only the app's lifespan starts spares (and closes them): a factory used on its own,
    as a scheduler in a test uses it, never starts one, not even when a runner closes."""
    async def body() -> None:
        workers = factory(tmp_path)
        runner = workers(spec())
        await runner.start()
        await runner.close()
        await asyncio.sleep(0.3)
        assert workers.spares is not None
        assert workers.spares._spare is None and workers.spares._starting is None

    run(body)


def test_off_means_no_spare(tmp_path: Path) -> None:
    assert factory(tmp_path, POLLAMA_SPARE_WORKER="0").spares is None
    assert factory(tmp_path).spares is not None
    test_double = subprocess_factory(load_settings({}), command=[sys.executable, "-c", ""])
    assert test_double.spares is None  # a stand-in worker has no spare


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"type":"completion"}\n', "first message must be a load message"),
        (b'{"type":"load","spec":{"nope":1}}\n', "invalid load spec"),
        (b"not json\n", "invalid load spec"),
    ],
)
def test_a_spare_refuses_anything_but_a_load(line: bytes, error: str) -> None:
    parent, child = socket.socketpair()
    proc = subprocess.Popen([*WORKER, "--fd", str(child.fileno())], pass_fds=(child.fileno(),),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child.close()
    try:
        parent.sendall(line)
        with parent.makefile("rb") as stream:
            message = decode(stream.readline())
        assert message["type"] == "fatal" and error in message["message"]
        assert proc.wait(timeout=60) == 1
    finally:
        parent.close()
        if proc.poll() is None:
            proc.kill()


def test_a_spare_reads_only_its_load_line(tmp_path: Path) -> None:
    """The load message and the first operation may arrive together: the operation stays
    on the socket for the read loop."""
    parent, child = socket.socketpair()
    proc = subprocess.Popen([*WORKER, "--fd", str(child.fileno())], pass_fds=(child.fileno(),),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child.close()
    try:
        load = encode({"type": "load", "spec": spec().to_json()})
        parent.sendall(load + encode({"op": "tokenize", "id": 1, "text": "Hello",
                                      "add_special": False}))
        with parent.makefile("rb") as stream:
            assert decode(stream.readline())["type"] == "ready"
            reply = decode(stream.readline())
        assert reply["id"] == 1 and reply["tokens"], reply
    finally:
        parent.close()  # EOF: the worker exits
        assert proc.wait(timeout=30) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[-1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _waiting_spares(server_pid: int) -> list[int]:
    """The server's workers started without ``--spec``: its spares."""
    found = []
    for pid in _children(server_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"pollama.runner.worker" in argv and b"--spec" not in argv:
            found.append(pid)
    return found


@pytest.mark.slow
def test_a_real_server_keeps_one_spare_and_leaves_none_behind(tmp_path: Path) -> None:
    with default_model_server(tmp_path, {"OLLAMA_DEBUG": "1"}) as srv:
        deadline = time.monotonic() + 30
        while not (spares := _waiting_spares(srv.process.pid)):
            assert time.monotonic() < deadline, "the server started no spare"
            time.sleep(0.05)
        assert len(spares) == 1
        first = spares[0]
        body = {"model": MODEL, "prompt": "Hello", "stream": False,
                "options": {"num_predict": 4, "temperature": 0}}
        reply = httpx.post(f"{srv.url}/api/generate", json=body, timeout=120).json()
        assert reply["done"] and reply["eval_count"] > 0, reply
        assert f"started model runner pid {first} for" in srv.log.read_text()
        assert "(spare)" in srv.log.read_text()
        # the spare became the model's worker (its command line has no --spec), and no
        # other spare starts while it runs
        assert _waiting_spares(srv.process.pid) == [first]
        # unloading starts the next spare, and the model's worker exits
        httpx.post(f"{srv.url}/api/generate", json={"model": MODEL, "keep_alive": 0},
                   timeout=60).raise_for_status()
        deadline = time.monotonic() + 30
        while _waiting_spares(srv.process.pid) in ([], [first]):
            assert time.monotonic() < deadline, "no spare after the unload"
            time.sleep(0.05)
        left = [pid for pid in _waiting_spares(srv.process.pid) if pid != first]
        assert len(left) == 1
        stop_server(srv)
        for pid in left + [first]:
            deadline = time.monotonic() + 10
            while _alive(pid):
                assert time.monotonic() < deadline, f"worker {pid} outlived the server"
                time.sleep(0.05)
