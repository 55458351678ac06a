"""Structured output: what a grammar costs per token, through a real pollama server.

In one run, on one machine, one model, 2 threads, one stream: decode tok/s of
``/api/generate`` unconstrained, with ``format: "json"`` and with a JSON schema, greedy and
sampled (temperature 1.0), rounds interleaved and the best round kept; the worker's memory
before and after its first constrained request (llguidance's tokenizer is built then); and,
with the engine in this process, the time spent choosing each token with and without a
grammar, next to the decode step. Writes ``bench/results/<date>-structured.md``.

    .venv/bin/python bench/structured_bench.py              # ~3 minutes on a quiet machine
    .venv/bin/python bench/structured_bench.py --rounds 1 --seeds 2 --out /tmp/s.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _procs
import httpx
from _report import publish
from run_bench import FA_MODES, ROOT, Pollama, git_commit

# The prompt and schema of the end-to-end tests (tests/test_e2e_structured.py).
_CAT_CASE = json.loads((ROOT / "tests" / "golden" / "structured" / "cat.json").read_text())
PROMPT: str = _CAT_CASE["prompt"]
CAT: dict[str, Any] = _CAT_CASE["schema"]
MODES: dict[str, Any] = {"none": None, "json": "json", "schema": CAT}
TEMPERATURES = (0.0, 1.0)


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return "unknown CPU"


def generate(base: str, fmt: Any, temperature: float, seed: int, args: argparse.Namespace
             ) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": Pollama.model_name, "prompt": PROMPT, "stream": False,
        "options": {"temperature": temperature, "seed": seed, "num_predict": args.tokens,
                    "num_thread": args.threads},
    }
    if fmt is not None:
        body["format"] = fmt
    r = httpx.post(f"{base}/api/generate", json=body, timeout=600)
    r.raise_for_status()
    return dict(r.json())


def measure_server(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    engine = Pollama(args.model, args.threads, home)
    best: dict[tuple[str, float], dict[str, Any]] = {}
    memory: dict[str, int] = {}
    with engine.serve(parallel=1, fa=args.fa) as (srv, base):
        generate(base, None, 0.0, 1, args)  # load and warm up
        memory["before"] = _procs.tree_memory(srv.pid).split.get("worker", 0)
        generate(base, "json", 0.0, 1, args)
        memory["after"] = _procs.tree_memory(srv.pid).split.get("worker", 0)
        for rnd in range(args.rounds):
            for temperature in TEMPERATURES:
                order = list(MODES.items())
                order = order[rnd % len(order):] + order[: rnd % len(order)]  # rotate
                for mode, fmt in order:
                    _procs.wait_quiet(args.max_foreign, patience=args.patience)
                    before = _procs.cpu_snapshot()
                    tokens = duration = 0
                    reasons: list[str] = []
                    for seed in range(args.seeds):
                        r = generate(base, fmt, temperature, seed, args)
                        tokens += int(r["eval_count"])
                        duration += int(r["eval_duration"])
                        reasons.append(str(r.get("done_reason")))
                        if fmt is not None:
                            json.loads(r["response"])  # the point of it all
                    load = _procs.foreign_load(before, _procs.cpu_snapshot())
                    row = {"mode": mode, "temperature": temperature, "tokens": tokens,
                           "tok_s": tokens / (duration / 1e9), "foreign_load": load,
                           "stops": reasons.count("stop"), "requests": len(reasons)}
                    key = (mode, temperature)
                    if key not in best or row["tok_s"] > best[key]["tok_s"]:
                        best[key] = row
                    print(f"  round {rnd + 1} T={temperature} {mode:6s} {row['tok_s']:6.1f} tok/s"
                          f" ({tokens} tokens, others {load:.0%})", flush=True)
    return {"rows": list(best.values()), "memory": memory}


def measure_engine_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Time spent choosing each token, inside the engine, with and without a grammar.

    The engine runs in this process (the worker's own loading code, ``Engine.run`` on the
    main thread as in the worker) so that ``Engine._sample`` can be timed: it is everything
    between two decodes for one stream (sampling, the grammar, the text out). Timed in place
    because the grammar's cost depends on what the decode just did to the caches; a replay
    in a tight loop measures several times less. Computed masks are counted: one is only
    needed when the drawn token is refused, and when closing."""
    sys.path.insert(0, str(ROOT / "src"))
    from pollama.runner import worker

    worker._tune_threads()
    from pollama.runner import grammar as grammar_module
    from pollama.runner import llama
    from pollama.runner.base import LoadSpec
    from pollama.runner.engine import Engine

    sink = llama.LogSink()
    spec = LoadSpec(model_path=str(args.model), num_ctx=4096, num_thread=args.threads,
                    flash_attention={"auto": None, "on": True, "off": False}[args.fa])
    loaded = worker.Loaded(spec, sink)
    engine = Engine(loaded.model, loaded.ctx, n_ctx=loaded.n_ctx, n_batch=loaded.n_batch,
                    n_parallel=1)
    counts = {"sample_ns": 0, "samples": 0, "masks": 0}
    sample = engine._sample

    def timed_sample(job: Any) -> None:
        t0 = time.perf_counter_ns()
        sample(job)
        counts["sample_ns"] += time.perf_counter_ns() - t0
        counts["samples"] += 1

    engine._sample = timed_sample  # type: ignore[method-assign]
    words = grammar_module.Constraint.words

    def counted_words(self: Any) -> Any:
        counts["masks"] += not self._fresh  # a mask computed, not one reused
        return words(self)

    grammar_module.Constraint.words = counted_words  # type: ignore[method-assign]
    result: dict[str, Any] = {}

    def drive() -> None:
        try:
            result.update(_engine_rounds(args, engine, counts))
        finally:
            engine.stop()

    # The loop runs on the main thread, as in the worker: ggml's OpenMP decode measured about
    # twice slower when llama_decode is called from another thread.
    driver = threading.Thread(target=drive, name="driver")
    driver.start()
    engine.run()
    driver.join()
    loaded.close()
    del sink
    if "rows" not in result:
        raise RuntimeError("the engine measurement failed (see above)")
    return result


def _engine_rounds(args: argparse.Namespace, engine: Any, counts: dict[str, int]
                   ) -> dict[str, Any]:
    from pollama.runner.base import CompletionChunk, CompletionRequest, SamplingOptions

    prompt = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"

    def complete(fmt: Any, temperature: float, seed: int) -> CompletionChunk:
        # Events are kept by the loop thread itself and this thread wakes once, at the end,
        # as in the worker, where the loop thread writes them to the socket.
        finished = threading.Event()
        events: list[Any] = []

        def emit(event: Any) -> bool:
            events.append(event)
            if not isinstance(event, CompletionChunk) or event.done:
                finished.set()
            return True

        options = SamplingOptions(temperature=temperature, seed=seed, num_predict=args.tokens)
        engine.submit(seed, CompletionRequest(prompt=prompt, options=options, format=fmt), emit)
        if not finished.wait(600) or not isinstance(events[-1], CompletionChunk):
            raise RuntimeError(f"request failed: {events[-1:]}")
        return events[-1]

    start = time.perf_counter()
    complete("json", 0.0, 0)  # builds the model's grammar tables once
    setup_s = time.perf_counter() - start
    best: dict[tuple[str, float], dict[str, Any]] = {}
    for rnd in range(args.rounds):
        for temperature in TEMPERATURES:
            for mode, fmt in MODES.items():
                _procs.wait_quiet(args.max_foreign, patience=args.patience)
                before = _procs.cpu_snapshot()
                for key in counts:
                    counts[key] = 0
                tokens = duration = 0
                for seed in range(args.seeds):
                    done = complete(fmt, temperature, seed)
                    tokens += done.eval_count
                    duration += done.eval_duration_ns
                load = _procs.foreign_load(before, _procs.cpu_snapshot())
                row = {"mode": mode, "temperature": temperature, "tokens": tokens,
                       "step_us": duration / tokens / 1e3,
                       "sample_us": counts["sample_ns"] / counts["samples"] / 1e3,
                       "masked": counts["masks"] / counts["samples"], "foreign_load": load}
                key = (mode, temperature)
                if key not in best or row["sample_us"] < best[key]["sample_us"]:
                    best[key] = row
                print(f"  engine round {rnd + 1} T={temperature} {mode:6s} "
                      f"{row['sample_us']:6.1f} us/token choosing, "
                      f"step {row['step_us']:.0f} us, masked {row['masked']:.0%} "
                      f"(others {load:.0%})", flush=True)
    return {"rows": list(best.values()), "setup_s": setup_s}


def render(meta: dict[str, Any], server: dict[str, Any], cost: dict[str, Any]) -> str:
    rows = {(r["mode"], r["temperature"]): r for r in server["rows"]}
    lines = [
        f"# Structured output — {meta['date']} — {meta['cpu']}",
        "",
        f"- **Machine**: {meta['cpu']} (`lscpu` model name), {meta['threads']} threads",
        f"- **Model**: `{meta['model']}`; one stream (`OLLAMA_NUM_PARALLEL=1`), flash attention "
        f"{meta['fa']}; {meta['tokens']} tokens at most per request, {meta['seeds']} requests "
        f"(seeds) per point, best of {meta['rounds']} interleaved rounds",
        f"- **pollama** {meta['commit']}; llguidance {meta['llguidance']}",
        f"- **Run**: `{meta['command']}`",
        "",
        "## Decode throughput through `/api/generate` (tok/s, the engine's eval rate)",
        "",
        "| temperature | unconstrained | `format: \"json\"` | json / none | schema | "
        "schema / none | JSON outputs that stopped by themselves |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for t in TEMPERATURES:
        free, js, sc = rows[("none", t)], rows[("json", t)], rows[("schema", t)]
        stopped = f"{js['stops'] + sc['stops']} / {js['requests'] + sc['requests']}"
        lines.append(
            f"| {t:g} | {free['tok_s']:.1f} | {js['tok_s']:.1f} | {js['tok_s'] / free['tok_s']:.2f}"
            f" | {sc['tok_s']:.1f} | {sc['tok_s'] / free['tok_s']:.2f} | {stopped} |"
        )
    mem = server["memory"]
    lines += [
        "",
        "The JSON outputs that did not stop by themselves reached `num_predict`; the constraint",
        "closed them in the last tokens, and every one parsed.",
        "",
        f"Worker resident memory: {mem['before'] / 2**20:.0f} MiB before the first constrained "
        f"request, {mem['after'] / 2**20:.0f} MiB after it (llguidance and its tokenizer, built "
        f"once per model: {cost['setup_s'] * 1e3:.0f} ms including that first request).",
        "",
        "## Choosing a token inside the engine (µs per token, best of the rounds)",
        "",
        "Time in `Engine._sample` (drawing the token, the grammar, the text out) with the engine",
        "in the benchmark's process; *masked* is the share of tokens for which a mask was",
        "computed: the drawn token (greedy: the argmax) was refused, or the JSON was closing.",
        "",
        "| temperature | format | µs per token choosing | masked | decode step µs | "
        "grammar overhead µs | overhead / step |",
        "|--:|---|--:|--:|--:|--:|--:|",
    ]
    engine_rows = {(r["mode"], r["temperature"]): r for r in cost["rows"]}
    for t in TEMPERATURES:
        free = engine_rows[("none", t)]
        for mode in MODES:
            r = engine_rows[(mode, t)]
            extra = r["sample_us"] - free["sample_us"]
            over, share = ("—", "—") if mode == "none" else (
                f"{extra:.0f}", f"{extra / free['step_us']:.1%}")
            lines.append(
                f"| {t:g} | {mode} | {r['sample_us']:.0f} | {r['masked']:.0%} | "
                f"{r['step_us']:.0f} | {over} | {share} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="GGUF (default: pollama's default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="num_predict per request")
    ap.add_argument("--seeds", type=int, default=4, help="requests per point")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds, best kept")
    ap.add_argument("--fa", choices=FA_MODES, default="off")
    ap.add_argument("--max-foreign", type=float, default=0.10)
    ap.add_argument("--patience", type=float, default=300.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.model is None:
        sys.path.insert(0, str(ROOT / "src"))
        from pollama.default_model import default_gguf_path

        args.model = default_gguf_path()
    from importlib.metadata import version

    date = dt.date.today().isoformat()
    meta = {"date": date, "cpu": cpu_model(), "threads": args.threads, "fa": args.fa,
            "model": args.model.name, "tokens": args.tokens, "seeds": args.seeds,
            "rounds": args.rounds, "commit": git_commit(), "llguidance": version("llguidance"),
            "command": shlex.join(["python", *sys.argv])}
    with tempfile.TemporaryDirectory(prefix="pollama-structured-") as home:
        server = measure_server(args, Path(home))
    cost = measure_engine_cost(args)
    text = render(meta, server, cost)
    return publish(text, args.out or ROOT / "bench" / "results" / f"{date}-structured.md")


if __name__ == "__main__":
    raise SystemExit(main())
