"""What llama.cpp's RPC hop costs per token: the same model local and split over loopback RPC
(README.md#rpc).

Two ``pollama rpc`` processes on loopback and one ``pollama serve`` with
``OLLAMA_RPC_SERVERS`` pointing at both. Each model (SmolLM2-135M, the default model, and
Qwen2.5-Coder-0.5B-Instruct Q4_K_M, which ``tests/models.py`` caches) is measured twice on
that one server: **local** (``num_gpu`` 0: every layer on this CPU) and **split** (the
automatic plan: this CPU and both servers, a third of the layers each). On one machine the
devices share its cores, and llama.cpp's layer split runs the devices one after another,
so the difference is the hop itself: serializing each step's activations to the next
device over TCP (three hops and the graph's bookkeeping per token), never extra compute.

Per measurement one non-streamed ``/api/generate`` with ``temperature`` 0, a prompt of
about 300 tokens made unique per request (so no prompt cache), ``num_predict`` 64; prompt
throughput is ``prompt_eval_count / prompt_eval_duration`` (the engine's own timing: it
happens before a client sees anything); decode throughput and time to first token are the
client's, from a streamed request. Every process gets
``--threads`` threads (default 2: this machine's two cores). Medians of ``--repeats``
(default 3). Writes ``bench/results/<date>-rpc.md``.

    .venv/bin/python bench/rpc_bench.py                 # ~4 minutes on 2 cores
    .venv/bin/python bench/rpc_bench.py --repeats 1 --out /tmp/rpc.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _procs
import httpx
from _clients import HTTP
from _report import publish
from run_bench import ROOT, git_commit
from structured_bench import cpu_model

sys.path.insert(0, str(ROOT / "tests"))
from models import qwen_coder_gguf  # noqa: E402

TEXT = (
    "The harbour town woke slowly. Fishing boats rocked against the pier while gulls argued "
    "over scraps, and the baker opened her shutters to the smell of rain. "
)


def _prompt(n: int) -> str:
    return f"Request {n}. " + TEXT * 9 + "Summarize this in one sentence."


def _measure(base: str, model: str, options: dict[str, Any], n: int) -> dict[str, float]:
    """One streamed request: the client's time to first token and decode rate (tokens
    after the first per second of wall time to the last), and the engine's prompt rate
    (prompt evaluation happens before any byte reaches a client)."""
    body = {"model": model, "prompt": _prompt(n), "stream": True, "keep_alive": "10m",
            "options": {"temperature": 0, "seed": 1, "num_predict": 64, "num_ctx": 1024,
                        **options}}  # fmt: skip
    sent, first, data = time.perf_counter(), None, None
    with HTTP.stream("POST", f"{base}/api/generate", json=body) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            item = json.loads(line) if line else {}
            if first is None and item.get("response"):
                first = time.perf_counter()
            if item.get("done"):
                data = item
    end = time.perf_counter()
    assert data is not None and first is not None, "the stream ended without tokens"
    return {
        "prompt": data["prompt_eval_count"] / (data["prompt_eval_duration"] / 1e9),
        "ttft": first - sent,
        "decode": (data["eval_count"] - 1) / (end - first),
        "prompt_tokens": data["prompt_eval_count"],
    }


def _placement(base: str) -> str:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    found = re.findall(r'pollama_model_device_bytes\{device="([^"]+)",[^}]*\} (\S+)', text)
    return ", ".join(f"{device} {float(size) / 2**20:.0f} MiB" for device, size in found)


PLACEMENTS = (("local", {"num_gpu": 0}), ("split", {}))


def _run(base: str, model: str, threads: int, repeats: int) -> list[dict[str, Any]]:
    """``repeats`` rounds, local and split interleaved in each: each measured request comes
    after an unload and a request that loads that placement. Medians per placement."""
    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in PLACEMENTS}
    where: dict[str, str] = {}
    for i in range(repeats):
        for label, options in PLACEMENTS:
            options = {**options, "num_thread": threads}
            # Unload first: an automatic placement would keep the loaded runner's layers
            # (Ollama's num_gpu -1 matches any loaded runner), so "split" must load afresh.
            _unload(base, model)
            _measure(base, model, options, 0)  # load and warm up
            where[label] = _placement(base)
            runs[label].append(_measure(base, model, options, i + 1))
    rows = []
    for label, _ in PLACEMENTS:
        rows.append({
            "model": model, "placement": label, "where": where[label],
            **{key: statistics.median(r[key] for r in runs[label])
               for key in ("prompt", "ttft", "decode")},
            "prompt_tokens": runs[label][0]["prompt_tokens"],
        })  # fmt: skip
    _unload(base, model)
    return rows


def _unload(base: str, model: str) -> None:
    httpx.post(f"{base}/api/generate", json={"model": model, "keep_alive": 0}, timeout=60)


def _render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"# llama.cpp RPC over loopback ({dt.date.today().isoformat()})",
        "",
        f"{cpu_model()}, {os.cpu_count()} CPUs; commit {git_commit()}; `bench/rpc_bench.py "
        f"--repeats {args.repeats} --threads {args.threads}`. Two `pollama rpc` processes on "
        "127.0.0.1 and one `pollama serve` with `OLLAMA_RPC_SERVERS` naming both; local is "
        "`num_gpu` 0, split the automatic plan (this CPU and the two servers), interleaved in "
        "each round. Medians of the rounds. Decode tok/s and time to first token are the "
        "client's (streamed, wall clock); prompt tok/s is the engine's own timing.",
        "",
        "| model | placement | prompt tok/s | TTFT (s) | decode tok/s | decode vs local | where |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    local: dict[str, float] = {}
    for row in rows:
        if row["placement"] == "local":
            local[row["model"]] = row["decode"]
        ratio = row["decode"] / local[row["model"]] if row["model"] in local else 1.0
        lines.append(
            f"| {row['model']} | {row['placement']} | {row['prompt']:.1f} | "
            f"{row['ttft']:.2f} | {row['decode']:.1f} | {ratio:.2f}x | {row['where']} |"
        )
    lines += ["", "The cost of the hop per generated token: "]
    for model, decode in local.items():
        split = next(
            r["decode"] for r in rows if r["model"] == model and r["placement"] == "split"
        )
        lines.append(f"* {model}: {1000 / split - 1000 / decode:.1f} ms per token "
                     f"({1000 / decode:.1f} ms local, {1000 / split:.1f} ms split)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path,
                    default=ROOT / "bench" / "results" / f"{dt.date.today()}-rpc.md")
    args = ap.parse_args()
    py = sys.executable
    home = Path(tempfile.mkdtemp(prefix="rpc-bench-"))
    ports = [_procs.free_port() for _ in range(3)]
    env = {**os.environ, "HOME": str(home), "OLLAMA_HOST": f"127.0.0.1:{ports[0]}",
           "OLLAMA_RPC_SERVERS": f"127.0.0.1:{ports[1]},127.0.0.1:{ports[2]}",
           "OLLAMA_MODELS": str(home / "models")}  # fmt: skip
    rpcs = [_procs.Server(f"rpc{i}", [py, "-m", "pollama", "rpc", "--port", str(port),
                                       "--threads", str(args.threads)],
                          env, home / f"rpc{i}.log", ROOT)
            for i, port in enumerate(ports[1:])]  # fmt: skip
    time.sleep(3)
    base = f"http://127.0.0.1:{ports[0]}"
    with _procs.Server("pollama", [py, "-m", "pollama", "serve"], env, home / "serve.log",
                       ROOT) as server:  # fmt: skip
        try:
            server.wait_ready(base)
            from pollama.default_model import default_modelfile

            (home / "smollm2.Modelfile").write_text(default_modelfile())
            (home / "qwen.Modelfile").write_text(f"FROM {qwen_coder_gguf()}\n")
            for name, file in (("smollm2:135m", "smollm2"), ("qwen2.5-coder:0.5b", "qwen")):
                _procs.subprocess.run([py, "-m", "pollama", "create", name, "-f",
                                       str(home / f"{file}.Modelfile")],
                                      env=env, check=True, capture_output=True)  # fmt: skip
            rows = []
            for model in ("smollm2:135m", "qwen2.5-coder:0.5b"):
                rows += _run(base, model, args.threads, args.repeats)
        finally:
            for rpc in rpcs:
                rpc.stop()
    return publish(_render(rows, args), args.out)


if __name__ == "__main__":
    sys.exit(main())
