"""Progress output for create/pull/push and the "waiting" spinner of ``run``
(docs/ollama-behaviour.md#progress-display).

This is a port of Ollama's ``progress`` package, so a terminal shows the same thing:

* a :class:`Spinner` is a status line (``gathering model components ⠋``) that keeps its
  text, without the spinner, once stopped;
* a :class:`Bar` is one transfer, laid out exactly as ``progress/bar.go`` lays it out:
  ``<msg> <pct>% ▕████    ▏ <cur>/<total>  <rate>/s  <eta>``, stretched to the terminal width
  that is read on every frame (so a resized terminal redraws right);
* :class:`Progress` owns the list of lines and a thread that redraws them every 100 ms on
  stderr, moving the cursor back up over the previous frame.

:class:`ProgressDisplay` is what commands use. When its stream is not a terminal it draws
nothing and prints each status once as a plain line (and each finished transfer once as
``<title> 100% <size>``), with no escape codes, so logs and pipes stay readable.

What must stay true: only the render thread and ``stop``/``stop_and_clear`` write to the
stream, always under the lock; a stopped :class:`Progress` never writes again.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

from pollama.format import go_duration, human_bytes

DEFAULT_WIDTH, DEFAULT_HEIGHT = 80, 24
_TICK = 0.1

Clock = Callable[[], float]


def terminal_size(stream: TextIO) -> tuple[int, int]:
    """The stream's terminal size, or 80x24 when it is not a terminal (as Go's fallback)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return DEFAULT_WIDTH, DEFAULT_HEIGHT
    return size.columns or DEFAULT_WIDTH, size.lines or DEFAULT_HEIGHT


def format_eta(seconds: float) -> str:
    """Go ``progress.formatDuration``: ``45s``, ``1m30s``, ``2h5m``, ``99h+``."""
    if seconds >= 100 * 3600:
        return "99h+"
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds // 60) % 60}m"
    return go_duration(round(seconds) * 1_000_000_000)


def _pad(text: str, width: int) -> str:
    """Right-align ``text`` in ``width`` columns, as Ollama's ``repeat(" ", 6-len(x)) + x``."""
    return " " * max(0, width - len(text)) + text


class State(Protocol):
    def render(self, width: int) -> str: ...


class Spinner:
    """A status line with an animated braille spinner until :meth:`stop`."""

    PARTS = ("⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏")

    def __init__(self, message: str = "", *, clock: Clock = time.monotonic) -> None:
        self.message = message
        self._clock = clock
        self._started = clock()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def render(self, width: int) -> str:
        out = self.message.strip() + " " if self.message else ""
        if not self.stopped:
            frame = int((self._clock() - self._started) / _TICK) % len(self.PARTS)
            out += self.PARTS[frame] + " "
        return out


class Bar:
    """One transfer: percent, a bar filling the width, sizes, rate and time left.

    The rate is measured over the last 10 one-second buckets while running and over the
    whole transfer once done, as Ollama does; a finished bar shows no rate or ETA.
    """

    def __init__(
        self, message: str, total: int, initial: int = 0, *, clock: Clock = time.monotonic
    ) -> None:
        self.message = message
        self.total = total
        self.initial = initial
        self.current = initial
        self._clock = clock
        self._started = clock()
        self._stopped: float | None = self._started if initial >= total else None
        self._buckets: list[tuple[float, int]] = []

    @property
    def done(self) -> bool:
        return self._stopped is not None

    def set(self, value: int) -> None:
        value = min(value, self.total)
        self.current = value
        now = self._clock()
        if value >= self.total and self._stopped is None:
            self._stopped = now
        if not self._buckets or now - self._buckets[-1][0] > 1.0:
            self._buckets.append((now, value))
            del self._buckets[:-10]

    def percent(self) -> float:
        return 100.0 * self.current / self.total if self.total > 0 else 0.0

    def rate(self) -> float:
        """Bytes per second; Go rounds the time spans to whole seconds, so does this."""
        if self._stopped is not None:
            amount = self.current - self.initial
            span = round(self._stopped - self._started)
        elif len(self._buckets) == 1:
            amount = self._buckets[0][1] - self.initial
            span = round(self._buckets[0][0] - self._started)
        elif self._buckets:
            (t0, v0), (t1, v1) = self._buckets[0], self._buckets[-1]
            amount, span = v1 - v0, round(t1 - t0)
        else:
            return 0.0
        return amount / span if span else 0.0

    def render(self, width: int) -> str:
        pre = (self.message.strip() + " " if self.message else "") + f"{self.percent():3.0f}%"
        running = self._stopped is None
        if running:
            suf = _pad(human_bytes(self.current), 6) + "/" + _pad(human_bytes(self.total), 6)
        else:
            suf = _pad(human_bytes(self.total), 6) + " " * 7
        rate = self.rate()
        if running and rate > 0:
            suf += "  " + _pad(human_bytes(int(rate)), 6) + "/s"
            suf += "  " + _pad(format_eta(int((self.total - self.current) / rate)), 6)
        else:
            suf += " " * 18
        room = width - len(pre) - len(suf) - 5
        filled = int(room * self.percent() / 100)
        mid = " ▕" + "█" * max(0, filled) + " " * max(0, room - filled) + "▏ "
        return pre + mid + suf


class Progress:
    """Redraws a list of :class:`State` lines on a terminal every 100 ms (Go ``Progress``)."""

    def __init__(self, stream: TextIO, *, start: bool = True) -> None:
        self.stream = stream
        self.states: list[State] = []
        self._lock = threading.Lock()
        self._pos = 0
        self._stopped = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
            self._thread.start()

    def add(self, state: State) -> None:
        with self._lock:
            self.states.append(state)

    def _loop(self) -> None:
        while not self._wake.wait(_TICK):
            self.render()

    def render(self) -> None:
        with self._lock:
            if not self._stopped:
                self._render_locked()

    def _render_locked(self) -> None:
        width, height = terminal_size(self.stream)
        out = ["\x1b[?2026h\x1b[?25l", "\x1b[A" * max(0, self._pos - 1), "\x1b[1G"]
        shown = self.states[-height:] if height > 0 else self.states
        for i, state in enumerate(shown):
            out.append(state.render(width) + "\x1b[K")
            if i < len(shown) - 1:
                out.append("\n")
        out.append("\x1b[?25h\x1b[?2026l")
        self._pos = len(shown)
        self._write("".join(out))

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not turn a finished command into a crash

    def _halt(self) -> bool:
        """Stop the thread and spinners and draw the final frame; False if already stopped."""
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._stopped:
                return False
            for state in self.states:
                if isinstance(state, Spinner):
                    state.stop()
            return True

    def stop(self) -> bool:
        """Leave the final frame on screen, followed by a newline."""
        if not self._halt():
            return False
        with self._lock:
            if self.states:
                self._render_locked()
                self._write("\n")
            self._stopped = True
        return True

    def stop_and_clear(self) -> bool:
        """Erase every line drawn, leaving the cursor where the first one began."""
        if not self._halt():
            return False
        with self._lock:
            if self._pos:
                lines = "".join(
                    ("\x1b[A" if i else "") + "\x1b[2K\x1b[1G" for i in range(self._pos)
                )
                self._write("\x1b[?25l" + lines + "\x1b[?25h")
            self._stopped = True
        return True


class ProgressDisplay:
    """What commands feed: statuses (spinners), transfers (bars), or server progress objects.

    ``stream`` defaults to stderr, as in Ollama. Use it as a context manager: on exit the
    last frame stays on screen (:meth:`close`); :meth:`clear` erases it instead.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self._progress = Progress(self.stream) if self.tty else None
        self._bars: dict[str, Bar] = {}
        self._printed: set[str] = set()
        self._status: str | None = None
        self._spinner: Spinner | None = None

    def status(self, text: str) -> None:
        """A new status line; the previous one stops spinning (a repeat is ignored)."""
        if text == self._status:
            return
        self._status = text
        if self._progress is None:
            print(text, file=self.stream, flush=True)
            return
        self._stop_spinner()
        self._spinner = Spinner(text)
        self._progress.add(self._spinner)

    def bar(self, key: str, title: str, completed: int, total: int) -> None:
        """Create or advance the transfer ``key``."""
        if self._progress is None:
            if completed >= total and key not in self._printed:
                self._printed.add(key)
                print(f"{title} 100% {human_bytes(total)}", file=self.stream, flush=True)
            return
        self._stop_spinner()
        bar = self._bars.get(key)
        if bar is None:
            bar = self._bars[key] = Bar(title, total, completed)
            self._progress.add(bar)
        bar.total = total
        bar.set(completed)

    def handle(self, item: dict[str, Any], *, default_verb: str = "pulling") -> None:
        """One progress object of the create (or push) stream, as Ollama's CreateHandler:
        a digest makes a bar titled by the status (or ``<verb> <12 hex>...``)."""
        status = str(item.get("status") or "")
        digest = item.get("digest")
        if digest:
            title = status or f"{default_verb} {str(digest)[7:19]}..."
            self.bar(str(digest), title, int(item.get("completed") or 0),
                     int(item.get("total") or 0))
        elif status:
            self.status(status)

    def handle_pull(self, item: dict[str, Any]) -> None:
        """One progress object of the pull stream, as Ollama's ``pullModelWithProgress``:
        the first update of a layer (``completed`` 0) is skipped, bars are titled
        ``pulling <12 hex>:``."""
        digest = item.get("digest")
        if not digest:
            if item.get("status"):
                self.status(str(item["status"]))
            return
        completed = int(item.get("completed") or 0)
        if completed == 0:
            return
        name = str(digest).removeprefix("sha256:").strip()[:12]
        self.bar(str(digest), f"pulling {name}:", completed, int(item.get("total") or 0))

    def _stop_spinner(self) -> None:
        if self._spinner is not None:
            self._spinner.stop()
            self._spinner = None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

    def clear(self) -> None:
        if self._progress is not None:
            self._progress.stop_and_clear()

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WaitSpinner:
    """The bare spinner ``run`` shows on stderr while the model loads or starts answering.

    Drawn only when stderr is a terminal; :meth:`stop` erases it so the answer starts on a
    clean line. Safe to stop twice.
    """

    def __init__(self, message: str = "", stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        self._progress: Progress | None = None
        if _isatty(stream):
            self._progress = Progress(stream)
            self._progress.add(Spinner(message))

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop_and_clear()
            self._progress = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


__all__ = [
    "Bar",
    "Progress",
    "ProgressDisplay",
    "Spinner",
    "WaitSpinner",
    "format_eta",
    "terminal_size",
]
