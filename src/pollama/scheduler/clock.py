"""The scheduler's clock: the time it reads and the keep-alive timers that run on that time.

One object gives both, so that whatever drives the time drives the timers too. In production
that is :data:`MONOTONIC`: ``time.monotonic`` and the running event loop's own timers (the
loop's clock is monotonic as well). A test passes a fake whose timers fire when the test moves
its time forward, so a keep-alive test waits for no real time and has no margin to lose on a
busy machine.

What must stay true of every clock: a timer's callback runs on the event loop's thread, only
after the call that set it has returned, at most once, and never after its :meth:`Timer.cancel`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["MONOTONIC", "Clock", "MonotonicClock", "Timer"]


class Timer(Protocol):
    """A pending callback (``asyncio.TimerHandle`` is one)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds, and callbacks after a number of those seconds."""

    def __call__(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and ``loop.call_later`` on the running loop."""

    def __call__(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)


MONOTONIC = MonotonicClock()
