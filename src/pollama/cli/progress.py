"""Progress output for create/pull/push, as Ollama's CLI shows it (spec §1.5).

Status lines are spinners that stay on screen once done; transfers with a size are bars
(``<title> <pct>% ▕██  ▏ <done>/<total>  <rate>/s  <eta>``). On a terminal this is drawn
with rich; otherwise each status is printed once as a plain line, with no escape codes,
so logs and pipes stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.progress import Progress, ProgressColumn, Task, TaskID
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from pollama.format import human_bytes


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds >= 99 * 3600:
        return "99h+"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class _LineColumn(ProgressColumn):
    """One column that draws either a spinner status or a transfer bar."""

    def __init__(self) -> None:
        super().__init__()
        self._spinner = Spinner("dots")

    def render(self, task: Task) -> RenderableType:
        if not task.fields.get("bar"):
            mark: RenderableType = (
                Text(" ") if task.finished else self._spinner.render(time.monotonic())
            )
            grid = Table.grid(padding=(0, 1))
            grid.add_row(Text(task.description), mark)
            return grid
        total = int(task.total or 0)
        done = int(task.completed)
        pct = 100.0 * done / total if total else 0.0
        speed = task.finished_speed or task.speed
        rate = f"{human_bytes(int(speed))}/s" if speed else ""
        eta = "" if task.finished else _eta(task.time_remaining)
        grid = Table.grid(padding=(0, 1))
        grid.add_row(
            Text(f"{task.description} {pct:3.0f}%"),
            Text("▕"),
            ProgressBar(total=max(total, 1), completed=done, width=25),
            Text(f"▏ {human_bytes(done)}/{human_bytes(total)}  {rate}  {eta}".rstrip()),
        )
        return grid


class ProgressDisplay:
    """Feed it server progress objects (``handle``) or client-side steps."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._tasks: dict[str, TaskID] = {}
        self._current_status: TaskID | None = None
        self._last_plain: str | None = None
        self._progress: Progress | None = None
        if self.tty:
            console = Console(file=self.stream)
            self._progress = Progress(_LineColumn(), console=console, transient=False)
            self._progress.start()

    def status(self, text: str) -> None:
        if self._progress is None:
            if text != self._last_plain:
                print(text, file=self.stream, flush=True)
                self._last_plain = text
            return
        self._finish_status()
        if text in self._tasks:
            return
        self._current_status = self._progress.add_task(text, total=1)
        self._tasks[text] = self._current_status

    def bar(self, key: str, title: str, completed: int, total: int) -> None:
        if self._progress is None:
            if completed >= total and key not in self._tasks:
                self._tasks[key] = TaskID(0)
                print(f"{title} 100% {human_bytes(total)}", file=self.stream, flush=True)
            return
        self._finish_status()
        task = self._tasks.get(key)
        if task is None:
            task = self._progress.add_task(title, total=total, bar=True)
            self._tasks[key] = task
        self._progress.update(task, completed=completed, total=total, description=title)

    def handle(self, item: dict[str, Any]) -> None:
        """Show one progress object of the create/pull/push streams."""
        status = str(item.get("status", ""))
        digest = item.get("digest")
        total = item.get("total") or 0
        if digest and total:
            completed = item.get("completed") or 0
            title = status or f"pushing {str(digest)[7:19]}..."
            self.bar(str(digest) + status, title, int(completed), int(total))
        elif status:
            self.status(status)

    def _finish_status(self) -> None:
        if self._progress is not None and self._current_status is not None:
            self._progress.update(self._current_status, completed=1)
            self._current_status = None

    def close(self) -> None:
        self._finish_status()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
