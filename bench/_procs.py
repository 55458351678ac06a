"""Starting, watching and stopping the servers under test; memory from /proc.

Every process here is started by the benchmark in its own session; it is stopped by pid
(the server first, then any of its descendants still alive), never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: split after the last ')'
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all of its descendants that are alive now."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if Path(f"/proc/{p}").exists():
            out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Memory:
    rss: int  # bytes, summed over the process tree
    pss: int  # bytes, proportional share (shared mmap pages counted once)
    processes: int
    split: dict[str, int]  # RSS bytes by role: "server", "worker", or the program name


def _role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if any("runner.worker" in w for w in words):
        return "worker"
    if "serve" in words:
        return "server"
    return Path(words[0]).name if words else "?"


def tree_memory(pid: int) -> Memory:
    pids = process_tree(pid)
    split: dict[str, int] = {}
    for p in pids:
        role = _role(p)
        split[role] = split.get(role, 0) + _status_kb(p, "VmRSS") * 1024
    return Memory(
        rss=sum(split.values()),
        pss=sum(_pss_kb(p) for p in pids) * 1024,
        processes=len(pids),
        split=split,
    )


class Server:
    """A server process started by the benchmark, logging to a file."""

    def __init__(
        self, name: str, cmd: list[str], env: Mapping[str, str], log_path: Path, cwd: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            env=dict(env),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                last = (self.log_tail(1) or "(no output)").strip()
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}: {last} "
                    f"(log: {self.log_path})"
                )
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; log: {self.log_path}")

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        tree = process_tree(self.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid in tree[1:]:
            _stop_pid(pid)
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _stop_pid(pid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)


# --- other people's CPU use during a measurement --------------------------------------------
#
# The 2-core machines are shared with other sessions (tests, builds). A measurement taken while
# something else computes is worth nothing, so each one is bracketed by two snapshots: the CPU
# time the whole machine spent busy (steal included) minus the CPU time of this process tree.

_HZ = os.sysconf("SC_CLK_TCK")
_NCPU = os.cpu_count() or 1


@dataclass
class CpuSnapshot:
    wall: float
    busy: int  # jiffies, whole machine: user nice system irq softirq steal
    mine: int  # jiffies of this process, its reaped children and its live descendants


def _proc_jiffies(pid: int | str) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[11..14] = utime stime cutime cstime (stat fields 14-17)
    return sum(int(x) for x in fields[11:15])


def cpu_snapshot() -> CpuSnapshot:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    busy = user + nice + system + irq + softirq + steal
    mine = sum(_proc_jiffies(p) for p in process_tree(os.getpid()))
    return CpuSnapshot(time.monotonic(), busy, mine)


def foreign_load(a: CpuSnapshot, b: CpuSnapshot) -> float:
    """Fraction of the machine's CPUs used by others between two snapshots (0..1)."""
    wall = b.wall - a.wall
    if wall <= 0:
        return 0.0
    foreign = (b.busy - a.busy) - (b.mine - a.mine)
    return max(0.0, foreign / (wall * _HZ * _NCPU))


def wait_quiet(threshold: float = 0.1, window: float = 1.0, patience: float = 120.0) -> float:
    """Wait until others use less than ``threshold`` of the CPUs for one window; return it."""
    deadline = time.monotonic() + patience
    while True:
        a = cpu_snapshot()
        time.sleep(window)
        load = foreign_load(a, cpu_snapshot())
        if load < threshold or time.monotonic() > deadline:
            return load


def add_quiet_options(ap: Any, *, repeats: int, patience: float = 60.0,
                      llama_server: bool = True) -> None:
    """The options of a benchmark that measures in interleaved repeats on a shared machine:
    ``--threads``, ``--repeats``, ``--max-foreign`` (measure again when other processes used
    more of the CPUs), ``--patience`` (seconds to wait for quiet), ``--tries``, ``--out`` and,
    with a peer, ``--no-llama-server``."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=repeats)
    if llama_server:
        ap.add_argument("--no-llama-server", dest="llama_server", action="store_false")
    ap.add_argument("--max-foreign", type=float, default=0.10)
    ap.add_argument("--patience", type=float, default=patience)
    ap.add_argument("--tries", type=int, default=3, help="per measurement, on a busy machine")
    ap.add_argument("--out", type=Path)


T = TypeVar("T")


def quiet_measure(work: Callable[[], T], args: Any,
                  prepare: Callable[[], object] = lambda: None) -> tuple[T, float]:
    """``work()`` measured on a quiet machine: ``prepare()``, wait for quiet
    (``args.max_foreign``, ``args.patience``), run it, and again (up to ``args.tries``
    times) while other processes used more than ``max_foreign`` of the CPUs meanwhile.
    Returns the last result and the share of the CPUs others used during it."""
    for _ in range(max(1, args.tries)):
        prepare()
        wait_quiet(args.max_foreign, patience=args.patience)
        before = cpu_snapshot()
        result = work()
        foreign = foreign_load(before, cpu_snapshot())
        if foreign <= args.max_foreign:
            break
    return result, foreign
