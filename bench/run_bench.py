"""pollama vs the engine's own speed (plain loop) vs llama.cpp's llama-server, in one run.

Same GGUF, same thread count, flash attention at each engine's default (``--fa auto``:
every engine leaves it to llama.cpp's auto, which turns it on for the CPU), or forced ``on``
or ``off`` for all; 1/4/8/16 concurrent streams, each point the median of interleaved
repeats; follow-up chat TTFT (warm prefix cache vs cold); resident memory with the model
loaded.
Writes ``bench/results/<YYYY-MM-DD>-<cpu>.md`` (quick mode: ``bench/.build/quick.md``) and
the raw numbers next to it under ``bench/.build/results/``.

Run with the project's venv after ``bench/build_llama_server.sh``::

    .venv/bin/python bench/run_bench.py            # the full run (~5 minutes)
    .venv/bin/python bench/run_bench.py --quick    # a fast sanity run
    .venv/bin/python bench/run_bench.py --only pollama --streams 1 4

pollama's parts are skipped with a clear message when its server cannot generate.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import _clients as cl
import _procs
import httpx
from _report import render

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / ".build"
LOGS = BUILD / "logs"
MiB = 1024 * 1024
PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a mysterious map "
    "washed up on the shore. Describe the keeper, the island, the weather and the journey."
)
ENGINES = ("llama-server", "plain", "pollama")
FA_MODES = ("auto", "on", "off")
"""``--fa`` of the benchmarks: every engine's default (llama.cpp's auto, on for the CPU), or
flash attention forced on or off for all of them."""

sys.path.insert(0, str(ROOT / "src"))


# --- machine and model facts ----------------------------------------------------------------


def cpu_info() -> tuple[str, str, str]:
    """(model name, short slug for file names, notable SIMD flags)."""
    name, flags = platform.processor() or "unknown CPU", ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == (platform.processor() or "unknown CPU"):
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = value
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if
            f in flags.split()]
    short = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|@.*$|\d+-Core", "", name)
    slug = re.sub(r"[^a-z0-9]+", "-", short.lower()).strip("-") or "cpu"
    return name, slug, " ".join(simd) or "no AVX2"


def kv_bytes_per_token(model: Path) -> int:
    """F16 K+V bytes per token of context, from the GGUF's attention shape."""
    from gguf import GGUFReader

    fields = GGUFReader(model).fields

    def get(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    arch = get("general.architecture")
    n_layer = int(get(f"{arch}.block_count"))
    n_head = int(get(f"{arch}.attention.head_count"))
    n_head_kv = int(get(f"{arch}.attention.head_count_kv") or n_head)
    n_embd = int(get(f"{arch}.embedding_length"))
    k_dim = int(get(f"{arch}.attention.key_length") or n_embd // n_head)
    v_dim = int(get(f"{arch}.attention.value_length") or n_embd // n_head)
    return n_layer * n_head_kv * (k_dim + v_dim) * 2


def story_prompts(model: Path, rep: int, n: int) -> list[str]:
    """The prompts of one measurement, each rendered with the model's chat template (as
    pollama's ``/api/generate`` would) and then sent as they are to every engine (pollama
    ``raw``, llama-server's ``/completion``, the plain loop), so that all three evaluate the
    same tokens. A chat prompt also keeps this model from ending its story before
    ``--n-predict`` tokens, as llama-server's ``ignore_eos`` and the plain loop do not."""
    from gguf import GGUFReader

    field = GGUFReader(model).fields.get("tokenizer.chat_template")
    texts = [f"Story {rep}-{i + 1}. {PROMPT}" for i in range(n)]
    if field is None:
        return texts
    return [chat_prompt(str(field.contents()), text) for text in texts]


def chat_prompt(template: str, text: str) -> str:
    """``text`` as one user turn of the chat ``template`` (a GGUF's Jinja template), with
    the assistant's turn opened, as pollama's ``/api/generate`` renders it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template=template, eos_token="", bos_token="")
    return fmt(messages=[{"role": "user", "content": text}]).prompt


def llama_server_bin() -> Path:
    return BUILD / "llama-server"


def llama_server_version() -> str:
    try:
        out = subprocess.run([str(llama_server_bin()), "--version"], capture_output=True,
                             text=True, timeout=30)
    except OSError:
        return "not built"
    m = re.search(r"version: (\S+) \(build (\d+), commit (\w+)\)", out.stdout + out.stderr)
    return f"{m.group(1)} (llama.cpp commit {m.group(3)})" if m else "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


# --- the chat used for follow-up TTFT -------------------------------------------------------

_TOPICS = ["a vegetable garden", "a week in Lisbon", "learning the cello", "a home network",
           "baking sourdough", "a beginner's telescope"]
_WORDS = ("soil light water season plan budget morning evening practice patience step "
          "detail routine weather schedule choice tool habit friend balance market street "
          "window corner river hill note sound rhythm recipe flour oven crust lens night").split()


def chat_history(turns: int = 6, seed: int = 7) -> list[dict[str, str]]:
    """A deterministic multi-turn chat of roughly 1,000 tokens, ending with a user message."""
    rnd = random.Random(seed)

    def paragraph(n: int) -> str:
        sentences = []
        for _ in range(n):
            words = rnd.sample(_WORDS, 9)
            sentences.append(f"The {words[0]} and the {words[1]} matter because every "
                             f"{words[2]} changes the {words[3]}, so keep a {words[4]} for "
                             f"the {words[5]}, the {words[6]} and the {words[7]} {words[8]}.")
        return " ".join(sentences)

    messages = [{"role": "system", "content": "You are a helpful, concise assistant."}]
    for t in range(turns):
        topic = _TOPICS[t % len(_TOPICS)]
        messages.append({"role": "user", "content": f"Tell me how to get started with {topic}."})
        if t < turns - 1:
            messages.append({"role": "assistant", "content": paragraph(5)})
    return messages


FOLLOW_UPS = (
    "Thanks. Summarise all of that in three short bullet points.",
    "Which of those would you start with this weekend, and why?",
    "Give me a one-line checklist for that first step.",
)


@contextmanager
def _explain_death(srv: _procs.Server) -> Iterator[None]:
    """A request that fails because the server died says so, with its exit status."""
    try:
        yield
    except (cl.Unavailable, httpx.HTTPError) as e:
        rc = srv.proc.poll()
        if rc is None:
            raise
        how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        last = (srv.log_tail(1) or "").strip()[:200]
        raise cl.Unavailable(f"{srv.name} {how} during the run ({type(e).__name__}: {e}); "
                             f"last log line: {last!r}; log: {srv.log_path}") from e


# --- engines ---------------------------------------------------------------------------------


class LlamaServer:
    name = "llama-server"

    def __init__(self, model: Path, threads: int) -> None:
        self.model, self.threads = model, threads

    @contextmanager
    def serve(self, parallel: int, fa: str, *, fresh: bool = False
              ) -> Iterator[tuple[_procs.Server, str]]:
        """A llama-server with ``parallel`` slots; it keeps nothing across restarts, so
        every one is ``fresh``."""
        port = _procs.free_port()
        cmd = [str(llama_server_bin()), "-m", str(self.model), "-t", str(self.threads),
               "-tb", str(self.threads), "-np", str(parallel), "-c", str(4096 * parallel),
               "--flash-attn", fa, "--host", "127.0.0.1",
               "--port", str(port), "--no-webui"]
        with _procs.Server(self.name, cmd, os.environ, LOGS / f"llama-server-{port}.log",
                           ROOT) as srv:
            base = f"http://127.0.0.1:{port}"
            srv.wait_ready(f"{base}/health", timeout=120)
            with _explain_death(srv):
                yield srv, base

    async def warm_up(self, base: str) -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            await cl.llama_completion(c, base, "Hello", 2)

    def generate(self, base: str, prompt: str, n_predict: int) -> cl.StreamFn:
        return lambda c, _i: cl.llama_completion(c, base, prompt, n_predict)

    def chat(self, base: str, messages: list[dict[str, str]], n: int) -> cl.StreamFn:
        return lambda c, _i: cl.llama_chat(c, base, messages, n)


class Pollama:
    name = "pollama"
    model_name = "bench"

    def __init__(self, model: Path, threads: int, home: Path) -> None:
        self.model, self.threads, self.home = model, threads, home
        self.user_home = home / "home"  # the servers' HOME
        self.created = False

    @property
    def prompt_cache(self) -> Path:
        """The prompt cache this engine's servers keep on disk across restarts (pollama's
        own setting, under the HOME they get)."""
        from pollama.config.settings import load_settings

        return load_settings({"HOME": str(self.user_home)}).kv_cache_path

    def _env(self, port: int, parallel: int, fa: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
        env.update(
            HOME=str(self.user_home),
            OLLAMA_MODELS=str(self.home / "models"),
            OLLAMA_HOST=f"127.0.0.1:{port}",
            OLLAMA_NUM_PARALLEL=str(parallel),
            OLLAMA_CONTEXT_LENGTH="4096",
            OLLAMA_KEEP_ALIVE="30m",
            PYTHONPATH=str(ROOT / "src"),
        )
        if fa != "auto":  # auto: unset, pollama's default (llama.cpp's auto)
            env["OLLAMA_FLASH_ATTENTION"] = "1" if fa == "on" else "0"
        self.user_home.mkdir(parents=True, exist_ok=True)
        return env

    @contextmanager
    def serve(self, parallel: int, fa: str, *, fresh: bool = False
              ) -> Iterator[tuple[_procs.Server, str]]:
        """A pollama server with ``parallel`` slots. ``fresh``: its prompt cache on disk is
        emptied first, so it starts as a fresh llama-server does, with no prefix of an
        earlier server's prompts (the chat template's system turn) to restore; only
        ``kv_restore_bench.py`` measures that cache."""
        if fresh:
            shutil.rmtree(self.prompt_cache, ignore_errors=True)
        port = _procs.free_port()
        env = self._env(port, parallel, fa)
        cmd = [sys.executable, "-m", "pollama", "serve"]
        try:
            srv = _procs.Server(self.name, cmd, env, LOGS / f"pollama-{port}.log", ROOT)
        except OSError as e:
            raise cl.Unavailable(f"cannot start pollama: {e}") from e
        with srv:
            base = f"http://127.0.0.1:{port}"
            try:
                srv.wait_ready(f"{base}/api/version", timeout=60)
            except RuntimeError as e:
                raise cl.Unavailable(f"pollama serve did not come up: {e}") from e
            if not self.created:
                self._create(env)
            with _explain_death(srv):
                yield srv, base

    def _create(self, env: dict[str, str]) -> None:
        modelfile = self.home / "Modelfile"
        modelfile.write_text(f"FROM {self.model}\n")
        out = subprocess.run([sys.executable, "-m", "pollama", "create", self.model_name,
                              "-f", str(modelfile)], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        if out.returncode != 0:
            raise cl.Unavailable("pollama create failed: "
                                 + (out.stderr or out.stdout).strip()[-400:])
        self.created = True

    def create_with_draft(self, base: str, name: str, draft: Path) -> None:
        """Create ``name``: this engine's model with ``DRAFT`` (speculative decoding from a
        draft model), on the running server at ``base``."""
        env = self._env(int(base.rsplit(":", 1)[1]), 1, "auto")
        modelfile = self.home / f"{name}.Modelfile"
        modelfile.write_text(f"FROM {self.model}\nDRAFT {draft}\n")
        out = subprocess.run([sys.executable, "-m", "pollama", "create", name, "-f",
                              str(modelfile)], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        if out.returncode != 0:
            raise cl.Unavailable("pollama create failed: "
                                 + (out.stderr or out.stdout).strip()[-400:])

    def options(self, n_predict: int) -> dict[str, Any]:
        return {"num_predict": n_predict, "temperature": 0, "seed": 1,
                "num_thread": self.threads}

    async def warm_up(self, base: str) -> None:
        async with httpx.AsyncClient(timeout=300) as c:
            await cl.pollama_generate(c, base, self.model_name, "Hello", self.options(2))

    def generate(self, base: str, prompt: str, n_predict: int) -> cl.StreamFn:
        opts = self.options(n_predict)  # raw: the prompt llama-server and the plain loop get
        return lambda c, _i: cl.pollama_generate(c, base, self.model_name, prompt, opts,
                                                 raw=True)

    def chat(self, base: str, messages: list[dict[str, str]], n: int) -> cl.StreamFn:
        opts = self.options(n)
        return lambda c, _i: cl.pollama_chat(c, base, self.model_name, messages, opts)


Engine = LlamaServer | Pollama


# --- measurements ----------------------------------------------------------------------------

T = TypeVar("T")


def bracket(fn: Callable[[], T]) -> tuple[T, float]:
    """Run ``fn`` and return its value and the CPU share others used meanwhile."""
    a = _procs.cpu_snapshot()
    value = fn()
    return value, _procs.foreign_load(a, _procs.cpu_snapshot())


def clean(fn: Callable[[], tuple[T, float]], label: str, args: argparse.Namespace
          ) -> tuple[T, float]:
    """Retry ``fn`` (which reports others' CPU share) until the machine was quiet enough."""
    for attempt in range(1, args.attempts + 1):
        waited = _procs.wait_quiet(args.max_foreign, patience=args.patience)
        if waited >= args.max_foreign:
            print(f"    {label}: machine still busy ({waited:.0%} by others), measuring anyway",
                  flush=True)
        value, load = fn()
        if load <= args.max_foreign or attempt == args.attempts:
            return value, load
        print(f"    {label}: others used {load:.0%} of the CPUs meanwhile, measuring again",
              flush=True)
    raise AssertionError("unreachable")


def _run_streams(engine: Engine, base: str, prompts: list[str], n_predict: int
                 ) -> tuple[cl.RunSummary, float]:
    def one(c: httpx.AsyncClient, i: int) -> Awaitable[cl.StreamResult]:
        return engine.generate(base, prompts[i], n_predict)(c, i)

    return bracket(lambda: asyncio.run(cl.concurrent(len(prompts), one)))


class Points:
    """Every repeat of each (engine, FA, streams), and the memory seen. A point is shown as
    the median of its repeats (:meth:`medians`), not the best: the repeats are interleaved
    across engines, so a drift of the shared machine hits all of them alike."""

    _MEDIAN_KEYS = ("per_stream_tok_s", "aggregate_tok_s", "wall_tok_s", "ttft_s",
                    "step_ms_median", "sample_ms_per_token", "foreign_load")

    def __init__(self) -> None:
        self.rows: dict[tuple[str, bool, int], list[dict[str, Any]]] = {}
        self.memory: dict[tuple[str, bool, int], dict[str, Any]] = {}

    def add(self, key: tuple[str, bool, int], row: dict[str, Any]) -> None:
        self.rows.setdefault(key, []).append(row)

    def medians(self) -> list[dict[str, Any]]:
        out = []
        for rows in self.rows.values():
            point = dict(rows[0])
            for name in self._MEDIAN_KEYS:
                values = [r[name] for r in rows if r.get(name) is not None]
                if values:
                    point[name] = statistics.median(values)
            point["aggregate_samples"] = [r["aggregate_tok_s"] for r in rows]
            point["wall_samples"] = [r["wall_tok_s"] for r in rows]
            out.append(point)
        return out


def measure_server(engine: Engine, args: argparse.Namespace, fa: str, n: int, rep: int,
                   points: Points, budget: Callable[[int], int]) -> None:
    """One measurement: a fresh server with N slots, N concurrent streams, its memory."""
    with engine.serve(n, fa, fresh=True) as (srv, base):
        asyncio.run(engine.warm_up(base))
        prompts = story_prompts(args.model, rep, n)
        summary, load = clean(partial(_run_streams, engine, base, prompts, args.n_predict),
                              f"{engine.name} FA {fa} N={n}", args)
        mem = _procs.tree_memory(srv.pid)
    key = (engine.name, fa, n)
    points.add(key, {"engine": engine.name, "fa": fa, **asdict(summary),
                     "foreign_load": round(load, 3)})
    points.memory[key] = {"engine": engine.name, "fa": fa, "streams": n, **asdict(mem),
                          "budget": budget(n)}
    print(f"    {engine.name:12s} FA {fa} N={n} #{rep + 1}: "
          f"{summary.per_stream_tok_s:6.1f}/stream {summary.aggregate_tok_s:6.1f} agg "
          f"{summary.wall_tok_s:6.1f} wall, prompts {summary.prompt_tokens} tokens, "
          f"RSS {mem.rss / MiB:.0f} MiB, others {load:.0%}",
          flush=True)


def _plain_once(args: argparse.Namespace, fa: str, n: int, rep: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(story_prompts(args.model, rep, n), f)
    cmd = [sys.executable, str(BENCH / "plain_loop.py"), "--model", str(args.model),
           "--threads", str(args.threads), "--n-predict", str(args.n_predict),
           "--flash-attn", fa, "--streams", str(n), "--prompts", f.name]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"plain_loop failed: {out.stderr[-1000:]}")
    return dict(json.loads(out.stdout.splitlines()[-1]))


def measure_plain(args: argparse.Namespace, fa: str, n: int, rep: int, points: Points) -> None:
    r, load = clean(partial(bracket, partial(_plain_once, args, fa, n, rep)),
                    f"plain FA {fa} N={n}", args)
    points.add(("plain", fa, n), {
        "engine": "plain", "fa": fa, "streams": n, "per_stream_tok_s": r["per_stream_tok_s"],
        "aggregate_tok_s": r["aggregate_tok_s"], "wall_tok_s": r["wall_tok_s"],
        "ttft_s": r["prefill_s"], "tokens": n * r["n_predict"],
        "prompt_tokens": r["prompt_tokens"],
        "step_ms_median": r["step_ms_median"], "sample_ms_per_token": r["sample_ms_per_token"],
        "foreign_load": round(load, 3),
    })
    print(f"    {'plain':12s} FA {fa} N={n} #{rep + 1}: "
          f"{r['per_stream_tok_s']:6.1f}/stream {r['aggregate_tok_s']:6.1f} agg "
          f"{r['wall_tok_s']:6.1f} wall, prompts {r['prompt_tokens']} tokens, "
          f"step {r['step_ms_median']:.1f} ms, others {load:.0%}",
          flush=True)


def measure_followup(engine: Engine, args: argparse.Namespace, fa: str,
                     results: dict[str, Any]) -> None:
    history = chat_history()
    follow: list[dict[str, str]] = []
    history_tokens = 0

    async def one(base: str, messages: list[dict[str, str]], n: int) -> cl.StreamResult:
        async with httpx.AsyncClient(timeout=600) as c:
            return await engine.chat(base, messages, n)(c, 0)

    def warm_once() -> tuple[list[cl.StreamResult], float]:
        """The history, then FOLLOW_UPS chained turns; each turn's TTFT is a warm sample."""
        nonlocal follow, history_tokens
        with engine.serve(1, fa) as (_srv, base):
            asyncio.run(engine.warm_up(base))
            first = asyncio.run(one(base, history, 32))
            history_tokens = first.prompt_tokens
            messages = [*history, {"role": "assistant", "content": first.text}]
            samples: list[cl.StreamResult] = []
            loads: list[float] = []
            for k, question in enumerate(FOLLOW_UPS):
                messages.append({"role": "user", "content": question})
                if k == 0:
                    follow = list(messages)
                got, load = bracket(lambda m=list(messages): asyncio.run(one(base, m, 8)))
                samples.append(got)
                loads.append(load)
                messages.append({"role": "assistant", "content": got.text})
            return samples, max(loads)

    def cold_once() -> tuple[cl.StreamResult, float]:
        # fresh: else the warm server's conversation would be restored
        with engine.serve(1, fa, fresh=True) as (_srv, base):
            asyncio.run(engine.warm_up(base))
            return bracket(lambda: asyncio.run(one(base, follow, 8)))

    warm_samples, load_w = clean(warm_once, f"{engine.name} follow-up warm", args)
    cold, load_c = clean(cold_once, f"{engine.name} follow-up cold", args)
    ttfts = sorted(r.ttft for r in warm_samples)
    warm_ttft = ttfts[len(ttfts) // 2]
    results["followup"].append({
        "engine": engine.name, "fa": fa, "history_tokens": history_tokens,
        "ttft_cold": round(cold.ttft, 4), "ttft_warm": round(warm_ttft, 4),
        "ttft_warm_samples": [round(t, 4) for t in ttfts],
        "prompt_cold": cold.prompt_tokens, "prompt_warm": warm_samples[0].prompt_tokens,
        "foreign_load": round(max(load_w, load_c), 3),
    })
    print(f"  {engine.name:12s} FA {fa} follow-up TTFT: cold "
          f"{cold.ttft:.3f}s ({cold.prompt_tokens} tok) warm {warm_ttft:.3f}s (median of "
          f"{', '.join(f'{t:.3f}' for t in ttfts)}; {warm_samples[0].prompt_tokens} tok), "
          f"others {max(load_w, load_c):.0%}", flush=True)


def guarded(name: str, label: str, step: Callable[[], None], results: dict[str, Any],
            worked: set[str]) -> bool:
    """Run one measurement of pollama, which may not work yet; False: skip the engine.

    Until pollama has produced one measurement, a failure skips it for the whole run (it
    cannot generate yet). After that a failure is retried once with a fresh server, then
    recorded for that point only. Failures of the references are bugs here: they raise.
    """
    for attempt in (1, 2):
        try:
            step()
            worked.add(name)
            return True
        except (cl.Unavailable, httpx.HTTPError) as e:
            if name != "pollama":
                raise
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:700]
            if name not in worked:
                results["skipped"][name] = reason
                print(f"  {name} skipped: {reason}", flush=True)
                return False
            print(f"  {name} {label} failed (attempt {attempt}): {reason}", flush=True)
            if attempt == 2:
                results["errors"].append({"engine": name, "point": label, "error": reason})
    return True


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="GGUF (default: pollama's default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    # auto: each engine's default, llama.cpp's "auto", which turns flash attention on
    # wherever the backend has it (the CPU has): "on" is every engine's default here
    ap.add_argument("--fa", choices=FA_MODES, nargs="+", default=["auto"])
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3,
                    help="repeats per point, interleaved; the median is shown")
    ap.add_argument("--only", choices=ENGINES, nargs="+", default=list(ENGINES))
    ap.add_argument("--no-followup", action="store_true")
    ap.add_argument("--max-foreign", type=float, default=0.10,
                    help="retry a measurement when other processes used more than this share "
                         "of the CPUs during it (the machines are shared)")
    ap.add_argument("--attempts", type=int, default=4, help="tries per measurement")
    ap.add_argument("--patience", type=float, default=900.0,
                    help="seconds to wait for a quiet machine before each measurement")
    ap.add_argument("--quick", action="store_true", help="1 and 2 streams, 32 tokens, 1 repeat")
    ap.add_argument("--out", type=Path, help="markdown output path")
    args = ap.parse_args(argv)
    if args.quick:
        args.streams, args.n_predict, args.repeat = [1, 2], 32, 1
    if args.model is None:
        from pollama.default_model import default_gguf_path

        args.model = default_gguf_path()
    args.model = args.model.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # stop the servers (context managers) when killed, not only on Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cpu, cpu_slug, simd = cpu_info()
    today = dt.date.today().isoformat()
    if "llama-server" in args.only and not llama_server_bin().exists():
        print("llama-server is not built: run bench/build_llama_server.sh", file=sys.stderr)
        return 2
    from pollama import __version__ as pollama_version

    meta = {
        "date": today, "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "cpu_flags": simd,
        "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "model_name": args.model.name, "model_bytes": args.model.stat().st_size,
        "threads": args.threads, "n_predict": args.n_predict, "streams": args.streams,
        "fa_modes": list(args.fa), "quick": args.quick, "repeat": args.repeat,
        "max_foreign": args.max_foreign,
        "llama_cpp_python": version("llama_cpp_python"),
        "llama_server_version": llama_server_version(), "pollama": pollama_version,
        "pollama_commit": git_commit(), "python": platform.python_version(),
        "command": shlex.join(["python", "bench/run_bench.py", *(argv or sys.argv[1:])]),
    }
    results: dict[str, Any] = {"meta": meta, "throughput": [], "memory": [], "followup": [],
                               "skipped": {}, "errors": []}
    kv_tok = kv_bytes_per_token(args.model)
    budget = lambda n: meta["model_bytes"] + kv_tok * 4096 * n + 150 * MiB  # noqa: E731
    print(f"{cpu} ({meta['cores']} cores), {args.model.name}, KV {kv_tok} B/token", flush=True)

    with tempfile.TemporaryDirectory(prefix="pollama-bench-") as tmp:
        engines: dict[str, Engine] = {
            "llama-server": LlamaServer(args.model, args.threads),
            "pollama": Pollama(args.model, args.threads, Path(tmp)),
        }
        worked: set[str] = set()
        points = Points()
        for fa in args.fa:
            for n in args.streams:
                for rep in range(args.repeat):
                    # interleave the engines (rotating the order) so that the machine's
                    # drift over minutes hits all of them alike
                    order = args.only[rep % len(args.only):] + args.only[:rep % len(args.only)]
                    for name in order:
                        if name in results["skipped"]:
                            continue
                        if name == "plain":
                            measure_plain(args, fa, n, rep, points)
                        else:
                            guarded(name, f"FA {fa} N={n}", partial(
                                measure_server, engines[name], args, fa, n, rep, points,
                                budget), results, worked)
            if not args.no_followup:
                for name in args.only:
                    if name != "plain" and name not in results["skipped"]:
                        guarded(name, f"FA {fa} follow-up",
                                partial(measure_followup, engines[name], args, fa, results),
                                results, worked)
        results["throughput"] = points.medians()
        results["memory"] = list(points.memory.values())

    out = args.out or (BUILD / "quick.md" if args.quick
                       else BENCH / "results" / f"{today}-{cpu_slug}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results))
    raw = BUILD / "results" / (out.stem + ".json")
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1))
    print(f"wrote {out} (raw: {raw})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
