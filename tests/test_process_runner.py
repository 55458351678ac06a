"""SubprocessRunner against a real child process speaking the worker protocol
(``tests/fakeworker.py``): routing, cancellation, crashes, load failures, close."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pollama.config import load_settings
from pollama.errors import InternalError, InvalidRequest, RunnerCrashed
from pollama.runner.base import (
    CompletionChunk,
    CompletionRequest,
    LoadSpec,
    Logprob,
    SamplingOptions,
    TokenLogprob,
)
from pollama.runner.process import SubprocessRunner, subprocess_factory

FAKE_WORKER = str(Path(__file__).with_name("fakeworker.py"))
SPEC = LoadSpec(model_path="/models/fake.gguf", num_ctx=2048, num_parallel=4)
T = TypeVar("T")


def make_runner(mode: str = "ok", **kwargs: Any) -> SubprocessRunner:
    command = [sys.executable, FAKE_WORKER, "--mode", mode]
    return SubprocessRunner(SPEC, command=command, **kwargs)


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 30))


async def collect(runner: SubprocessRunner, prompt: str) -> list[CompletionChunk]:
    return [chunk async for chunk in runner.completion(CompletionRequest(prompt=prompt))]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


def test_start_complete_tokenize_close() -> None:
    async def body() -> None:
        runner = make_runner()
        info = await runner.start()
        assert runner.alive
        assert info.pid == runner.pid
        assert (info.n_ctx, info.n_parallel, info.memory_bytes) == (2048, 4, 12345)
        chunks = await collect(runner, "echo Hello big world")
        assert [c.text for c in chunks[:-1]] == ["Hello", " big", " world"]
        done = chunks[-1]
        assert done.done and done.done_reason == "stop" and done.eval_count == 3
        assert await runner.tokenize("hi") == [256, 104, 105]
        assert await runner.tokenize("hi", add_special=False) == [104, 105]
        assert await runner.detokenize([256, 104, 105]) == "hi"
        await runner.close()
        assert not runner.alive
        assert runner._proc is not None and runner._proc.returncode == 0
        assert "shutting down" in runner.output_tail
        with pytest.raises(RunnerCrashed):
            await collect(runner, "echo again")
        await runner.close()  # idempotent

    run(body)


def test_concurrent_requests_are_routed_by_id() -> None:
    async def body() -> None:
        runner = make_runner()
        await runner.start()
        try:
            prompts = [f"echo {i}a {i}b {i}c {i}d" for i in range(8)]
            results = await asyncio.gather(*(collect(runner, p) for p in prompts))
            tokens = asyncio.gather(*(runner.tokenize(str(i)) for i in range(8)))
            for i, chunks in enumerate(results):
                assert "".join(c.text for c in chunks) == f"{i}a {i}b {i}c {i}d"
                assert chunks[-1].done
            assert await tokens == [[256, ord(str(i))] for i in range(8)]
        finally:
            await runner.close()

    run(body)


def test_consumer_stopping_early_sends_cancel() -> None:
    async def body() -> None:
        runner = make_runner()
        await runner.start()
        try:
            async with aclosing(runner.completion(CompletionRequest(prompt="slow 1000"))) as gen:
                async for chunk in gen:
                    assert chunk.text == "tick"
                    break
            await wait_until(lambda: "cancelled 1" in runner.output_tail)
            assert runner.alive
            assert runner._requests == {}
            # the runner keeps serving after a cancel
            chunks = await collect(runner, "echo still here")
            assert "".join(c.text for c in chunks) == "still here"
        finally:
            await runner.close()

    run(body)


def test_cancelled_consumer_task_sends_cancel() -> None:
    async def body() -> None:
        runner = make_runner()
        await runner.start()
        try:
            got_one = asyncio.Event()

            async def consume() -> None:
                async for _ in runner.completion(CompletionRequest(prompt="slow 1000")):
                    got_one.set()

            task = asyncio.create_task(consume())
            await got_one.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: "cancelled 1" in runner.output_tail)
        finally:
            await runner.close()

    run(body)


def test_kill_mid_stream_fails_every_open_request() -> None:
    async def body() -> None:
        runner = make_runner()
        await runner.start()
        started = 0

        async def stream(prompt: str) -> list[str]:
            nonlocal started
            texts = []
            async for chunk in runner.completion(CompletionRequest(prompt=prompt)):
                if not texts:
                    started += 1
                texts.append(chunk.text)
            return texts

        slow = [asyncio.create_task(stream("slow 100000")) for _ in range(3)]
        await wait_until(lambda: started == 3)
        killer = asyncio.create_task(stream("kill 2"))
        results = await asyncio.gather(*slow, killer, return_exceptions=True)
        for result in results:
            assert isinstance(result, RunnerCrashed), result
            assert str(result).startswith("model runner has unexpectedly stopped")
            assert str(result).endswith(": signal: killed")
        assert not runner.alive
        with pytest.raises(RunnerCrashed, match="signal: killed"):
            await runner.tokenize("x")
        await runner.close()
        assert runner._proc is not None and runner._proc.returncode == -signal.SIGKILL

    run(body)


def test_external_sigkill_while_streaming() -> None:
    async def body() -> None:
        runner = make_runner()
        await runner.start()
        assert runner.pid is not None
        with pytest.raises(RunnerCrashed, match="signal: killed"):
            async for _ in runner.completion(CompletionRequest(prompt="slow 100000")):
                os.kill(runner.pid, signal.SIGKILL)
        assert not runner.alive
        await runner.close()

    run(body)


def test_crash_reports_the_last_error_line() -> None:
    async def body() -> None:
        runner = make_runner()
        await runner.start()
        with pytest.raises(RunnerCrashed) as caught:
            await collect(runner, "crash 2")
        assert str(caught.value).endswith(": error: fake worker crashed")
        assert not runner.alive
        await runner.close()

    run(body)


def test_abort_is_a_crash() -> None:
    async def body() -> None:
        runner = make_runner()
        await runner.start()
        with pytest.raises(RunnerCrashed, match="signal: aborted"):
            await collect(runner, "abort")
        await runner.close()

    run(body)


def test_worker_error_messages_map_to_domain_errors() -> None:
    async def body() -> None:
        runner = make_runner()
        await runner.start()
        try:
            with pytest.raises(InvalidRequest, match="bad option"):
                await collect(runner, "invalid bad option")
            assert runner.alive
        finally:
            await runner.close()

    run(body)


def test_logprobs_and_stop_sequence_cross_the_protocol() -> None:
    async def body() -> None:
        runner = make_runner()
        await runner.start()
        try:
            options = SamplingOptions(stop=("B", "C"))
            request = CompletionRequest(
                prompt="echo A B", options=options, logprobs=True, top_logprobs=2
            )
            chunks = [c async for c in runner.completion(request)]
            top = [TokenLogprob("alt0", -0.0, [97, 108, 116, 48]),
                   TokenLogprob("alt1", -1.0, [97, 108, 116, 49])]
            assert [c.logprobs for c in chunks[:-1]] == [
                [Logprob("A", -0.0, [65], top)], [Logprob(" B", -1.0, [32, 66], top)]
            ]
            assert chunks[-1].done and chunks[-1].logprobs is None
            assert chunks[-1].stop_sequence == "B"
            plain = await collect(runner, "echo A")
            assert plain[0].logprobs is None and plain[-1].stop_sequence == ""
            with pytest.raises(InternalError, match="malformed chunk from the model runner"):
                await collect(runner, "badlogprobs")
            assert runner.alive
        finally:
            await runner.close()

    run(body)


def test_fatal_on_load_is_an_internal_error_with_the_workers_message() -> None:
    async def body() -> None:
        runner = make_runner("fatal")
        with pytest.raises(InternalError) as caught:
            await runner.start()
        assert not isinstance(caught.value, RunnerCrashed)
        assert str(caught.value) == "error loading model: corrupt file"
        assert runner._proc is not None and runner._proc.returncode == 1
        assert not runner.alive
        await runner.close()

    run(body)


def test_exit_during_load() -> None:
    async def body() -> None:
        runner = make_runner("die")
        with pytest.raises(InternalError) as caught:
            await runner.start()
        assert str(caught.value) == (
            "llama runner process has terminated: error: cannot load model"
        )
        await runner.close()

    run(body)


def test_load_timeout_kills_the_worker() -> None:
    async def body() -> None:
        runner = make_runner("hang", load_timeout=0.5)
        with pytest.raises(InternalError, match="timed out waiting for llama runner to start"):
            await runner.start()
        assert runner._proc is not None and runner._proc.returncode == -signal.SIGKILL

    run(body)


def test_protocol_violation_on_load() -> None:
    async def body() -> None:
        runner = make_runner("garbage")
        with pytest.raises(InternalError, match="invalid message"):
            await runner.start()
        assert runner._proc is not None and runner._proc.returncode is not None

    run(body)


def test_close_kills_a_worker_that_ignores_shutdown() -> None:
    async def body() -> None:
        runner = make_runner("stubborn", close_timeout=0.3)
        await runner.start()
        pending = asyncio.create_task(collect(runner, "slow 100000"))
        await asyncio.sleep(0.1)
        await runner.close()
        assert runner._proc is not None and runner._proc.returncode == -signal.SIGKILL
        with pytest.raises(RunnerCrashed):
            await pending
        assert "ignoring shutdown" in runner.output_tail

    run(body)


def test_spawn_failure() -> None:
    async def body() -> None:
        runner = SubprocessRunner(SPEC, command=["/nonexistent/python"])
        with pytest.raises(InternalError, match="failed to start the model runner"):
            await runner.start()
        await runner.close()

    run(body)


def test_worker_output_goes_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        runner = make_runner()
        await runner.start()
        await runner.close()

    with caplog.at_level(logging.INFO, logger="pollama.runner.worker"):
        run(body)
    assert any("loading /models/fake.gguf" in r.getMessage() for r in caplog.records)


def test_subprocess_factory_uses_the_load_timeout() -> None:
    async def body() -> None:
        settings = load_settings({"OLLAMA_LOAD_TIMEOUT": "300ms"})
        make = subprocess_factory(settings, command=[sys.executable, FAKE_WORKER, "--mode", "hang"])
        runner = make(SPEC)
        assert runner.spec == SPEC
        with pytest.raises(InternalError, match="timed out"):
            await runner.start()

    run(body)
