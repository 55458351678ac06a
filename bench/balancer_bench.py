"""Aggregate throughput of two pollama nodes behind nginx against one node, 8 concurrent clients.

nginx runs ``deploy/nginx/pollama.conf`` (its two example node addresses and its listen port
replaced), as the end-to-end test does (docs/multi-node.md#check-the-setup). Each client is a
conversation with its own ``X-Session-Id`` and sends ``--requests`` streamed
``/api/generate`` requests one after the other (``--tokens`` tokens each, the real default
model). The session ids are picked so that the hash gives each node half of the clients: the
benchmark measures what two nodes can do, not how evenly 8 ids happen to hash.

The set-ups, all started at once and measured in turn, ``--repeats`` rounds (the median of
each set-up's rounds reported):

* ``1 node``: one node, clients straight to it (``OLLAMA_NUM_PARALLEL`` = ``--parallel``);
* ``1 node + nginx``: the same node behind nginx (what the balancer costs);
* ``2 nodes + nginx``: two nodes, each free to use every core (each model runner then uses
  as many threads as there are cores);
* ``2 nodes pinned + nginx``: each node and its runner pinned to cores of its own
  (``sched_setaffinity``), as if each node had a machine of its own (of fewer cores).

On the 2-core machines of this project two nodes share the same two cores: the numbers say
what a balancer adds or costs on one machine, and how the split behaves, not what a second
machine would add. Before each run the script waits for other processes to use less than
``--max-foreign`` of the CPUs, runs again (``--tries``) when they used more during it, and
reports how much they used.

Usage::

    .venv/bin/python bench/balancer_bench.py
    .venv/bin/python bench/balancer_bench.py --parallel 1 4 \
        --out bench/results/2026-12-05-balancer.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the server helpers of the test suite

import _procs  # noqa: E402
from _clients import StreamResult, pollama_generate  # noqa: E402
from _report import publish  # noqa: E402

from conftest import (  # noqa: E402
    MODEL,
    RunningServer,
    create_default_model,
    start_server,
    stop_server,
)
from nginx_site import write_nginx_config  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the ships that pass."


@contextmanager
def nginx(folder: Path, upstreams: list[str]) -> Iterator[str]:
    """nginx with the shipped site file in front of ``upstreams`` (one or two); its URL."""
    folder.mkdir(parents=True)
    port = _procs.free_port()
    command = write_nginx_config(folder, upstreams, port)
    server = _procs.Server("nginx", command, os.environ, folder / "nginx.log", folder)
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_ready(url + "/healthz", timeout=10)
        yield url
    finally:
        server.stop()


def start_node(home: Path, parallel: int, cores: set[int] | None) -> RunningServer:
    """A node with the default model; pinned (with the runners it starts later) to ``cores``."""
    home.mkdir(parents=True)
    node = start_server(home, {
        "OLLAMA_NUM_PARALLEL": str(parallel),
        "POLLAMA_ACCESS_LOG": str(home / "access.log"),
        "POLLAMA_MAX_CONNECTIONS_PER_CLIENT": "0",  # every client is nginx's address
    })  # fmt: skip
    if cores is not None:
        os.sched_setaffinity(node.process.pid, cores)
    create_default_model(node, home)
    httpx.post(f"{node.url}/api/generate", json={"model": MODEL, "prompt": "Hi.",
               "stream": False, "options": {"num_predict": 1}}, timeout=120)  # fmt: skip
    return node


def served_by(nodes: list[RunningServer], request_id: str) -> int:
    for i, node in enumerate(nodes):
        log = Path(node.env["POLLAMA_ACCESS_LOG"])
        if request_id in log.read_text():
            return i
    raise RuntimeError(f"no node logged {request_id}")


def balanced_sessions(url: str, nodes: list[RunningServer], clients: int) -> list[str]:
    """Session ids that nginx's hash spreads evenly over ``nodes``."""
    per_node: dict[int, list[str]] = {i: [] for i in range(len(nodes))}
    want = -(-clients // len(nodes))
    for n in range(1000):
        session, request_id = f"client-{n}", f"probe-{n}-{time.monotonic_ns()}"
        httpx.get(f"{url}/api/version", headers={"X-Session-Id": session,
                  "X-Request-Id": request_id}, timeout=10)  # fmt: skip
        time.sleep(0.02)  # the access-log line is written as the response ends
        node = served_by(nodes, request_id)
        if len(per_node[node]) < want:
            per_node[node].append(session)
        if sum(len(v) for v in per_node.values()) >= clients:
            break
    picked = [s for group in zip(*per_node.values(), strict=False) for s in group]
    return picked[:clients]


async def drive(url: str, sessions: list[str], requests: int, tokens: int) -> dict[str, Any]:
    """Every session sends ``requests`` streamed generations in a row, all sessions at once."""
    options = {"num_predict": tokens, "temperature": 0.8, "seed": 0}
    tag = time.monotonic_ns() % 100_000  # no run finds another's prompt in a cache

    async def one_client(i: int) -> list[StreamResult]:
        headers = {"X-Session-Id": sessions[i]}
        async with httpx.AsyncClient(timeout=600, headers=headers) as client:
            return [await pollama_generate(client, url, MODEL, f"[{tag}.{i}.{r}] {PROMPT}",
                                           options) for r in range(requests)]  # fmt: skip

    before = _procs.cpu_snapshot()
    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*map(one_client, range(len(sessions))))
               for r in rs]  # fmt: skip
    wall = time.perf_counter() - start
    foreign = _procs.foreign_load(before, _procs.cpu_snapshot())
    generated = sum(r.tokens for r in results)
    return {
        "requests": len(results),
        "tokens": generated,
        "wall_s": round(wall, 2),
        "tok_s": round(generated / wall, 1),
        "ttft_median_s": round(statistics.median(r.ttft for r in results), 3),
        "latency_median_s": round(statistics.median(r.t_done - r.t_sent for r in results), 2),
        "foreign_load": round(foreign, 3),
    }


SETUPS = ["1 node", "1 node + nginx", "2 nodes + nginx", "2 nodes pinned + nginx"]


def start_setups(stack: ExitStack, root: Path, parallel: int, clients: int
                 ) -> dict[str, tuple[str, list[str]]]:
    """Every set-up's nodes and nginx, started together (idle ones cost no CPU): set-up ->
    (URL, session ids)."""
    ncpu = len(os.sched_getaffinity(0))

    def nodes(name: str, count: int, pinned: bool) -> list[RunningServer]:
        out = []
        for i in range(count):
            cores = {c for c in range(ncpu) if c % count == i} if pinned else None
            node = start_node(root / f"{name}-p{parallel}" / f"node{i}", parallel, cores)
            stack.callback(stop_server, node)
            out.append(node)
        return out

    def balanced(name: str, group: list[RunningServer]) -> tuple[str, list[str]]:
        url = stack.enter_context(nginx(root / f"{name}-p{parallel}" / "nginx",
                                        [n.host for n in group]))  # fmt: skip
        return url, balanced_sessions(url, group, clients)

    single, pair, pinned = nodes("one", 1, False), nodes("two", 2, False), nodes("pin", 2, True)
    return {
        "1 node": (single[0].url, [f"client-{i}" for i in range(clients)]),
        "1 node + nginx": balanced("one", single),
        "2 nodes + nginx": balanced("two", pair),
        "2 nodes pinned + nginx": balanced("pin", pinned),
    }


def measure(args: argparse.Namespace, url: str, sessions: list[str]) -> dict[str, Any]:
    """One run after a quiet moment; again (up to ``--tries``) while others used more than
    ``--max-foreign`` of the CPUs during it. The run with the least foreign load."""
    runs = []
    for _ in range(args.tries):
        _procs.wait_quiet(args.max_foreign, patience=args.patience)
        runs.append(asyncio.run(drive(url, sessions, args.requests, args.tokens)))
        if runs[-1]["foreign_load"] <= args.max_foreign:
            break
    return min(runs, key=lambda r: r["foreign_load"])


def measure_all(args: argparse.Namespace, root: Path, parallel: int) -> list[dict[str, Any]]:
    """``--repeats`` rounds, the set-ups interleaved in each; each set-up's medians."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SETUPS}
    with ExitStack() as stack:
        setups = start_setups(stack, root, parallel, args.clients)
        for round_ in range(args.repeats):
            for name in SETUPS:
                row = measure(args, *setups[name])
                row.update(setup=name, parallel=parallel, round=round_)
                print(json.dumps(row), flush=True)
                runs[name].append(row)
    keys = ("tok_s", "ttft_median_s", "latency_median_s", "foreign_load")
    return [
        {"setup": name, "parallel": parallel,
         **{key: round(statistics.median(r[key] for r in runs[name]), 3) for key in keys},
         "runs": runs[name]}
        for name in SETUPS
    ]  # fmt: skip


def render(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    out = [
        f"# Two nodes behind nginx, {time.strftime('%Y-%m-%d')}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "",
        f"`.venv/bin/python bench/balancer_bench.py --parallel "
        f"{' '.join(map(str, args.parallel))}`: {args.clients} concurrent clients, each "
        f"{args.requests} streamed `/api/generate` requests in a row of {args.tokens} tokens "
        f"(SmolLM2-135M Q4_1), {version.replace('nginx version: ', '')} running "
        "`deploy/nginx/pollama.conf`. tok/s = generated tokens / wall time of the whole run; "
        f"set-ups interleaved, {args.repeats} rounds, the median of each set-up's rounds; "
        "others' CPU = the share of the CPUs other processes used during its runs (median).",
        "",
    ]
    for parallel in args.parallel:
        base = next(r for r in rows if r["parallel"] == parallel and r["setup"] == "1 node")
        out += [
            f"## OLLAMA_NUM_PARALLEL={parallel} per node",
            "",
            "| set-up | tok/s | vs 1 node | median TTFT (s) | median latency (s) | "
            "others' CPU |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in rows if r["parallel"] == parallel):
            out.append(
                f"| {r['setup']} | {r['tok_s']} | {r['tok_s'] / base['tok_s']:.2f} | "
                f"{r['ttft_median_s']} | {r['latency_median_s']} | "
                f"{r['foreign_load'] * 100:.0f} % |"
            )
        out.append("")
    out += ["<details><summary>raw</summary>", "", "```json",
            json.dumps(rows, indent=1), "```", "", "</details>", ""]  # fmt: skip
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="per client, one after the other")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1],
                    help="OLLAMA_NUM_PARALLEL of every node; one table each")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each set-up's median")
    ap.add_argument("--tries", type=int, default=3, help="per run, on a busy machine")
    ap.add_argument("--max-foreign", type=float, default=0.10)
    ap.add_argument("--patience", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / ".build" / "balancer.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="balancer-bench-") as tmp:
        os.environ["HOME"] = tmp  # nothing of the caller's ~/.ollama
        for parallel in args.parallel:
            rows += measure_all(args, Path(tmp), parallel)
    return publish(render(args, rows), args.out)


if __name__ == "__main__":
    sys.exit(main())
