"""The scheduler: which models are loaded, who may use them, and when they go away
(docs/ollama-behaviour.md#the-scheduler).

A request asks for a runner with ``async with scheduler.use(model, spec, keep_alive) as
lease``. What must stay true:

* **A runner is never closed while a request holds it** (CVE-2026-43631: unloading under an
  in-flight request was a use-after-free in llama-server). Every unload path (keep-alive
  expiry, ``expire``, reload, eviction, crash clean-up) waits until the runner's reference
  count is 0; only :meth:`Scheduler.shutdown` closes busy runners.
* **One load at a time, first come first served.** Loads, and the evictions that make room
  for them, run under one FIFO lock. Requests for a model that is loaded with the same
  :class:`LoadSpec` never wait for that lock.
* **At most ``num_parallel`` requests run in a runner at once**; the rest wait in FIFO order
  for a slot (a reference is held while waiting, so the runner is not evicted under them).
* **The waiting line is bounded**: a request that cannot start at once counts as pending
  until it holds a slot; when ``max_queue`` requests are already pending it fails at once
  with :class:`ServerBusy` (503). Ollama bounds only its load queue; we bound every wait,
  which is what ``OLLAMA_MAX_QUEUE`` is documented to do.
* **A different ``LoadSpec`` means a reload**: the old runner stops taking new requests,
  finishes the ones it has, is closed, and the new one loads.
* **At most ``max_loaded_models`` runners** (0 = 3): the least recently used idle one is
  evicted to make room; if none is idle, the least recently used one stops taking new
  requests and is evicted once idle (Ollama waits the same way, so a busy model cannot keep
  another one out forever).
* **Memory is checked before a load** (:mod:`pollama.scheduler.memory`): idle runners are
  evicted, least recently used first, until the estimate fits; when it cannot fit even with
  every other model gone, :class:`InsufficientMemory`. The host part is checked against
  system memory; the part planned for each accelerator (``scheduler/placement.py``) against
  that device's room beside the loaded runners, and, as Ollama does, a model whose plan does
  not fit there evicts loaded ones (waiting for a busy one) rather than load with fewer
  layers; with nothing left to evict it loads as planned (the plan was made for the device
  alone).
* **keep-alive** (docs/ollama-behaviour.md#keep-alive): ``None`` keeps the runner's value
  (``OLLAMA_KEEP_ALIVE`` on first load); the timer starts when the last reference is released; 0
  unloads as soon as idle; ``inf`` never. A runner whose worker died is dropped once idle and
  the next request loads a fresh one.

Only the event loop touches this state, so there are no thread locks; every mutation of a
reference count happens in synchronous code, so cancellation cannot leave it half done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from functools import partial
from typing import Any

from pollama.config import Settings
from pollama.errors import (
    AcceleratorUnavailable,
    InsufficientMemory,
    InternalError,
    RunnerCrashed,
    ServerBusy,
)
from pollama.runner.base import DeviceInfo, LoadSpec, Runner, RunnerInfo
from pollama.runner.devices import DeviceInventory, offload_shortfall, planned_cpu_reason
from pollama.runner.offload import CPU_DEVICE
from pollama.scheduler.clock import MONOTONIC, Clock, Timer
from pollama.scheduler.keepalive import expiry_datetime, normalize_keep_alive
from pollama.scheduler.memory import MemoryProbe, insufficient_memory, system_memory
from pollama.scheduler.placement import device_room
from pollama.telemetry import NULL_TELEMETRY, Telemetry

__all__ = ["DEFAULT_MAX_LOADED_MODELS", "Lease", "LoadedModel", "ModelRef", "Scheduler"]

log = logging.getLogger(__name__)

DEFAULT_MAX_LOADED_MODELS = 3  # Ollama: 3 per GPU; pollama counts the CPU as one device
_DEAD_RETRIES = 3  # a request that finds its runner dead after waiting reloads this often


@dataclass(frozen=True)
class ModelRef:
    """What the scheduler needs to know about a model; the same ``key`` means the same runner.

    ``key`` is the model blob path (or digest); ``name`` the display name ``/api/ps`` shows;
    ``digest`` the manifest id; ``size`` the model's bytes on disk; ``details`` the
    ``/api/ps`` details object; ``estimate_bytes`` the system memory a load needs
    (:func:`pollama.scheduler.memory.estimate_memory`: the host part), ``device_bytes`` what
    it is planned to take on each accelerator, by device name
    (:func:`pollama.scheduler.placement.plan_offload`; empty on the CPU).
    """

    key: str
    name: str
    digest: str = ""
    size: int = 0
    details: Mapping[str, Any] = field(default_factory=dict, compare=False)
    estimate_bytes: int = 0
    device_bytes: Mapping[str, int] = field(default_factory=dict, compare=False)
    pinned: bool = field(default=False, compare=False)
    """Pinned by its preset (``keep_alive = "pinned"``): never expires, never evicted to
    make room for another model; only an explicit unload (``pollama stop``) ends it."""


@dataclass(frozen=True)
class LoadedModel:
    """One row of ``/api/ps``. ``size`` is the runner's memory (every device's, as Ollama
    counts it), ``size_vram`` the part of it not on the CPU and ``device_bytes`` its split
    by device (``RunnerInfo.device_bytes``); ``context_length`` is per slot;
    ``expires_at`` is a local, timezone-aware date."""

    name: str
    model: str
    size: int
    digest: str
    details: Mapping[str, Any]
    expires_at: datetime
    size_vram: int  # the bytes on accelerators, as the worker reported them after loading
    context_length: int
    device_bytes: Mapping[str, int] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Lease:
    """A request's hold on a runner; valid only inside ``scheduler.use(...)``."""

    runner: Runner
    info: RunnerInfo
    model: ModelRef
    load_duration_ns: int  # 0 when the runner was already loaded


class _State(Enum):
    LOADING = "loading"
    READY = "ready"
    CLOSING = "closing"


@dataclass(eq=False)
class _Entry:
    """A runner and its bookkeeping. ``refs`` counts requests holding it (running or
    waiting for a slot); ``active`` those inside a slot. ``draining`` refuses new
    references because the runner is about to be unloaded (reload, eviction, crash)."""

    model: ModelRef
    spec: LoadSpec
    runner: Runner
    keep_alive: float
    state: _State = _State.LOADING
    info: RunnerInfo | None = None
    refs: int = 0
    active: int = 0
    slot_waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    draining: bool = False
    expired: bool = False  # expire() was called: ps shows it as stopping
    timer: Timer | None = None
    idle_deadline: float | None = None  # clock time the keep-alive timer fires
    last_used: float = 0.0
    closing: asyncio.Task[None] | None = None

    @property
    def capacity(self) -> int:
        parallel = self.info.n_parallel if self.info is not None else self.spec.num_parallel
        return max(parallel, 1)

    @property
    def memory(self) -> int:
        if self.info is not None and self.info.memory_bytes > 0:
            return self.info.memory_bytes
        return self.model.estimate_bytes

    @property
    def device_memory(self) -> dict[str, int]:
        """Bytes this runner holds on each accelerator: the worker's own report once loaded,
        else the plan's."""
        if self.info is not None and self.info.device_bytes:
            return {n: b for n, b in self.info.device_bytes.items() if n != CPU_DEVICE}
        return dict(self.model.device_bytes)

    @property
    def host_memory(self) -> int:
        """Bytes of system memory this runner holds: the worker's CPU part once loaded,
        else the estimate's host part."""
        if self.info is not None and self.info.memory_bytes > 0:
            return max(self.info.memory_bytes - self.info.vram_bytes, 0)
        return self.model.estimate_bytes

    def slot_free(self) -> bool:
        return self.active < self.capacity and not self.slot_waiters


@dataclass(eq=False)
class _Ticket:
    """One request's place in the load line; ``abandoned`` once its requester is gone."""

    model: ModelRef
    spec: LoadSpec
    keep_alive: float | None
    abandoned: bool = False


class _Signal:
    """Wakes every waiter on each :meth:`notify` (a reference released, a runner gone)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter


def _size_vram(info: RunnerInfo | None, size: int) -> int:
    """``/api/ps`` ``size_vram`` from the worker's report: the bytes not on the CPU, except
    that a model with every layer offloaded is wholly on the GPU (``size``), as Ollama counts
    it ("100% GPU"): what stays in host memory then is the input embeddings, which llama.cpp
    always looks up on the CPU, and pinned staging buffers, none of it a layer's work."""
    if info is None:
        return 0
    if info.layers and info.gpu_layers >= info.layers and info.vram_bytes:
        return size
    return info.vram_bytes


def _gpu_required(name: str, reason: str) -> AcceleratorUnavailable:
    return AcceleratorUnavailable(
        f"POLLAMA_REQUIRE_GPU is set and {name} would run on the CPU: {reason}"
    )


def _all_pinned(name: str, entries: list[_Entry]) -> InsufficientMemory:
    """The error for a load that only an unload of pinned models could make room for."""
    pinned = ", ".join(sorted(entry.model.name for entry in entries))
    return InsufficientMemory(
        f"cannot load {name!r}: the loaded models ({pinned}) are pinned by their presets "
        "(keep_alive = \"pinned\" in pollama.toml) and there is no room beside them; "
        "unpin one, stop one (pollama stop), or raise OLLAMA_MAX_LOADED_MODELS"
    )


def _local_now() -> datetime:
    return datetime.now().astimezone()


class Scheduler:
    """Loads, shares, evicts and expires runners (see the module docstring for the rules).

    ``runner_factory`` makes an unstarted runner for a spec; ``memory_probe`` reports system
    memory; ``clock`` (:mod:`pollama.scheduler.clock`) times loads, LRU order and keep-alive
    deadlines, and runs the keep-alive timers, so a fake clock drives both; ``wall_clock``
    turns deadlines into dates for ``/api/ps``.
    """

    def __init__(
        self,
        settings: Settings,
        runner_factory: Callable[[LoadSpec], Runner],
        memory_probe: MemoryProbe = system_memory,
        clock: Clock = MONOTONIC,
        wall_clock: Callable[[], datetime] = _local_now,
        telemetry: Telemetry = NULL_TELEMETRY,
        inventory: DeviceInventory | None = None,
    ) -> None:
        self._settings = settings
        self._inventory = inventory or DeviceInventory()
        self._telemetry = telemetry
        self._factory = runner_factory
        self._probe = memory_probe
        self._clock = clock
        self._wall = wall_clock
        self._loaded: dict[str, _Entry] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._load_lock = asyncio.Lock()
        self._changed = _Signal()
        self._pending = 0
        self._shut = False

    # -- the request path --------------------------------------------------------------------

    def reconfigure(self, settings: Settings) -> None:
        """Settings reloaded (``SIGHUP``, a changed ``pollama.toml``): the queue cap, the
        default keep-alive and the loaded-model cap apply from the next request; loaded
        runners keep the spec they were loaded with."""
        self._settings = settings

    @asynccontextmanager
    async def use(
        self, model: ModelRef, spec: LoadSpec, keep_alive: float | None = None
    ) -> AsyncIterator[Lease]:
        """Hold a runner for ``model`` loaded with ``spec`` for the duration of the block.

        ``keep_alive`` in seconds (``None``: keep the runner's value; 0: unload when idle;
        ``inf`` or negative: never). Raises :class:`ServerBusy` when the pending line is
        full, :class:`InsufficientMemory` when the model cannot fit, or whatever the runner's
        ``start()`` raised when loading failed.
        """
        if keep_alive is not None:
            keep_alive = normalize_keep_alive(keep_alive)
        if self._settings.require_gpu and spec.gpu_layers == 0:
            raise _gpu_required(model.name, planned_cpu_reason(spec, self._inventory))
        entry, load_ns = await self._acquire(model, spec, keep_alive)
        assert entry.info is not None
        try:
            yield Lease(entry.runner, entry.info, model, load_ns)
        finally:
            self._release(entry)

    @property
    def pending(self) -> int:
        """Requests waiting for a load, an eviction or a parallel slot."""
        return self._pending

    async def _acquire(
        self, model: ModelRef, spec: LoadSpec, keep_alive: float | None
    ) -> tuple[_Entry, int]:
        self._check_open()
        entry = self._usable(model.key, spec)
        if entry is not None and entry.slot_free():
            self._follow_pin(entry, model)
            self._ref(entry, keep_alive)
            entry.active += 1
            return entry, 0
        if self._pending >= self._settings.max_queue:
            raise ServerBusy()
        self._pending += 1
        try:
            for _ in range(_DEAD_RETRIES):
                entry, load_ns = await self._reference(model, spec, keep_alive)
                try:
                    await self._take_slot(entry)
                except BaseException:
                    self._unref(entry)
                    raise
                if entry.runner.alive:
                    return entry, load_ns
                # The worker died while we waited for a slot: drop it and load afresh.
                self._release(entry)
            raise RunnerCrashed("the model runner kept stopping while loading")
        finally:
            self._pending -= 1

    def _release(self, entry: _Entry) -> None:
        self._give_slot(entry)
        self._unref(entry)

    def _usable(self, key: str, spec: LoadSpec) -> _Entry | None:
        entry = self._loaded.get(key)
        if (
            entry is None
            or entry.state is not _State.READY
            or entry.draining
            or entry.spec != spec
            or not entry.runner.alive
        ):
            return None
        return entry

    async def _reference(
        self, model: ModelRef, spec: LoadSpec, keep_alive: float | None
    ) -> tuple[_Entry, int]:
        """A reference on a ready runner, loading it (in line with other loads) if needed.

        The load runs in its own task so that a requester that goes away (client
        disconnect) neither leaves a half-started worker nor lets the next load start
        before this one is done; a runner loaded for nobody is released and expires
        normally.
        """
        entry = self._usable(model.key, spec)
        if entry is not None:
            self._follow_pin(entry, model)
            self._ref(entry, keep_alive)
            return entry, 0
        ticket = _Ticket(model, spec, keep_alive)
        task = self._spawn(self._load(ticket))
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            ticket.abandoned = True
            task.add_done_callback(self._drop_abandoned)
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise InternalError("the scheduler is shutting down") from None
            raise
        assert result is not None  # None only for abandoned tickets
        return result

    def _drop_abandoned(self, task: asyncio.Task[tuple[_Entry, int] | None]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            return
        result = task.result()
        if result is not None:
            self._unref(result[0])

    async def _take_slot(self, entry: _Entry) -> None:
        if entry.slot_free():
            entry.active += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        entry.slot_waiters.append(waiter)
        try:
            await waiter  # _give_slot hands its slot over: ``active`` already counts us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give_slot(entry)
            else:
                entry.slot_waiters.remove(waiter)
            raise

    def _give_slot(self, entry: _Entry) -> None:
        while entry.slot_waiters:
            waiter = entry.slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        entry.active -= 1

    @staticmethod
    def _follow_pin(entry: _Entry, model: ModelRef) -> None:
        """A reloaded preset may pin or unpin a loaded model: its next request says which."""
        if entry.model.pinned != model.pinned:
            entry.model = dataclasses.replace(entry.model, pinned=model.pinned)
            if model.pinned:
                entry.keep_alive = math.inf

    def _ref(self, entry: _Entry, keep_alive: float | None) -> None:
        entry.refs += 1
        self._cancel_timer(entry)
        if entry.model.pinned:
            keep_alive = math.inf  # a request's keep_alive cannot unpin it
        if keep_alive is not None:
            entry.keep_alive = keep_alive
            entry.expired = False
        entry.last_used = self._clock()

    def _unref(self, entry: _Entry) -> None:
        entry.refs -= 1
        entry.last_used = self._clock()
        if entry.refs == 0:
            self._on_idle(entry)
        self._changed.notify()

    def _on_idle(self, entry: _Entry) -> None:
        if entry.state is not _State.READY or entry.draining:
            return  # being unloaded already, or a retire() is waiting for this moment
        if self._shut or not entry.runner.alive or entry.keep_alive <= 0:
            reason = (
                "shutdown" if self._shut else "crashed" if not entry.runner.alive else "requested"
            )
            self._begin_unload(entry, reason)
        elif math.isinf(entry.keep_alive):
            entry.idle_deadline = math.inf
        else:
            entry.idle_deadline = self._clock() + entry.keep_alive
            entry.timer = self._clock.call_later(entry.keep_alive, partial(self._on_timer, entry))

    def _on_timer(self, entry: _Entry) -> None:
        entry.timer = None
        if entry.refs == 0 and entry.state is _State.READY and not entry.draining:
            log.debug("keep-alive expired, unloading %s", entry.model.name)
            self._begin_unload(entry, "expired")

    def _cancel_timer(self, entry: _Entry) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        entry.idle_deadline = None

    # -- loading -----------------------------------------------------------------------------

    async def _load(self, ticket: _Ticket) -> tuple[_Entry, int] | None:
        async with self._load_lock:
            if ticket.abandoned:
                return None
            self._check_open()
            key = ticket.model.key
            while (entry := self._loaded.get(key)) is not None:
                if self._usable(key, ticket.spec) is entry:
                    self._ref(entry, ticket.keep_alive)
                    return entry, 0
                log.debug("reloading %s (spec changed or runner stopped)", ticket.model.name)
                await self._retire(entry, "reload")
            await self._make_room(ticket)
            if ticket.abandoned:
                return None
            return await self._start(ticket)

    async def _make_room(self, ticket: _Ticket) -> None:
        """Evict until the model may load: under ``max_loaded_models``, within system memory
        and within each accelerator's room (see the module docstring)."""
        limit = max(self._settings.max_loaded_models or DEFAULT_MAX_LOADED_MODELS, 1)
        required = ticket.model.estimate_bytes
        while True:
            await self._wait_closing()
            others = list(self._loaded.values())
            memory = self._probe()
            fits = required <= memory.available
            on_devices = self._fits_devices(ticket.model)
            if fits and on_devices and len(others) < limit:
                return
            if not fits:
                reclaimable = sum(entry.host_memory for entry in others)
                if required > memory.available + reclaimable:
                    raise insufficient_memory(
                        ticket.model.name, required, memory.available + reclaimable
                    )
            elif not others:
                return  # only the device plan is short, and nothing is left to evict
            victim = self._pick_victim(others)
            if victim is None:
                raise _all_pinned(ticket.model.name, others)
            log.info("unloading %s to make room for %s", victim.model.name, ticket.model.name)
            await self._retire(victim, "evicted")

    def _fits_devices(self, model: ModelRef) -> bool:
        """Whether the model's planned device part fits beside the loaded runners."""
        if not model.device_bytes:
            return True
        room = device_room(self.devices(), self.device_usage(), self._settings.gpu_overhead)
        return all(need <= room.get(name, 0) for name, need in model.device_bytes.items())

    def _pick_victim(self, entries: list[_Entry]) -> _Entry | None:
        """The least recently used runner, idle ones first; never a pinned one."""
        movable = [e for e in entries if not e.model.pinned]
        idle = [e for e in movable if e.refs == 0 and e.state is _State.READY]
        return min(idle or movable, key=lambda e: e.last_used, default=None)

    async def _start(self, ticket: _Ticket) -> tuple[_Entry, int]:
        model, spec = ticket.model, ticket.spec
        keep_alive = self._settings.keep_alive if ticket.keep_alive is None else ticket.keep_alive
        if model.pinned:
            keep_alive = math.inf
        runner = self._factory(spec)
        entry = _Entry(model, spec, runner, keep_alive=normalize_keep_alive(keep_alive))
        entry.last_used = started = self._clock()
        self._loaded[model.key] = entry
        try:
            info = await runner.start()
        except BaseException:
            log.info("loading %s failed", model.name)
            await asyncio.shield(self._begin_unload(entry, "crashed"))
            raise
        entry.info = info
        shortfall = offload_shortfall(spec, info, self._inventory)
        if self._settings.require_gpu and info.gpu_layers == 0:
            await asyncio.shield(self._begin_unload(entry, "refused"))
            raise _gpu_required(model.name, shortfall or "llama.cpp offloaded no layer")
        if shortfall:
            log.warning("%s: %s; the rest runs on the CPU", model.name, shortfall)
        entry.state = _State.READY
        load_ns = max(int((self._clock() - started) * 1e9), 0)
        self._ref(entry, None)
        log.info("loaded %s (pid %s) in %.2fs", model.name, info.pid, load_ns / 1e9)
        self._telemetry.model_loaded(model.name, load_ns / 1e9)
        return entry, load_ns

    # -- unloading ---------------------------------------------------------------------------

    async def _retire(self, entry: _Entry, reason: str) -> None:
        """Stop new references, wait until nobody holds the runner, then unload it."""
        entry.draining = True
        self._cancel_timer(entry)
        while entry.refs > 0 and entry.closing is None:
            await self._changed.wait()
        await asyncio.shield(self._begin_unload(entry, reason))

    def _begin_unload(self, entry: _Entry, reason: str) -> asyncio.Task[None]:
        """Forget the runner now (new requests load afresh) and close it in the background;
        idempotent. Callers guarantee ``refs == 0`` except during shutdown."""
        if entry.closing is not None:
            return entry.closing
        if entry.state is _State.READY:
            self._telemetry.model_unloaded(entry.model.name, reason)
        self._cancel_timer(entry)
        if self._loaded.get(entry.model.key) is entry:
            del self._loaded[entry.model.key]
        entry.state = _State.CLOSING
        task = asyncio.get_running_loop().create_task(self._close_runner(entry))
        entry.closing = task
        self._closing.add(task)
        task.add_done_callback(self._closed)
        self._changed.notify()
        return task

    async def _close_runner(self, entry: _Entry) -> None:
        try:
            await entry.runner.close()
        except Exception:
            log.exception("closing the runner of %s failed", entry.model.name)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        self._changed.notify()

    async def _wait_closing(self) -> None:
        """Memory is only free once closing workers have exited."""
        while self._closing:
            await asyncio.shield(asyncio.gather(*self._closing, return_exceptions=True))

    async def expire(self, key: str) -> None:
        """Ollama's unload request (empty prompt with ``keep_alive: 0``): unload the runner
        now if idle, else as soon as its last request finishes. Not loaded: nothing to do."""
        entry = self._loaded.get(key)
        if entry is None:
            return
        entry.keep_alive = 0.0
        entry.expired = True
        self._cancel_timer(entry)
        if entry.refs == 0 and entry.state is _State.READY and not entry.draining:
            await asyncio.shield(self._begin_unload(entry, "requested"))

    # -- status and lifecycle -----------------------------------------------------------------

    def loaded(self) -> list[LoadedModel]:
        """``/api/ps``: every loaded or loading runner, latest expiry first. A busy or loading
        runner expires ``keep_alive`` after now at the earliest; one being unloaded, now."""
        now_clock, now_wall = self._clock(), self._wall()
        rows: list[LoadedModel] = []
        for entry in list(self._loaded.values()):
            if entry.state is _State.READY and not entry.runner.alive:
                continue  # its worker died; the next request drops and reloads it
            if entry.expired or entry.draining:
                expires = now_wall
            elif entry.idle_deadline is not None:
                expires = expiry_datetime(now_wall, entry.idle_deadline - now_clock)
            else:
                expires = expiry_datetime(now_wall, entry.keep_alive)
            info = entry.info
            rows.append(
                LoadedModel(
                    name=entry.model.name,
                    model=entry.model.name,
                    size=entry.memory,
                    digest=entry.model.digest,
                    details=entry.model.details,
                    expires_at=expires,
                    size_vram=_size_vram(info, entry.memory),
                    context_length=info.n_ctx if info is not None else entry.spec.num_ctx,
                    device_bytes=dict(info.device_bytes) if info is not None else {},
                )
            )
        rows.sort(key=lambda row: row.expires_at, reverse=True)
        return rows

    async def shutdown(self) -> None:
        """Stop loading, close every runner (busy ones too), and wait for them to exit."""
        self._shut = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in list(self._loaded.values()):
            self._begin_unload(entry, "shutdown")
        await self._wait_closing()

    def devices(self) -> tuple[DeviceInfo, ...]:
        """The compute devices of the inventory the scheduler was given."""
        return self._inventory.devices

    def add_devices(self, devices: Sequence[DeviceInfo]) -> None:
        """Devices found after the start (an RPC server that was down then is back): the
        next load plans on them."""
        known = {d.name for d in self._inventory.devices}
        fresh = tuple(d for d in devices if d.name not in known)
        if fresh:
            self._inventory = dataclasses.replace(
                self._inventory, devices=self._inventory.devices + fresh
            )

    def loaded_spec(self, key: str) -> LoadSpec | None:
        """The spec of the runner loaded (or loading) for ``key`` that new requests may still
        share, else None: an automatic placement reuses its layers rather than reload
        (Ollama's ``num_gpu`` -1 matches any loaded runner)."""
        entry = self._loaded.get(key)
        if entry is None or entry.draining or entry.state is _State.CLOSING:
            return None
        return entry.spec

    def device_usage(self) -> dict[str, int]:
        """Bytes the loaded runners hold on each accelerator."""
        used: dict[str, int] = {}
        for entry in self._loaded.values():
            for name, size in entry.device_memory.items():
                used[name] = used.get(name, 0) + size
        return used

    def _check_open(self) -> None:
        if self._shut:
            raise InternalError("the scheduler is shutting down")

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
