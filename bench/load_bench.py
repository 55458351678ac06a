"""Load and fault benchmark: pollama under a burst, a long sequence, and killed workers.

Three measurements against a real ``pollama serve`` on loopback with the default model:

* **burst**: N concurrent clients against ``OLLAMA_MAX_QUEUE=Q``. Every request must end with
  a response or a 503 that carries ``Retry-After``; none may hang; the server's RSS must come
  back to within 10 % of its idle level afterwards.
* **sequential**: M requests one after another; open file descriptors, threads and RSS of the
  server must not grow beyond noise.
* **kills**: K times, the worker is SIGKILLed while a response streams; the stream must end
  with an error line and the next request must succeed (a fresh worker is loaded).

The full scale is the issue's (200 clients, queue 32, 1,000 requests, 10 kills); the test
suite runs the same functions at a small scale (``tests/security/test_load_faults.py``).

Usage::

    .venv/bin/python bench/load_bench.py                      # full scale, ~3-5 min on 2 cores
    .venv/bin/python bench/load_bench.py --clients 50 --queue 8 --sequential 200 --kills 3

It prints one JSON object and writes it to ``bench/results/load-<date>.json``. Every process
is started here and stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

MODEL = "smollm2:135m"
PROMPT = "Write one short sentence about the sea."


# -- the server ---------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    home: Path
    env: dict[str, str]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(home: Path, extra_env: dict[str, str] | None = None) -> Server:
    """``pollama serve`` on a free loopback port, with ``home`` as HOME; waits for /healthz."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "POLLAMA_"))}
    env.update({"HOME": str(home), "OLLAMA_HOST": f"127.0.0.1:{port}",
                "OLLAMA_MODELS": str(home / ".ollama" / "models"),
                "POLLAMA_ACCESS_LOG": str(home / "access.log"),
                # every simulated client comes from 127.0.0.1: no per-address cap
                "POLLAMA_MAX_CONNECTIONS_PER_CLIENT": "0", **(extra_env or {})})  # fmt: skip
    log = home / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pollama", "serve"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", proc, home, env, log)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server did not start:\n{log.read_text()}")
        time.sleep(0.1)


def ensure_model(server: Server) -> None:
    """Register the default model in the server's store (through the CLI, as a user would)."""
    from pollama.default_model import default_modelfile

    modelfile = server.home / "Modelfile"
    modelfile.write_text(default_modelfile())
    done = subprocess.run([sys.executable, "-m", "pollama", "create", MODEL, "-f",
                           str(modelfile)], env=server.env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"create failed: {done.stderr}")


# -- /proc --------------------------------------------------------------------------------------


def proc_stats(pid: int) -> dict[str, int]:
    """RSS (KiB), open file descriptors and threads of one process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return {
        "rss_kb": rss,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
    }


def worker_pids(server_pid: int) -> list[int]:
    """The model workers started by this server (children running pollama.runner.worker)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == server_pid and b"pollama.runner.worker" in cmdline:
            pids.append(int(entry))
    return pids


def settle_rss(pid: int, seconds: float = 3.0) -> int:
    """The lowest RSS seen over ``seconds`` (allocators give memory back lazily)."""
    low = proc_stats(pid)["rss_kb"]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        low = min(low, proc_stats(pid)["rss_kb"])
    return low


# -- the three measurements ----------------------------------------------------------------------


def _body(num_predict: int, stream: bool = False) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, "stream": stream, "keep_alive": "10m",
            "options": {"num_predict": num_predict, "temperature": 0}}  # fmt: skip


@dataclass
class BurstResult:
    clients: int
    ok: int = 0
    busy: int = 0
    busy_without_retry_after: int = 0
    other: dict[str, int] = field(default_factory=dict)
    hung: int = 0
    wall_s: float = 0.0
    max_latency_s: float = 0.0
    rss_idle_kb: int = 0
    rss_peak_kb: int = 0
    rss_after_kb: int = 0

    @property
    def rss_growth(self) -> float:
        idle = self.rss_idle_kb
        return (self.rss_after_kb - idle) / idle if idle else 0.0


async def _burst(url: str, clients: int, num_predict: int, timeout: float) -> BurstResult:
    result = BurstResult(clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        start = asyncio.Event()

        async def one() -> None:
            await start.wait()
            began = time.monotonic()
            try:
                response = await http.post("/api/generate", json=_body(num_predict))
            except httpx.TimeoutException:
                result.hung += 1
                return
            except httpx.HTTPError as exc:
                key = type(exc).__name__
                result.other[key] = result.other.get(key, 0) + 1
                return
            result.max_latency_s = max(result.max_latency_s, time.monotonic() - began)
            if response.status_code == 200 and response.json().get("done"):
                result.ok += 1
            elif response.status_code == 503:
                result.busy += 1
                if "retry-after" not in response.headers:
                    result.busy_without_retry_after += 1
            else:
                key = str(response.status_code)
                result.other[key] = result.other.get(key, 0) + 1

        tasks = [asyncio.create_task(one()) for _ in range(clients)]
        await asyncio.sleep(0.05)
        began = time.monotonic()
        start.set()
        await asyncio.gather(*tasks)
        result.wall_s = time.monotonic() - began
    return result


def burst(server: Server, clients: int, *, num_predict: int = 8, timeout: float = 300.0,
          warmup: int = 3) -> BurstResult:  # fmt: skip
    """``clients`` simultaneous requests; RSS idle (after a warm-up), peak and settled."""
    with httpx.Client(base_url=server.url, timeout=timeout) as http:
        for _ in range(warmup):  # model loaded, caches filled, thread pool started
            http.post("/api/generate", json=_body(num_predict)).raise_for_status()
    idle = settle_rss(server.pid, 1.0)
    peak = [idle]
    stop = False

    def watch() -> None:
        while not stop:
            peak[0] = max(peak[0], proc_stats(server.pid)["rss_kb"])
            time.sleep(0.05)

    import threading

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = asyncio.run(_burst(server.url, clients, num_predict, timeout))
    finally:
        stop = True
        watcher.join()
    result.rss_idle_kb, result.rss_peak_kb = idle, peak[0]
    result.rss_after_kb = settle_rss(server.pid)
    return result


@dataclass
class SequentialResult:
    requests: int
    failures: int = 0
    wall_s: float = 0.0
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)


def sequential(server: Server, requests: int, *, num_predict: int = 2, warmup: int = 20,
               generate_every: int = 1) -> SequentialResult:  # fmt: skip
    """``requests`` requests one after another, each on a new connection (as scripts do):
    a generation every ``generate_every`` requests, ``/api/show`` and ``/api/tags`` between.
    /proc counts of the server are taken after a warm-up and at the end."""
    result = SequentialResult(requests)
    fresh = httpx.Limits(max_keepalive_connections=0)  # a new TCP connection per request
    http = httpx.Client(base_url=server.url, limits=fresh, timeout=120)

    def run(n: int) -> int:
        failures = 0
        for i in range(n):
            try:
                if i % generate_every == 0:
                    response = http.post("/api/generate", json=_body(num_predict))
                elif i % 2:
                    response = http.post("/api/show", json={"model": MODEL})
                else:
                    response = http.get("/api/tags")
                failures += response.status_code != 200
            except httpx.HTTPError:
                failures += 1
        return failures

    run(warmup)
    time.sleep(0.5)
    result.before = {**proc_stats(server.pid), "rss_kb": settle_rss(server.pid, 1.0)}
    began = time.monotonic()
    result.failures = run(requests)
    result.wall_s = time.monotonic() - began
    time.sleep(0.5)
    result.after = {**proc_stats(server.pid), "rss_kb": settle_rss(server.pid, 1.0)}
    http.close()
    return result


@dataclass
class KillResult:
    kills: int
    error_lines: int = 0
    streams_without_error: int = 0
    recovered: int = 0
    details: list[str] = field(default_factory=list)


def kill_during_streams(server: Server, kills: int) -> KillResult:
    """SIGKILL the worker while a response streams, ``kills`` times."""
    result = KillResult(kills)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        http.post("/api/generate", json=_body(1)).raise_for_status()  # loaded
        for _ in range(kills):
            saw_error = False
            with http.stream("POST", "/api/generate", json=_body(400, stream=True)) as response:
                lines = response.iter_lines()
                first = json.loads(next(lines))
                assert "error" not in first, first
                pids = worker_pids(server.pid)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                for line in lines:
                    if line.strip() and "error" in json.loads(line):
                        saw_error = True
                        result.details.append(json.loads(line)["error"][:120])
            result.error_lines += saw_error
            result.streams_without_error += not saw_error
            after = http.post("/api/generate", json=_body(2))
            result.recovered += after.status_code == 200 and bool(after.json().get("done"))
    return result


# -- the benchmark ------------------------------------------------------------------------------


def run_all(home: Path, *, clients: int, queue: int, parallel: int, requests: int,
            kills: int) -> dict[str, Any]:  # fmt: skip
    server = start_server(home, {"OLLAMA_MAX_QUEUE": str(queue),
                                 "OLLAMA_NUM_PARALLEL": str(parallel)})  # fmt: skip
    try:
        ensure_model(server)
        b = burst(server, clients)
        s = sequential(server, requests)
        k = kill_during_streams(server, kills)
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        alive = server.process.poll() is None
    finally:
        server.stop()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpus": os.cpu_count(),
        "settings": {"clients": clients, "queue": queue, "parallel": parallel,
                     "sequential": requests, "kills": kills},  # fmt: skip
        "burst": {**asdict(b), "rss_growth": round(b.rss_growth, 4)},
        "sequential": asdict(s),
        "kills": asdict(k),
        "server_alive_at_end": alive,
        "metrics_lines": len(metrics.splitlines()),
    }


def verdict(results: dict[str, Any]) -> list[str]:
    """What failed, in words (empty when every requirement holds)."""
    problems = []
    b, s, k = results["burst"], results["sequential"], results["kills"]
    if b["hung"] or b["other"]:
        problems.append(f"burst: {b['hung']} hung, other outcomes {b['other']}")
    if b["busy_without_retry_after"]:
        problems.append(f"burst: {b['busy_without_retry_after']} 503s without Retry-After")
    if b["ok"] + b["busy"] != b["clients"]:
        problems.append("burst: not every request got a response or a 503")
    if b["rss_growth"] > 0.10:
        problems.append(f"burst: RSS settled {b['rss_growth']:.1%} above idle")
    before, after = s["before"], s["after"]
    if s["failures"]:
        problems.append(f"sequential: {s['failures']} failures")
    if after["fds"] > before["fds"] + 3 or after["threads"] > before["threads"] + 2:
        problems.append(f"sequential: fds/threads grew {before} -> {after}")
    if after["rss_kb"] > before["rss_kb"] * 1.05 + 2048:
        problems.append(f"sequential: RSS grew {before['rss_kb']} -> {after['rss_kb']} KiB")
    if k["streams_without_error"] or k["recovered"] != k["kills"]:
        problems.append(f"kills: {k['streams_without_error']} streams ended without an error "
                        f"line, {k['recovered']}/{k['kills']} recovered")  # fmt: skip
    if not results["server_alive_at_end"]:
        problems.append("the server died")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--queue", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pollama-load-") as tmp:
        results = run_all(Path(tmp), clients=args.clients, queue=args.queue,
                          parallel=args.parallel, requests=args.sequential, kills=args.kills)
    results["problems"] = verdict(results)
    text = json.dumps(results, indent=2)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"load-{results['date'][:10]}.json").write_text(text + "\n")
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
