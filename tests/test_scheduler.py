"""The scheduler's rules (docs/ollama-behaviour.md#the-scheduler) with FakeRunner: loading, sharing,
the bounded queue, reloads, LRU eviction, keep-alive (on a fake clock: no real waits), crashes,
memory fit, /api/ps, and the promise that no runner is ever closed under an in-flight request
(CVE-2026-43631)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fake_runner import FakeRunner, FakeRunnerFactory
from pollama.config import Settings, load_settings
from pollama.errors import (
    InsufficientMemory,
    InternalError,
    InvalidRequest,
    RunnerCrashed,
    ServerBusy,
)
from pollama.gguf import GGUFInfo
from pollama.runner.base import CompletionRequest, LoadSpec
from pollama.scheduler import (
    FOREVER_DELTA,
    Lease,
    MemoryInfo,
    ModelRef,
    Scheduler,
    compute_buffer_bytes,
    estimate_memory,
    kv_cache_bytes,
    parse_keep_alive,
    system_memory,
)

T = TypeVar("T")
BUSY = "server busy, please try again.  maximum pending requests exceeded"


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 20))


def make_settings(**overrides: Any) -> Settings:
    return load_settings({}, **overrides)


def model(name: str, estimate: int = 0) -> ModelRef:
    return ModelRef(
        key=f"/blobs/{name}",
        name=f"{name}:latest",
        digest=f"digest-{name}",
        size=1000,
        details={"family": "llama"},
        estimate_bytes=estimate,
    )


def spec(name: str, **kwargs: Any) -> LoadSpec:
    return LoadSpec(model_path=f"/blobs/{name}", num_ctx=kwargs.pop("num_ctx", 2048), **kwargs)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


async def settle() -> None:
    """Let every ready task run until nothing more can happen without a timer."""
    for _ in range(20):
        await asyncio.sleep(0)


class Hold:
    """A request that holds its lease until released."""

    def __init__(
        self,
        sched: Scheduler,
        name: str,
        keep_alive: float | None = None,
        estimate: int = 0,
        **spec_kw: Any,
    ) -> None:
        self.entered = asyncio.Event()
        self._release = asyncio.Event()
        self.lease: Lease | None = None
        ref = model(name, estimate)
        self.task = asyncio.create_task(self._run(sched, ref, spec(name, **spec_kw), keep_alive))

    async def _run(
        self, sched: Scheduler, ref: ModelRef, load: LoadSpec, keep_alive: float | None
    ) -> Lease:
        async with sched.use(ref, load, keep_alive) as lease:
            self.lease = lease
            self.entered.set()
            await self._release.wait()
            assert lease.runner.alive or isinstance(lease.runner, FakeRunner)
            return lease

    @property
    def runner(self) -> FakeRunner:
        assert self.lease is not None
        runner = self.lease.runner
        assert isinstance(runner, FakeRunner)
        return runner

    async def done(self) -> Lease:
        self._release.set()
        return await self.task


def scheduler(factory: FakeRunnerFactory, **settings: Any) -> Scheduler:
    return Scheduler(make_settings(**settings), factory)


# -- loading and sharing -----------------------------------------------------------------------


def test_loads_on_first_use_and_reuses() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory(load_delay=0.01)
        sched = scheduler(factory)
        async with sched.use(model("a"), spec("a")) as lease:
            assert lease.load_duration_ns >= 10_000_000
            assert lease.info.n_ctx == 2048
            chunks = [c async for c in lease.runner.completion(CompletionRequest(prompt="x"))]
            assert "".join(c.text for c in chunks) == "Hello world!"
        async with sched.use(model("a"), spec("a")) as again:
            assert again.load_duration_ns == 0
            assert again.runner is lease.runner
        assert factory.loads() == 1
        await sched.shutdown()
        assert factory.runners[0].closed

    run(body)


def test_one_load_at_a_time_in_arrival_order() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory(load_delay=0.02)
        sched = scheduler(factory, max_loaded_models=3)

        async def use(name: str) -> None:
            async with sched.use(model(name), spec(name)):
                pass

        await asyncio.gather(use("a"), use("b"), use("c"), use("a"))
        assert factory.events == [
            ("start", "/blobs/a"),
            ("ready", "/blobs/a"),
            ("start", "/blobs/b"),
            ("ready", "/blobs/b"),
            ("start", "/blobs/c"),
            ("ready", "/blobs/c"),
        ]
        await sched.shutdown()

    run(body)


def test_num_parallel_bounds_requests_in_a_runner() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory(chunk_delay=0.005)
        sched = scheduler(factory)
        inside = peak = 0

        async def request() -> None:
            nonlocal inside, peak
            async with sched.use(model("a"), spec("a", num_parallel=2)) as lease:
                inside += 1
                peak = max(peak, inside)
                async for _ in lease.runner.completion(CompletionRequest()):
                    pass
                inside -= 1

        await asyncio.gather(*(request() for _ in range(7)))
        assert peak == 2
        assert factory.runners[0].max_active == 2
        assert sched.pending == 0
        await sched.shutdown()

    run(body)


# -- the bounded queue -------------------------------------------------------------------------


def test_fifty_requests_with_max_queue_ten() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory(load_delay=0.01)
        sched = scheduler(factory, max_queue=10)

        async def request() -> str:
            async with sched.use(model("a"), spec("a")):
                await asyncio.sleep(0.001)
                return "ok"

        results = await asyncio.wait_for(
            asyncio.gather(*(request() for _ in range(50)), return_exceptions=True), 5
        )
        busy = [r for r in results if isinstance(r, ServerBusy)]
        assert len(busy) == 40
        assert all(str(b) == BUSY for b in busy)
        assert results.count("ok") == 10
        assert sched.pending == 0
        await sched.shutdown()

    run(body)


def test_requests_waiting_for_a_slot_count_as_pending() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory()
        sched = scheduler(factory, max_queue=2)
        running = Hold(sched, "a")
        await running.entered.wait()
        waiting = [Hold(sched, "a") for _ in range(2)]
        await settle()
        assert sched.pending == 2
        with pytest.raises(ServerBusy):
            async with sched.use(model("a"), spec("a")):
                pass
        await running.done()
        for hold in waiting:
            await hold.done()
        assert sched.pending == 0
        await sched.shutdown()

    run(body)


def test_cancelled_waiters_leave_the_queue() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory(load_delay=0.05)
        sched = scheduler(factory, max_queue=3)
        holds = [Hold(sched, "a") for _ in range(3)]
        await settle()
        assert sched.pending == 3
        for hold in holds:
            hold.task.cancel()
        await asyncio.gather(*(h.task for h in holds), return_exceptions=True)
        assert sched.pending == 0
        # the load went on for nobody; the runner is idle and expires normally
        await wait_until(lambda: factory.loads() == 1 and factory.runners[0].started)
        async with sched.use(model("a"), spec("a")) as lease:
            assert lease.runner is factory.runners[0]
        assert factory.loads() == 1
        await sched.shutdown()

    run(body)


# -- reload and eviction -----------------------------------------------------------------------


def test_reload_on_spec_change_waits_for_in_flight_requests() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory()
        sched = scheduler(factory)
        old = Hold(sched, "a", num_ctx=2048)
        await old.entered.wait()
        new = Hold(sched, "a", num_ctx=4096)
        await settle()
        assert not new.entered.is_set()
        assert not old.runner.closed
        # a request for the old spec does not sneak onto the draining runner
        late_old = Hold(sched, "a", num_ctx=2048)
        await settle()
        assert not late_old.entered.is_set()
        await old.done()
        await new.entered.wait()
        assert old.runner.closed and not old.runner.closed_while_busy
        assert new.runner.spec.num_ctx == 4096
        await new.done()
        await late_old.done()  # and it reloads the old spec in turn
        assert [r.spec.num_ctx for r in factory.runners] == [2048, 4096, 2048]
        assert not factory.closed_while_busy
        await sched.shutdown()

    run(body)


def test_lru_idle_runner_is_evicted() -> None:
    async def body() -> None:
        clock = FakeClock()
        factory = FakeRunnerFactory()
        sched = Scheduler(make_settings(max_loaded_models=2), factory, clock=clock)
        for name in ("a", "b", "a"):
            clock.now += 1
            async with sched.use(model(name), spec(name)):
                pass
        clock.now += 1
        async with sched.use(model("c"), spec("c")):
            pass
        loaded = sorted(r.spec.model_path for r in factory.live())
        assert loaded == ["/blobs/a", "/blobs/c"]
        assert ("close", "/blobs/b") in factory.events
        await sched.shutdown()

    run(body)


def test_a_pinned_model_is_never_evicted_and_ignores_keep_alive() -> None:
    async def body() -> None:
        clock = FakeClock()
        factory = FakeRunnerFactory()
        sched = Scheduler(make_settings(max_loaded_models=2), factory, clock=clock)
        pinned = dataclasses.replace(model("a"), pinned=True)
        async with sched.use(pinned, spec("a"), keep_alive=0):  # cannot unpin it
            pass
        for name in ("b", "c"):  # "a" is the least recently used, but pinned
            clock.now += 1
            async with sched.use(model(name), spec(name)):
                pass
        assert sorted(r.spec.model_path for r in factory.live()) == ["/blobs/a", "/blobs/c"]
        (row,) = [m for m in sched.loaded() if m.name == "a:latest"]
        assert row.expires_at.year > 2100
        await sched.shutdown()

    run(body)


def test_no_room_beside_pinned_models_is_an_error_naming_them() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory()
        sched = scheduler(factory, max_loaded_models=1)
        async with sched.use(dataclasses.replace(model("a"), pinned=True), spec("a")):
            pass
        with pytest.raises(InsufficientMemory, match=r"'b:latest'.*\(a:latest\) are pinned"):
            async with sched.use(model("b"), spec("b")):
                pass
        # A reloaded preset unpins it: the next request for it says so, and it may go.
        async with sched.use(model("a"), spec("a")):
            pass
        async with sched.use(model("b"), spec("b")):
            pass
        assert [r.spec.model_path for r in factory.live()] == ["/blobs/b"]
        await sched.shutdown()

    run(body)


def test_eviction_waits_for_a_busy_runner() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory()
        sched = scheduler(factory, max_loaded_models=1)
        a = Hold(sched, "a")
        await a.entered.wait()
        b = Hold(sched, "b")
        await asyncio.sleep(0.02)
        assert not b.entered.is_set()
        assert not a.runner.closed
        await a.done()
        await b.entered.wait()
        assert a.runner.closed and not a.runner.closed_while_busy
        await b.done()
        await sched.shutdown()

    run(body)


def test_eviction_never_happens_under_an_in_flight_request() -> None:
    """Many concurrent requests over more models and specs than fit, with short and zero
    keep-alives, expiries and reloads: no runner is ever closed while streaming."""

    async def body() -> None:
        factory = FakeRunnerFactory(chunk_delay=0.001, script=["a", "b", "c"])
        sched = scheduler(factory, max_loaded_models=2, max_queue=1000)
        rng = random.Random(1234)
        completed = 0

        async def request(i: int) -> None:
            nonlocal completed
            await asyncio.sleep(rng.random() * 0.05)
            name = rng.choice("abcd")
            keep_alive = rng.choice([None, 0.0, 0.01, 0.2])
            options = {"num_ctx": rng.choice([2048, 2048, 4096]), "num_parallel": 2}
            async with sched.use(model(name), spec(name, **options), keep_alive) as lease:
                text = ""
                async for chunk in lease.runner.completion(CompletionRequest()):
                    text += chunk.text
                assert text == "abc"
            completed += 1
            if i % 10 == 0:
                await sched.expire(f"/blobs/{rng.choice('abcd')}")

        await asyncio.wait_for(asyncio.gather(*(request(i) for i in range(120))), 15)
        assert completed == 120
        assert not factory.closed_while_busy
        assert all(r.cancelled == 0 for r in factory.runners)
        assert len(factory.live()) <= 2
        await sched.shutdown()
        assert all(r.closed for r in factory.runners)

    run(body)


# -- keep-alive --------------------------------------------------------------------------------


@dataclass(eq=False)
class FakeTimer:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Monotonic time that moves only when the test says so (``now += s`` moves it without
    firing anything; :meth:`advance` fires the keep-alive timers it passes, in order)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[FakeTimer] = []

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled]

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = sorted((t for t in self.pending() if t.when <= self.now), key=lambda t: t.when)
        self.timers = [t for t in self.pending() if t.when > self.now]
        for timer in due:
            if not timer.cancelled:  # an earlier callback may have cancelled it
                timer.cancelled = True
                timer.callback()


WALL = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_keep_alive_expiry_starts_when_the_last_request_ends() -> None:
    async def body() -> None:
        clock = FakeClock()
        factory = FakeRunnerFactory()
        sched = Scheduler(make_settings(keep_alive=50), factory, clock=clock)
        first, second = Hold(sched, "a", num_parallel=2), Hold(sched, "a", num_parallel=2)
        await first.entered.wait()
        await second.entered.wait()
        await first.done()
        assert clock.pending() == []  # still in use by the second request: no timer
        clock.advance(100)
        await settle()
        assert first.runner.alive
        await second.done()
        (timer,) = clock.pending()
        assert timer.when == clock.now + 50
        clock.advance(49.9)
        await settle()
        assert first.runner.alive and sched.loaded()
        clock.advance(0.1)
        await wait_until(lambda: first.runner.closed)
        assert sched.loaded() == []
        await sched.shutdown()

    run(body)


def test_new_request_cancels_the_expiry_timer() -> None:
    async def body() -> None:
        clock = FakeClock()
        factory = FakeRunnerFactory()
        sched = Scheduler(make_settings(keep_alive=80), factory, clock=clock)
        async with sched.use(model("a"), spec("a")):
            pass
        (first_timer,) = clock.pending()
        clock.advance(50)
        hold = Hold(sched, "a")
        await hold.entered.wait()
        assert first_timer.cancelled and clock.pending() == []
        clock.advance(100)  # past the first deadline: nothing fires
        await settle()
        assert hold.runner.alive and factory.loads() == 1
        await hold.done()
        (timer,) = clock.pending()
        assert timer.when == clock.now + 80
        clock.advance(80)
        await wait_until(lambda: hold.runner.closed)
        await sched.shutdown()

    run(body)


def test_keep_alive_zero_unloads_when_idle() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory()
        sched = scheduler(factory)
        hold = Hold(sched, "a", keep_alive=0, num_parallel=2)
        await hold.entered.wait()
        other = Hold(sched, "a", num_parallel=2)  # keep_alive None keeps 0
        await other.entered.wait()
        await hold.done()
        assert hold.runner.alive
        await other.done()
        await wait_until(lambda: hold.runner.closed)
        assert not factory.closed_while_busy
        await sched.shutdown()

    run(body)


def test_keep_alive_is_sticky_and_shown_by_ps() -> None:
    async def body() -> None:
        clock = FakeClock()
        factory = FakeRunnerFactory(memory_bytes=777)
        sched = Scheduler(make_settings(), factory, clock=clock, wall_clock=lambda: WALL)

        async def use(keep_alive: float | None) -> None:
            async with sched.use(model("a"), spec("a"), keep_alive):
                pass

        await use(None)  # OLLAMA_KEEP_ALIVE default: 5 minutes
        (row,) = sched.loaded()
        assert row.expires_at == WALL + timedelta(minutes=5)
        assert (row.name, row.model, row.size, row.digest, row.size_vram) == (
            "a:latest",
            "a:latest",
            777,
            "digest-a",
            0,
        )
        assert row.context_length == 2048 and row.details == {"family": "llama"}
        await use(600)
        clock.now += 100
        assert sched.loaded()[0].expires_at == WALL + timedelta(seconds=500)
        await use(None)
        assert sched.loaded()[0].expires_at == WALL + timedelta(seconds=600)
        await use(-1)
        assert sched.loaded()[0].expires_at == WALL + FOREVER_DELTA
        await use(math.inf)
        assert sched.loaded()[0].expires_at - WALL > timedelta(days=365 * 20)
        await sched.shutdown()

    run(body)


def test_ps_sorts_by_expiry_and_shows_busy_loading_and_expiring_models() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory()
        factory.configure("/blobs/slow", load_delay=10)
        sched = Scheduler(make_settings(), factory, wall_clock=lambda: WALL)
        busy = Hold(sched, "busy", keep_alive=60)
        await busy.entered.wait()
        async with sched.use(model("idle"), spec("idle"), 120):
            pass
        loading = Hold(sched, "slow", keep_alive=30)
        await wait_until(lambda: any(r.spec.model_path == "/blobs/slow" for r in factory.runners))
        rows = sched.loaded()
        assert [r.name for r in rows] == ["idle:latest", "busy:latest", "slow:latest"]
        assert rows[1].expires_at == WALL + timedelta(seconds=60)
        assert rows[2].expires_at == WALL + timedelta(seconds=30)
        await sched.expire("/blobs/busy")
        assert busy.runner.alive  # busy: unloads only when idle
        assert sched.loaded()[-1].name == "busy:latest"
        assert sched.loaded()[-1].expires_at == WALL
        await busy.done()
        await wait_until(lambda: busy.runner.closed)
        loading.task.cancel()
        await sched.shutdown()
        assert not factory.closed_while_busy

    run(body)


def test_expire_idle_and_unknown_models() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory()
        sched = scheduler(factory)
        await sched.expire("/blobs/nothing")  # not loaded: no error
        async with sched.use(model("a"), spec("a")):
            pass
        await sched.expire("/blobs/a")
        assert factory.runners[0].closed
        assert sched.loaded() == []
        await sched.shutdown()

    run(body)


# -- crashes and load failures -----------------------------------------------------------------


def test_crashed_runner_is_dropped_and_reloaded() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory(crash_after=1)
        sched = scheduler(factory)
        with pytest.raises(RunnerCrashed):
            async with sched.use(model("a"), spec("a")) as lease:
                async for _ in lease.runner.completion(CompletionRequest()):
                    pass
        await wait_until(lambda: factory.runners[0].closed)
        assert sched.loaded() == []
        factory.defaults.pop("crash_after")
        async with sched.use(model("a"), spec("a")) as lease:
            assert lease.runner is factory.runners[1]
            assert lease.load_duration_ns >= 0
        await sched.shutdown()

    run(body)


def test_idle_crash_is_noticed_by_the_next_request() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory()
        sched = scheduler(factory)
        async with sched.use(model("a"), spec("a")):
            pass
        factory.runners[0].crash()
        assert sched.loaded() == []
        async with sched.use(model("a"), spec("a")) as lease:
            assert lease.runner is factory.runners[1]
        assert factory.runners[0].closed
        await sched.shutdown()

    run(body)


def test_requests_waiting_for_a_slot_move_to_a_fresh_runner_after_a_crash() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory()
        sched = scheduler(factory)
        running = Hold(sched, "a")
        await running.entered.wait()
        waiting = Hold(sched, "a")
        await settle()
        running.runner.crash()
        await running.done()
        await waiting.entered.wait()
        assert waiting.runner is factory.runners[1] and waiting.runner.alive
        await waiting.done()
        await sched.shutdown()

    run(body)


def test_load_failure_reaches_the_request_and_the_next_one_retries() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory(load_error=InternalError("error loading model: corrupt"))
        sched = scheduler(factory)
        with pytest.raises(InternalError, match="corrupt"):
            async with sched.use(model("a"), spec("a")):
                pass
        assert sched.loaded() == [] and factory.runners[0].closed
        factory.defaults.clear()
        async with sched.use(model("a"), spec("a")):
            pass
        assert factory.loads() == 2
        await sched.shutdown()

    run(body)


def test_shutdown_closes_everything_and_refuses_new_requests() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory()
        factory.configure("/blobs/slow", load_delay=10)
        sched = scheduler(factory)
        async with sched.use(model("a"), spec("a")):
            pass
        loading = Hold(sched, "slow")
        await wait_until(lambda: factory.loads() == 2)
        await sched.shutdown()
        with pytest.raises(InternalError, match="shutting down"):
            await loading.task
        assert all(r.closed for r in factory.runners)
        with pytest.raises(InternalError, match="shutting down"):
            async with sched.use(model("a"), spec("a")):
                pass

    run(body)


# -- memory ------------------------------------------------------------------------------------


class Memory:
    """A machine with ``total`` bytes where each live fake runner uses its memory_bytes."""

    def __init__(self, factory: FakeRunnerFactory, total: int) -> None:
        self.factory, self.total = factory, total

    def __call__(self) -> MemoryInfo:
        used = sum(r.memory_bytes for r in self.factory.runners if r.started and not r.closed)
        return MemoryInfo(total=self.total, available=self.total - used)


def test_does_not_fit_at_all() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory()
        sched = Scheduler(make_settings(), factory, memory_probe=Memory(factory, 4_000_000_000))
        with pytest.raises(InsufficientMemory) as caught:
            async with sched.use(model("big", estimate=6_500_000_000), spec("big")):
                pass
        message = str(caught.value)
        assert "6.5 GB" in message and "4.0 GB" not in message and "4 GB" in message
        assert "num_ctx" in message and "unload" in message
        assert factory.loads() == 0
        await sched.shutdown()

    run(body)


def test_idle_models_are_evicted_to_make_memory() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory(memory_bytes=3_000)
        sched = Scheduler(make_settings(), factory, memory_probe=Memory(factory, 10_000))
        for name in ("a", "b", "c"):
            async with sched.use(model(name, 3_000), spec(name)):
                pass
        # 1,000 free; 'd' needs 6,500: the two least recently used go
        async with sched.use(model("d", 6_500), spec("d")):
            pass
        assert sorted(r.spec.model_path for r in factory.live()) == ["/blobs/c", "/blobs/d"]
        # cannot fit even with everything else gone: nothing is evicted
        with pytest.raises(InsufficientMemory):
            async with sched.use(model("e", 20_000), spec("e")):
                pass
        assert len(factory.live()) == 2
        await sched.shutdown()

    run(body)


def test_memory_eviction_waits_for_a_busy_model() -> None:
    async def body() -> None:
        factory = FakeRunnerFactory(memory_bytes=6_000)
        sched = Scheduler(make_settings(), factory, memory_probe=Memory(factory, 10_000))
        a = Hold(sched, "a", estimate=6_000)
        await a.entered.wait()
        b = Hold(sched, "b", estimate=6_000)
        await asyncio.sleep(0.02)
        assert not b.entered.is_set() and not a.runner.closed
        await a.done()
        await b.entered.wait()
        await b.done()
        assert not factory.closed_while_busy
        await sched.shutdown()

    run(body)


def gguf_info(**kv: Any) -> GGUFInfo:
    base: dict[str, Any] = {
        "general.architecture": "llama",
        "llama.block_count": 30,
        "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        "tokenizer.ggml.tokens": ["t"] * 49152,
    }
    base.update(kv)
    return GGUFInfo(version=3, kv=base, tensors=[], file_size=100_000_000)


def test_kv_cache_estimate() -> None:
    info = gguf_info()
    one = LoadSpec(model_path="m", num_ctx=4096)
    # 2 (K and V) x 30 layers x 3 kv heads x 64 head dim x 4096 tokens x 2 bytes
    assert kv_cache_bytes(info, one) == 2 * 30 * 3 * 64 * 4096 * 2
    four = LoadSpec(model_path="m", num_ctx=4096, num_parallel=4)
    assert kv_cache_bytes(info, four) == 4 * kv_cache_bytes(info, one)
    q8 = LoadSpec(model_path="m", num_ctx=4096, kv_cache_type="q8_0", flash_attention=True)
    assert kv_cache_bytes(info, q8) == 2 * 30 * 3 * 64 * 4096 * 34 // 32
    q4_no_fa = LoadSpec(model_path="m", num_ctx=4096, kv_cache_type="q4_0", flash_attention=False)
    assert kv_cache_bytes(info, q4_no_fa) == kv_cache_bytes(info, one)
    explicit = gguf_info(**{"llama.attention.key_length": 128, "llama.attention.value_length": 64})
    assert kv_cache_bytes(explicit, one) == 30 * 3 * (128 + 64) * 4096 * 2
    per_layer = gguf_info(**{"llama.attention.head_count_kv": [3, 0] * 15})
    assert kv_cache_bytes(per_layer, one) == kv_cache_bytes(info, one) // 2
    assert kv_cache_bytes(GGUFInfo(version=3, kv={}, tensors=[], file_size=5), one) == 0


def test_memory_estimate_adds_weights_kv_and_compute() -> None:
    info = gguf_info()
    base = LoadSpec(model_path="m", num_ctx=4096)
    total = estimate_memory(info, base)
    assert total == info.file_size + kv_cache_bytes(info, base) + compute_buffer_bytes(info, base)
    assert compute_buffer_bytes(info, base) > 512 * 49152 * 4  # the batch's logits at least
    bigger = LoadSpec(model_path="m", num_ctx=8192, num_parallel=2)
    assert estimate_memory(info, bigger) > total
    flash = LoadSpec(model_path="m", num_ctx=4096, flash_attention=True)
    assert compute_buffer_bytes(info, flash) < compute_buffer_bytes(info, base)


def test_system_memory_reads_meminfo_and_cgroup(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  16000000 kB\nMemFree: 1000 kB\nMemAvailable:  8000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert system_memory(meminfo, cgroup) == MemoryInfo(16_384_000_000, 8_192_000_000)
    (cgroup / "memory.max").write_text("4000000000\n")
    (cgroup / "memory.current").write_text("1000000000\n")
    assert system_memory(meminfo, cgroup) == MemoryInfo(4_000_000_000, 3_000_000_000)
    (cgroup / "memory.max").write_text("max\n")
    assert system_memory(meminfo, cgroup).available == 8_192_000_000
    real = system_memory()
    assert real.total > 0 and 0 <= real.available


# -- keep_alive parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        (-1, math.inf),
        (-0.5, math.inf),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("300ms", 0.3),
        ("0", 0.0),
        ("0s", 0.0),
        ("-1m", math.inf),
        (10**30, math.inf),
        (10**400, math.inf),
    ],
)
def test_parse_keep_alive(value: Any, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("3600", 'time: missing unit in duration "3600"'),
        ("soon", 'time: invalid duration "soon"'),
        ("", 'time: invalid duration ""'),
        (True, "Unsupported type: 'bool'"),
        ({"a": 1}, "Unsupported type: 'map[string]interface {}'"),
        ([1], "Unsupported type: '[]interface {}'"),
    ],
)
def test_parse_keep_alive_errors(value: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_keep_alive(value)
    # Ollama's Go text, inside a message that says which field and what to write instead.
    assert str(caught.value).startswith("invalid keep_alive: " + message)
