"""The pollama half of bench/gpu_check.sh: offload checks through the real server, then decode
tok/s (1 and 4 streams) and the TTFT of a 1,000-token prompt against llama-server built from
the same sources with the same flags. Writes ``results.json`` and ``summary.md`` to ``--out``.

With ``--expect cpu`` (the dry run on a machine without a GPU) the same steps run and the
offload checks expect the CPU; nothing else differs.

    python3 bench/gpu_check.py --model M.gguf --llama-server BIN --out DIR [--expect cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _clients as cl
import _procs
import httpx

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "qwen-standin"
STREAMS = (1, 4)
N_PREDICT = 256
CTX = 4096  # per stream, as Ollama's num_ctx; llama-server gets CTX * parallel
PARALLEL = max(STREAMS)
# ~1,000 tokens of plain prose (Qwen's tokenizer: ~1.3 tokens a word); made exact below.
SENTENCE = ("The keeper climbed the spiral stairs at dusk, checked the lamp, wrote the "
            "weather in the log and watched the ships pass the northern reef. ")


class Check:
    """Results and pass/fail lines, written as JSON and markdown at the end."""

    def __init__(self, out: Path, logs: Path) -> None:
        self.out, self.logs = out, logs
        self.data: dict[str, Any] = {"checks": [], "bench": {}}

    def verdict(self, name: str, ok: bool, detail: str) -> None:
        self.data["checks"].append({"check": name, "ok": ok, "detail": detail})
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    def step(self, name: str, fn: Callable[[], None]) -> None:
        """Run one step; an exception fails it and the run goes on to the next."""
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the run
            self.verdict(name, False, f"{type(exc).__name__}: {exc}")
        self.data.setdefault("step_s", {})[name] = round(time.monotonic() - t0, 1)

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2))


# --- pollama ----------------------------------------------------------------------------------


def pollama_env(home: Path, port: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "POLLAMA_"))}
    (home / "home").mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home / "home"), OLLAMA_MODELS=str(home / "models"),
               OLLAMA_HOST=f"127.0.0.1:{port}", OLLAMA_NUM_PARALLEL=str(PARALLEL),
               OLLAMA_CONTEXT_LENGTH=str(CTX), OLLAMA_KEEP_ALIVE="30m")
    env.update(extra)
    return env


@contextmanager
def pollama(home: Path, log: Path, extra: dict[str, str] | None = None
            ) -> Iterator[tuple[str, dict[str, str]]]:
    port = _procs.free_port()
    env = pollama_env(home, port, extra or {})
    with _procs.Server("pollama", [sys.executable, "-m", "pollama", "serve"], env, log,
                       ROOT) as srv:
        base = f"http://127.0.0.1:{port}"
        srv.wait_ready(f"{base}/api/version", timeout=120)
        yield base, env


def cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pollama", *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"pollama {' '.join(args)}: {(out.stderr or out.stdout)[-600:]}")
    return out.stdout


def generate(base: str, options: dict[str, Any], prompt: str = "Hello") -> dict[str, Any]:
    body = {"model": MODEL_NAME, "prompt": prompt, "stream": False,
            "options": {"num_predict": 16, "temperature": 0, **options}}
    resp = httpx.post(f"{base}/api/generate", json=body, timeout=300)
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:400]}")
    return resp.json()


def unload(base: str) -> None:
    httpx.post(f"{base}/api/generate", json={"model": MODEL_NAME, "keep_alive": 0}, timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and httpx.get(f"{base}/api/ps").json().get("models"):
        time.sleep(0.2)


def placement(base: str, env: dict[str, str]) -> tuple[int, int, str]:
    """(size, size_vram) from /api/ps and the PROCESSOR column from `pollama ps`."""
    models = httpx.get(f"{base}/api/ps", timeout=30).json()["models"]
    row = next(m for m in models if m["name"].startswith(MODEL_NAME))
    return int(row["size"]), int(row.get("size_vram") or 0), cli(env, "ps")


def offload_checks(check: Check, model: Path, home: Path, expect: str) -> None:
    with pollama(home, check.logs / "serve.log") as (base, env):
        status = httpx.get(f"{base}/api/status", timeout=30)
        check.data["api_status"] = status.json() if status.status_code == 200 else status.text
        names = status.text.lower()
        check.verdict("/api/status lists the devices", status.status_code == 200 and (
            expect != "cuda" or "cuda" in names or "nvidia" in names), status.text[:400])
        (home / "Modelfile").write_text(f"FROM {model}\n")
        cli(env, "create", MODEL_NAME, "-f", str(home / "Modelfile"))
        check.step("full offload", lambda: _full(check, base, env, expect))
        check.step("num_gpu 8 split", lambda: _split(check, base, env, expect))
        check.step("chat answer", lambda: _answer(check, base))


def _full(check: Check, base: str, env: dict[str, str], expect: str) -> None:
    generate(base, {})
    size, vram, ps = placement(base, env)
    check.data["full"] = {"size": size, "size_vram": vram, "ps": ps}
    if expect == "cuda":
        ok = vram == size > 0 and "100% GPU" in ps
    else:
        ok = vram == 0 and "100% CPU" in ps
    check.verdict("default num_gpu: everything offloaded" if expect == "cuda"
                  else "CPU build: 100% CPU", ok, f"size={size} size_vram={vram}\n{ps}")


def _split(check: Check, base: str, env: dict[str, str], expect: str) -> None:
    unload(base)
    generate(base, {"num_gpu": 8})
    size, vram, ps = placement(base, env)
    check.data["num_gpu_8"] = {"size": size, "size_vram": vram, "ps": ps}
    ok = (0 < vram < size and "CPU/GPU" in ps) if expect == "cuda" else vram == 0
    check.verdict("num_gpu 8: a CPU/GPU split", ok, f"size={size} size_vram={vram}\n{ps}")
    unload(base)


def _answer(check: Check, base: str) -> None:
    body = {"model": MODEL_NAME, "stream": False, "options": {"num_predict": 32},
            "messages": [{"role": "user", "content": "Write a Python function that adds."}]}
    reply = httpx.post(f"{base}/api/chat", json=body, timeout=300).json()
    check.data["answer"] = reply
    text = (reply.get("message") or {}).get("content", "")
    check.verdict("an answer through /api/chat (nonsense: random weights)",
                  bool(text) and reply.get("eval_count", 0) > 0,
                  f"{reply.get('eval_count')} tokens, done_reason={reply.get('done_reason')}: "
                  f"{text[:80]!r}")


def hidden_gpu_checks(check: Check, home: Path) -> None:
    """A GPU build that sees no GPU: a warning and 100% CPU; with POLLAMA_REQUIRE_GPU, an error."""
    hide = {"CUDA_VISIBLE_DEVICES": ""}
    with pollama(home, check.logs / "serve-hidden.log", hide) as (base, env):
        generate(base, {})
        size, vram, ps = placement(base, env)
        check.verdict("GPU hidden: runs on the CPU and says so", vram == 0 and "CPU" in ps, ps)
    with pollama(home, check.logs / "serve-require.log", {**hide, "POLLAMA_REQUIRE_GPU": "1"}
                 ) as (base, _env):
        resp = httpx.post(f"{base}/api/generate", json={
            "model": MODEL_NAME, "prompt": "Hi", "stream": False}, timeout=300)
        check.verdict("GPU hidden + POLLAMA_REQUIRE_GPU=1: an error, not a CPU run",
                      resp.status_code >= 400, f"HTTP {resp.status_code}: {resp.text[:300]}")


# --- the benchmark ----------------------------------------------------------------------------


def long_prompt(llama_base: str, tokens: int, tag: int) -> str:
    """A prompt of exactly ``tokens`` tokens by the model's own tokenizer, unique per ``tag``
    so that no prefix cache serves it."""
    text = f"Log {tag}. " + SENTENCE * (tokens // 20 + 10)
    ids = httpx.post(f"{llama_base}/tokenize", json={"content": text}, timeout=60).json()
    ids = ids["tokens"][:tokens]
    return httpx.post(f"{llama_base}/detokenize", json={"tokens": ids}, timeout=60).json()[
        "content"]


async def ttft_pollama(base: str, prompt: str, threads: int) -> float:
    body = {"model": MODEL_NAME, "prompt": prompt, "raw": True, "stream": True,
            "options": {"num_predict": 1, "temperature": 0, "num_thread": threads}}
    async with httpx.AsyncClient(timeout=300) as c:
        t0 = time.perf_counter()
        async with c.stream("POST", f"{base}/api/generate", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.strip():
                    return time.perf_counter() - t0
    raise RuntimeError("no chunk")


async def ttft_llama(base: str, prompt: str) -> float:
    async with httpx.AsyncClient(timeout=300) as c:
        r = await cl.llama_completion(c, base, prompt, 1)
    return r.ttft


def bench_engine(name: str, base: str, llama_base: str, args: argparse.Namespace
                 ) -> dict[str, Any]:
    """Best of ``--repeat`` for each stream count (decode tok/s as the engine reports it), then
    the TTFT of a fresh 1,000-token prompt (best of ``--repeat``, each prompt new)."""
    threads, n_predict = args.threads, args.n_predict
    prompt = "Write a long story about a lighthouse keeper and a map found on the shore."
    opts = {"num_predict": n_predict, "temperature": 0, "seed": 1, "num_thread": threads}
    res: dict[str, Any] = {}
    warm = {**opts, "num_predict": 2}  # the first request pays one-off set-up (graphs, caches)
    asyncio.run(cl.concurrent(1, lambda c, _i: cl.pollama_generate(c, base, MODEL_NAME, "Hi", warm)
                              if name == "pollama" else cl.llama_completion(c, base, "Hi", 2)))
    for n in STREAMS:
        def one(c: httpx.AsyncClient, _i: int) -> Any:
            if name == "pollama":
                return cl.pollama_generate(c, base, MODEL_NAME, prompt, opts)
            return cl.llama_completion(c, base, prompt, n_predict)
        runs = [asyncio.run(cl.concurrent(n, one)) for _ in range(args.repeat)]
        best = max(runs, key=lambda r: r.aggregate_tok_s)
        res[f"streams_{n}"] = best.__dict__
    ttfts = []
    for tag in range(args.repeat):
        p = long_prompt(llama_base, 1000, tag + (100 if name == "pollama" else 0))
        ttfts.append(asyncio.run(ttft_pollama(base, p, threads) if name == "pollama"
                                 else ttft_llama(base, p)))
    res["ttft_1000_s"] = round(min(ttfts), 4)
    res["ttft_1000_all_s"] = [round(t, 4) for t in ttfts]
    return res


@contextmanager
def llama_server(binary: Path, model: Path, log: Path, threads: int, gpu: bool
                 ) -> Iterator[str]:
    port = _procs.free_port()
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-tb", str(threads),
           "-np", str(PARALLEL), "-c", str(CTX * PARALLEL), "--flash-attn", "on",
           "-ngl", "999" if gpu else "0", "--host", "127.0.0.1", "--port", str(port),
           "--no-webui"]
    with _procs.Server("llama-server", cmd, os.environ, log, ROOT) as srv:
        base = f"http://127.0.0.1:{port}"
        srv.wait_ready(f"{base}/health", timeout=180)
        yield base


def benchmark(check: Check, args: argparse.Namespace, home: Path) -> None:
    gpu = args.expect == "cuda"
    with llama_server(args.llama_server, args.model, check.logs / "llama-server.log",
                      args.threads, gpu) as lbase:
        check.data["bench"]["llama-server"] = bench_engine("llama-server", lbase, lbase, args)
        with pollama(home, check.logs / "serve-bench.log",
                     {"OLLAMA_FLASH_ATTENTION": "1"}) as (base, _env):
            check.data["bench"]["pollama"] = bench_engine("pollama", base, lbase, args)
    b = check.data["bench"]
    for n in STREAMS:
        ratio = (b["pollama"][f"streams_{n}"]["aggregate_tok_s"]
                 / b["llama-server"][f"streams_{n}"]["aggregate_tok_s"])
        b[f"ratio_streams_{n}"] = round(ratio, 3)
    b["ratio_ttft"] = round(b["llama-server"]["ttft_1000_s"] / b["pollama"]["ttft_1000_s"], 3)


def summary(check: Check, phases: Path | None) -> str:
    lines = ["# GPU check", ""]
    if phases and phases.exists():
        lines += ["| phase | seconds |", "|---|---|"]
        lines += [f"| {p} | {s} |" for p, s in
                  (ln.split("\t", 1) for ln in phases.read_text().splitlines() if "\t" in ln)]
        lines.append("")
    lines += [f"- {'PASS' if c['ok'] else 'FAIL'} {c['check']}: "
              f"{c['detail'].splitlines()[0] if c['detail'] else ''}"
              for c in check.data["checks"]]
    b = check.data["bench"]
    if "pollama" in b and "llama-server" in b:
        lines += ["", "| | llama-server | pollama | ratio |", "|---|---|---|---|"]
        for n in STREAMS:
            key = f"streams_{n}"
            lines.append(f"| decode tok/s, {n} stream(s) (sum) | "
                         f"{b['llama-server'][key]['aggregate_tok_s']} | "
                         f"{b['pollama'][key]['aggregate_tok_s']} | {b[f'ratio_{key}']} |")
        lines.append(f"| TTFT, 1000-token prompt (s) | {b['llama-server']['ttft_1000_s']} | "
                     f"{b['pollama']['ttft_1000_s']} | {b['ratio_ttft']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--llama-server", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="results.json and summary.md")
    ap.add_argument("--logs", type=Path, help="the servers' logs (default: --out)")
    ap.add_argument("--expect", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2))
    ap.add_argument("--n-predict", type=int, default=N_PREDICT, help="tokens per stream")
    ap.add_argument("--repeat", type=int, default=3, help="runs per point, best kept")
    ap.add_argument("--phases", type=Path, help="the shell script's phase timings (TSV)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["offload", "hidden", "bench"])
    args = ap.parse_args(argv)
    args.logs = args.logs or args.out
    for folder in (args.out, args.logs):
        folder.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.logs)
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"pollama-gpu-check-{os.getpid()}"
    steps = {"offload": lambda: offload_checks(check, args.model, home, args.expect),
             "hidden": lambda: hidden_gpu_checks(check, home),
             "bench": lambda: benchmark(check, args, home)}
    if args.expect != "cuda":
        args.skip.append("hidden")  # hiding a GPU that is not there proves nothing
    for name, fn in steps.items():
        if name not in args.skip:
            check.step(name, fn)
    check.write()
    text = summary(check, args.phases)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0 if all(c["ok"] for c in check.data["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
